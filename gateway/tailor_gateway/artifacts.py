"""Uploads and downloads through the gateway: streamed, size-limited, validated, never unpickled."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor_runtime.errors import InvalidArgument, ResourceExhausted
from tailor_runtime.store import ArtifactStore, Manifest
from tailor_runtime.store.keys import check_relative_path
from tailor_runtime.store.manifest import KINDS
from tailor_runtime.streams import with_last

# Pickle-based weight files: refused whatever their name says inside (safetensors, ONNX, GGUF only).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container holds a data.pkl
DOWNLOAD_CHUNK = 1 << 20


def _refuse_pickles(path: Path, rel: str) -> None:
    if rel.lower().endswith(PICKLE_SUFFIXES):
        raise InvalidArgument(
            f"{rel}: pickle-based weight files are refused; convert to safetensors, ONNX or GGUF: "
            "`tailor models import FOLDER` converts a Hugging Face folder's pytorch_model.bin with "
            "torch.load(weights_only=True) before uploading (llama2.c checkpoints: "
            "python -m tailor_runtime.ml.llama2c)"
        )
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:2] in PICKLE_MAGIC or (head == ZIP_MAGIC and not rel.endswith((".zip",))):
        raise InvalidArgument(
            f"{rel}: looks like a pickle or torch.save archive; only safetensors, ONNX, GGUF "
            "(`tailor models import FOLDER` converts a pytorch_model.bin)"
        )


async def receive_upload(
    requests: AsyncIterator[pb.UploadArtifactRequest],
    store: ArtifactStore,
    max_bytes: int,
    staging_root: Path,
) -> Manifest:
    staging_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=staging_root))
    handles: dict[str, BinaryIO] = {}
    try:
        header: pb.UploadHeader | None = None
        finished: set[str] = set()
        total = 0
        async for message in requests:
            if message.HasField("header"):
                if header is not None:
                    raise InvalidArgument("upload sent two headers; send one header, then the chunks")
                header = message.header
                if header.kind not in KINDS:
                    raise InvalidArgument(f"upload kind {header.kind!r} is unknown", choices=KINDS)
                if not header.format:
                    raise InvalidArgument("upload header needs a format (e.g. hf-safetensors, text)")
                continue
            if header is None:
                raise InvalidArgument("upload must start with a header (kind, format, name)")
            chunk = message.chunk
            rel = check_relative_path(chunk.path)
            if rel in finished:
                raise InvalidArgument(f"{rel} was sent twice")
            total += len(chunk.data)
            if total > max_bytes:
                raise ResourceExhausted(f"upload is larger than the limit of {max_bytes} bytes")
            if rel not in handles:
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                handles[rel] = open(target, "wb")  # noqa: SIM115 - closed at eof or in finally
            handles[rel].write(chunk.data)
            if chunk.eof:
                handles.pop(rel).close()
                finished.add(rel)
        if header is None:
            raise InvalidArgument("empty upload: send a header and at least one file")
        if handles:
            raise InvalidArgument(f"upload ended before these files were complete: {sorted(handles)}")
        for rel in finished:
            _refuse_pickles(folder / rel, rel)
        # Hashing and storing a 13 GB model takes minutes: off the event loop, which keeps serving.
        return await asyncio.to_thread(
            store.publish_directory,
            folder,
            kind=header.kind,
            format=header.format,
            name=header.name,
            metrics={},
            recipe={"stage": "upload"},
        )
    finally:
        for handle in handles.values():
            handle.close()
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)


def iter_download(store: ArtifactStore, artifact_id: str):
    manifest = store.get_manifest(artifact_id)
    for entry in manifest.files:
        chunks = store.iter_file(artifact_id, entry.path, DOWNLOAD_CHUNK)
        if entry.size == 0:
            chunks = iter([b""])
        for data, last in with_last(chunks):
            yield pb.DownloadArtifactResponse(chunk=pb.FileChunk(path=entry.path, data=data, eof=last))
