"""Talking to the gateway (and, for direct stage commands, to a stage service)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tailor_runtime.errors import IntegrityError, InvalidArgument
from tailor_runtime.ml.model_io import FORMAT_FILE, infer_format
from tailor_runtime.server import GRPC_OPTIONS
from tailor_runtime.store.keys import check_relative_path
from tailor_runtime.store.manifest import Manifest
from tailor_runtime.streams import read_chunks, with_last
from tailor_runtime.trust import SyncWorkerCallInterceptor

UPLOAD_CHUNK = 1 << 20


def default_state_dir() -> Path:
    """One local stack per user, wherever the CLI runs: $TAILOR_STATE_DIR, else $XDG_STATE_HOME/tailor,
    else ~/.local/state/tailor (not the current directory, so every terminal finds the same stack)."""
    if os.environ.get("TAILOR_STATE_DIR"):
        return Path(os.environ["TAILOR_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tailor"


DEFAULT_STATE_DIR = default_state_dir()
DIRECT_PROJECT = "default"  # the local stack's project (its token's); direct commands' operations


class CliError(Exception):
    """A user-facing error: printed without a traceback."""


@dataclass
class Connection:
    gateway: str
    token: str
    services: dict[str, str]
    # The local stack's worker secret (`tailor up` writes it): direct stage commands act as the gateway.
    worker_secret: str = ""

    @classmethod
    def discover(cls, state_dir: Path = DEFAULT_STATE_DIR) -> Connection:
        """From TAILOR_GATEWAY/TAILOR_TOKEN, else from the local stack started by `tailor up`."""
        info_file = state_dir / "stack.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        gateway = os.environ.get("TAILOR_GATEWAY") or info.get("gateway")
        if not gateway:
            raise CliError(
                "no gateway: start the local stack with `tailor up`, or set TAILOR_GATEWAY=host:port"
            )
        token = os.environ.get("TAILOR_TOKEN")
        if not token and (state_dir / "token").exists():
            token = (state_dir / "token").read_text().strip()
        if not token:
            raise CliError(
                f"no API token: set TAILOR_TOKEN (the local stack writes one to {state_dir / 'token'})"
            )
        secret_file = state_dir / "worker-secret"
        secret = secret_file.read_text().strip() if info and secret_file.exists() else ""
        return cls(gateway, token, info.get("services", {}), secret)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]

    def gateway_stub(self) -> pb_grpc.GatewayServiceStub:
        return pb_grpc.GatewayServiceStub(open_channel(self.gateway))

    def service_channel(self, service: str) -> grpc.Channel:
        address = os.environ.get(f"TAILOR_{service.upper()}") or self.services.get(service)
        if not address:
            raise CliError(f"no address for the {service} service: set TAILOR_{service.upper()}=host:port")
        channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        # Workers take calls from the gateway only; on the local stack the CLI holds the same secret.
        return grpc.intercept_channel(channel, SyncWorkerCallInterceptor(self.worker_secret, DIRECT_PROJECT))


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


def _upload_messages(path: Path, kind: str, fmt: str, name: str) -> Iterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(header=pb.UploadHeader(kind=kind, format=fmt, name=name))
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if path.is_file() else file.relative_to(path).as_posix()
        check_relative_path(rel)
        with open(file, "rb") as handle:
            for data, last in with_last(read_chunks(handle, UPLOAD_CHUNK)):
                yield pb.UploadArtifactRequest(chunk=pb.FileChunk(path=rel, data=data, eof=last))


def guess_format(path: Path) -> tuple[str, str]:
    """(kind, format) for a local path: a model folder or a text dataset. A plain Hugging Face folder's
    format is read from its config.json (`infer_format`: hf-safetensors, compressed-tensors, bnb-*)."""
    fmt_file = path / FORMAT_FILE if path.is_dir() else None
    if fmt_file is not None and fmt_file.exists():
        return "model", json.loads(fmt_file.read_text()).get("format", "hf-safetensors")
    if path.is_dir() and (path / "config.json").exists():
        try:
            return "model", infer_format(path)["format"]
        except InvalidArgument as exc:
            raise CliError(f"{path}: {exc.message}") from None
    if path.suffix in (".json", ".jsonl"):
        return "dataset", "jsonl" if path.suffix == ".jsonl" else "json"
    return "dataset", "text"


def upload(
    conn: Connection, path: Path, kind: str | None = None, fmt: str | None = None
) -> pb.UploadArtifactResponse:
    """Stream a file or folder to the gateway (1 MiB chunks, one file open at a time: memory stays
    bounded whatever the size). A folder with only pytorch_model.bin is converted to safetensors first."""
    from tailor_cli.convert import ConversionError, convert_folder, needs_conversion

    if not path.exists():
        raise CliError(f"{path} does not exist")
    refuse_outside_symlinks(path)
    converted = None
    if needs_conversion(path):
        converted = Path(tempfile.mkdtemp(prefix="tailor-convert-"))
        print(f"converting {path.name}'s pytorch_model.bin to safetensors in {converted}", file=sys.stderr)
        try:
            convert_folder(path, converted)
        except ConversionError as exc:
            shutil.rmtree(converted, ignore_errors=True)
            raise CliError(f"{path}: {exc}") from None
    source = converted or path
    try:
        guessed_kind, guessed_format = guess_format(source)
        return conn.gateway_stub().UploadArtifact(
            _upload_messages(source, kind or guessed_kind, fmt or guessed_format, path.name),
            metadata=conn.metadata(),
        )
    finally:
        if converted is not None:
            shutil.rmtree(converted, ignore_errors=True)


def import_hub(conn: Connection, repo: str, revision: str = "") -> pb.ImportModelResponse:
    """Ask the gateway to import a Hub model (it holds the token and the store); waits until published."""
    return conn.gateway_stub().ImportModel(
        pb.ImportModelRequest(hub_repo=repo, revision=revision), metadata=conn.metadata()
    )


def resolve_model(conn: Connection, value: str) -> str:
    """A direct command's --model: an artifact id, `hub:org/name[@revision]`, or a local folder."""
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value) and not Path(value).exists():
        return value
    if value.startswith("hub:"):
        repo, _, revision = value.removeprefix("hub:").partition("@")
        return import_hub(conn, repo, revision).artifact.id
    return upload(conn, Path(value)).artifact.id


def download(conn: Connection, artifact_id: str, dest: Path) -> list[Path]:
    """Every file into a temporary folder beside dest, each checked against the artifact's manifest
    (sha256, size, nothing missing); only then renamed into dest. A failure leaves nothing behind."""
    stub = conn.gateway_stub()
    reply = stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact_id), metadata=conn.metadata())
    try:
        manifest = Manifest.from_stored(reply.manifest_json.encode(), artifact_id)
    except IntegrityError as exc:
        raise CliError(f"{exc.message}; nothing written") from None
    expected = {f.path: (f.sha256, f.size) for f in manifest.files}
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tailor-download-", dir=dest))
    handles: dict[str, tuple] = {}
    done: set[str] = set()
    try:
        for message in stub.DownloadArtifact(
            pb.DownloadArtifactRequest(artifact_id=artifact_id), metadata=conn.metadata()
        ):
            rel = check_relative_path(message.chunk.path)
            if rel not in expected or rel in done:
                raise CliError(f"the gateway sent {rel!r}, which is not (or no longer) expected")
            if rel not in handles:
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                handles[rel] = (open(target, "wb"), hashlib.sha256())  # noqa: SIM115 - closed below
            handle, digest = handles[rel]
            handle.write(message.chunk.data)
            digest.update(message.chunk.data)
            if message.chunk.eof:
                handle.close()
                handles.pop(rel)
                size = (staging / rel).stat().st_size
                if (digest.hexdigest(), size) != expected[rel]:
                    raise CliError(f"{rel} arrived corrupt (sha256 or size differ from the manifest)")
                done.add(rel)
        if done != set(expected):
            raise CliError(f"the download ended without {sorted(set(expected) - done)}")
        written = []
        for rel in sorted(done):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
            written.append(target)
        return written
    finally:
        for handle, _ in handles.values():
            handle.close()
        shutil.rmtree(staging, ignore_errors=True)


def refuse_outside_symlinks(path: Path) -> None:
    """A folder's symlinks are never followed out of it: the upload would send what they point to."""
    if not path.is_dir():
        return
    root = path.resolve()
    for entry in path.rglob("*"):
        if entry.is_symlink():
            target = entry.resolve()
            if root != target and root not in target.parents:
                rel = entry.relative_to(path).as_posix()
                raise CliError(
                    f"{path}/{rel} is a symbolic link to a file outside the folder; Tailor uploads only the "
                    "folder's own files: copy the file in (cp -L) or remove the link"
                )
