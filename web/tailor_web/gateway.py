"""The gateway, as this process reaches it: one channel (the SDK's, TLS when TAILOR_TLS_CA is set) and
the caller's token on every call. Replies are turned into JSON here and nowhere else, with the proto's
own field names, so an HTTP answer is the gRPC answer written as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from tailor.connection import Connection, default_state_dir, open_channel
from tailor.errors import ClientError
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.gateway.v1 import gateway_service_pb2_grpc as pb_grpc

# A unary call that takes longer is answered DEADLINE_EXCEEDED (504), so a stuck gateway cannot hold this
# process's threads for ever. ImportModel downloads from the Hub on a first import: it gets longer.
CALL_TIMEOUT_S = float(os.environ.get("TAILOR_WEB_CALL_TIMEOUT_S", "300"))
IMPORT_TIMEOUT_S = float(os.environ.get("TAILOR_WEB_IMPORT_TIMEOUT_S", "3600"))


def to_json(message: Message) -> dict[str, Any]:
    """A reply as JSON: proto field names, enums by name, empty lists and zero values present (so a page
    never has to guess a missing field)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def gateway_address() -> str:
    """TAILOR_GATEWAY, else the local stack's (`tailor up` writes it to stack.json)."""
    if address := os.environ.get("TAILOR_GATEWAY"):
        return address
    info_file = default_state_dir() / "stack.json"
    try:
        return json.loads(Path(info_file).read_text())["gateway"]
    except (OSError, ValueError, KeyError):
        raise ClientError(
            "no gateway: set TAILOR_GATEWAY=host:port, or start the local stack with `tailor up`"
        ) from None


@dataclass
class Gateway:
    address: str

    def __post_init__(self):
        self.channel = open_channel(self.address)
        self.stub = pb_grpc.GatewayServiceStub(self.channel)

    @staticmethod
    def metadata(token: str) -> list[tuple[str, str]]:
        # No token, no header: the gateway answers UNAUTHENTICATED itself, in its own words.
        return Connection("", token).metadata() if token else []

    def call(self, method: str, request: Message, token: str, timeout: float = CALL_TIMEOUT_S) -> Message:
        """A unary RPC; a refusal raises grpc.RpcError (errors.py maps it)."""
        return getattr(self.stub, method)(request, metadata=self.metadata(token), timeout=timeout)

    def stream(self, method: str, request: Message, token: str):
        """A server-streaming RPC: the call, an iterator of replies that `cancel()` stops."""
        return getattr(self.stub, method)(request, metadata=self.metadata(token))

    def upload(self, requests: Iterator[pb.UploadArtifactRequest], token: str) -> grpc.Future:
        """The client-streaming upload; gRPC pulls `requests` on a thread of its own."""
        return self.stub.UploadArtifact.future(requests, metadata=self.metadata(token))

    def close(self) -> None:
        self.channel.close()
