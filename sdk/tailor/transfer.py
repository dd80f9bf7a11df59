"""Moving files to and from the gateway: uploads in bounded chunks, downloads checked against the manifest
before anything lands in the destination."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from tailor.errors import ClientError, refused
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor_runtime.errors import IntegrityError, InvalidArgument
from tailor_runtime.ml.model_io import FORMAT_FILE, infer_format
from tailor_runtime.store.keys import check_relative_path
from tailor_runtime.store.manifest import Manifest
from tailor_runtime.streams import read_chunks, with_last

UPLOAD_CHUNK = 1 << 20
# on_progress(done_bytes, total_bytes): called as bytes go out or come in (a progress bar, a log line).
OnProgress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    pass


def local_files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, file) of everything an upload of `path` sends: the file itself, or a folder's files."""
    if path.is_file():
        return [(path.name, path)]
    return [(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*")) if p.is_file()]


def _upload_messages(
    path: Path, kind: str, fmt: str, name: str, on_progress: OnProgress
) -> Iterator[pb.UploadArtifactRequest]:
    files = local_files(path)
    total, done = sum(f.stat().st_size for _, f in files), 0
    yield pb.UploadArtifactRequest(header=pb.UploadHeader(kind=kind, format=fmt, name=name))
    on_progress(0, total)
    for rel, file in files:
        check_relative_path(rel)
        with open(file, "rb") as handle:
            for data, last in with_last(read_chunks(handle, UPLOAD_CHUNK)):
                yield pb.UploadArtifactRequest(chunk=pb.FileChunk(path=rel, data=data, eof=last))
                done += len(data)
                on_progress(done, total)


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
            raise ClientError(f"{path}: {exc.message}") from None
    if path.suffix in (".json", ".jsonl"):
        return "dataset", "jsonl" if path.suffix == ".jsonl" else "json"
    return "dataset", "text"


def upload(
    conn,
    path: Path,
    kind: str | None = None,
    fmt: str | None = None,
    on_progress: OnProgress | None = None,
) -> pb.UploadArtifactResponse:
    """Stream a file or folder to the gateway (1 MiB chunks, one file open at a time: memory stays
    bounded whatever the size). A folder with only pytorch_model.bin is converted to safetensors first."""
    from tailor.convert import ConversionError, convert_folder, needs_conversion

    path = Path(path)
    if not path.exists():
        raise ClientError(f"{path} does not exist")
    refuse_outside_symlinks(path)
    converted = None
    if needs_conversion(path):
        converted = Path(tempfile.mkdtemp(prefix="tailor-convert-"))
        print(f"converting {path.name}'s pytorch_model.bin to safetensors in {converted}", file=sys.stderr)
        try:
            convert_folder(path, converted)
        except ConversionError as exc:
            shutil.rmtree(converted, ignore_errors=True)
            raise ClientError(f"{path}: {exc}") from None
    source = converted or path
    try:
        guessed_kind, guessed_format = guess_format(source)
        messages = _upload_messages(
            source, kind or guessed_kind, fmt or guessed_format, path.name, on_progress or _no_progress
        )
        try:
            return conn.gateway_stub().UploadArtifact(messages, metadata=conn.metadata())
        except grpc.RpcError as exc:
            raise refused(exc) from None
    finally:
        if converted is not None:
            shutil.rmtree(converted, ignore_errors=True)


def import_hub(conn, repo: str, revision: str = "") -> pb.ImportModelResponse:
    """Ask the gateway to import a Hub model (it holds the token and the store); waits until published."""
    try:
        return conn.gateway_stub().ImportModel(
            pb.ImportModelRequest(hub_repo=repo, revision=revision), metadata=conn.metadata()
        )
    except grpc.RpcError as exc:
        raise refused(exc) from None


def resolve_model(conn, value: str, on_progress: OnProgress | None = None) -> str:
    """A model given as an artifact id, `hub:org/name[@revision]`, or a local folder: its artifact id."""
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value) and not Path(value).exists():
        return value
    if value.startswith("hub:"):
        repo, _, revision = value.removeprefix("hub:").partition("@")
        return import_hub(conn, repo, revision).artifact.id
    return upload(conn, Path(value), on_progress=on_progress).artifact.id


def download(conn, artifact_id: str, dest: Path, on_progress: OnProgress | None = None) -> list[Path]:
    """Every file into a temporary folder beside dest, each checked against the artifact's manifest
    (sha256, size, nothing missing); only then renamed into dest. A failure leaves nothing behind."""
    on_progress = on_progress or _no_progress
    dest = Path(dest)
    stub = conn.gateway_stub()
    try:
        reply = stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact_id), metadata=conn.metadata())
    except grpc.RpcError as exc:
        raise refused(exc) from None
    artifact_id = reply.artifact.id or artifact_id  # the whole id: the caller may have given a prefix
    try:
        manifest = Manifest.from_stored(reply.manifest_json.encode(), artifact_id)
    except IntegrityError as exc:
        raise ClientError(f"{exc.message}; nothing written") from None
    expected = {f.path: (f.sha256, f.size) for f in manifest.files}
    total, received = sum(size for _, size in expected.values()), 0
    on_progress(0, total)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tailor-download-", dir=dest))
    handles: dict[str, tuple] = {}
    done: set[str] = set()
    try:
        try:
            for message in stub.DownloadArtifact(
                pb.DownloadArtifactRequest(artifact_id=artifact_id),
                metadata=conn.metadata(),
            ):
                rel = check_relative_path(message.chunk.path)
                if rel not in expected or rel in done:
                    raise ClientError(f"the gateway sent {rel!r}, which is not (or no longer) expected")
                if rel not in handles:
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    handles[rel] = (open(target, "wb"), hashlib.sha256())  # noqa: SIM115 - closed below
                handle, digest = handles[rel]
                handle.write(message.chunk.data)
                digest.update(message.chunk.data)
                received += len(message.chunk.data)
                on_progress(received, total)
                if message.chunk.eof:
                    handle.close()
                    handles.pop(rel)
                    size = (staging / rel).stat().st_size
                    if (digest.hexdigest(), size) != expected[rel]:
                        raise ClientError(f"{rel} arrived corrupt (sha256 or size differ from the manifest)")
                    done.add(rel)
        except grpc.RpcError as exc:
            raise refused(exc) from None
        if done != set(expected):
            raise ClientError(f"the download ended without {sorted(set(expected) - done)}")
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
                raise ClientError(
                    f"{path}/{rel} is a symbolic link to a file outside the folder; Tailor uploads only the "
                    "folder's own files: copy the file in (cp -L) or remove the link"
                )
