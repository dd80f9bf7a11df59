"""Where the gateway is and how to reach it: TAILOR_GATEWAY/TAILOR_TOKEN, or the local stack's state."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from tailor.errors import ClientError
from tailor.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tailor_runtime.grpc_options import GRPC_OPTIONS


def default_state_dir() -> Path:
    """One local stack per user, wherever the CLI runs: $TAILOR_STATE_DIR, else $XDG_STATE_HOME/tailor,
    else ~/.local/state/tailor (not the current directory, so every terminal finds the same stack)."""
    if os.environ.get("TAILOR_STATE_DIR"):
        return Path(os.environ["TAILOR_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tailor"


DEFAULT_STATE_DIR = default_state_dir()


@dataclass
class Connection:
    """A gateway address and the API token that every call carries."""

    gateway: str
    token: str

    @classmethod
    def discover(cls, state_dir: Path | None = None) -> Connection:
        """From TAILOR_GATEWAY/TAILOR_TOKEN, else from the local stack started by `tailor up`."""
        state_dir = state_dir or default_state_dir()
        info_file = state_dir / "stack.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        gateway = os.environ.get("TAILOR_GATEWAY") or info.get("gateway")
        if not gateway:
            raise ClientError(
                "no gateway: start the local stack with `tailor up`, or set TAILOR_GATEWAY=host:port"
            )
        token = os.environ.get("TAILOR_TOKEN")
        if not token and (state_dir / "token").exists():
            token = (state_dir / "token").read_text().strip()
        if not token:
            raise ClientError(
                f"no API token: set TAILOR_TOKEN (the local stack writes one to {state_dir / 'token'})"
            )
        return cls(gateway, token)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]

    def gateway_stub(self) -> pb_grpc.GatewayServiceStub:
        return pb_grpc.GatewayServiceStub(open_channel(self.gateway))


def open_channel(address: str) -> grpc.Channel:
    """TLS when TAILOR_TLS_CA is set (plus our certificate with TAILOR_TLS_CERT/KEY: mutual TLS)."""
    ca = os.environ.get("TAILOR_TLS_CA")
    if not ca:
        return grpc.insecure_channel(address, options=GRPC_OPTIONS)
    cert, key = os.environ.get("TAILOR_TLS_CERT"), os.environ.get("TAILOR_TLS_KEY")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials, options=GRPC_OPTIONS)
