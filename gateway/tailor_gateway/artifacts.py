"""Uploads and downloads through the gateway: streamed, size-limited, validated, never unpickled."""

from __future__ import annotations

import asyncio
import errno
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor_runtime.errors import InvalidArgument, ResourceExhausted
from tailor_runtime.store import ArtifactStore, Manifest
from tailor_runtime.store.content import ContentCheck
from tailor_runtime.store.keys import check_relative_path
from tailor_runtime.store.manifest import KINDS
from tailor_runtime.streams import with_last

DOWNLOAD_CHUNK = 1 << 20
# Started before any upload of this process: staging folders older than this belong to a dead gateway.
PROCESS_STARTED = time.time()
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Files in one upload: a sharded 70B holds about 60, a dataset folder a few hundred. Each file costs an
# open, a content check and a manifest entry, so tens of thousands of empty files would tie the gateway up.
MAX_UPLOAD_FILES = 10_000


def clean_stale_staging(staging_root: Path, started: float = PROCESS_STARTED) -> int:
    """Remove staging folders left by a gateway killed mid-upload (older than this process); returns
    how many. Called once at start-up, where the staging folder is set up."""
    removed = 0
    if not staging_root.is_dir():
        return 0
    for entry in staging_root.iterdir():
        if entry.name.startswith(("upload-", "hub-")) and entry.lstat().st_mtime < started:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def _check_layout(rel: str, files: set[str], folders: set[str]) -> None:
    """`a` then `a/b` (or the reverse) cannot both be stored: a path is a file or a folder."""
    parents = rel.split("/")[:-1]
    for i in range(1, len(parents) + 1):
        if "/".join(parents[:i]) in files:
            raise InvalidArgument(f"{rel}: {'/'.join(parents[:i])} is a file in this upload, not a folder")
    if rel in folders:
        raise InvalidArgument(f"{rel}: is a folder in this upload (it holds other files), not a file")


async def receive_upload(
    requests: AsyncIterator[pb.UploadArtifactRequest],
    store: ArtifactStore,
    max_bytes: int,
    staging_root: Path,
    max_files: int = MAX_UPLOAD_FILES,
) -> Manifest:
    staging_root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=staging_root))
    handles: dict[str, BinaryIO] = {}
    checks: dict[str, ContentCheck] = {}
    folders: set[str] = set()
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
                if len(finished) + len(handles) >= max_files:
                    raise InvalidArgument(
                        f"upload holds more than {max_files} files (TAILOR_MAX_UPLOAD_FILES); pack small "
                        "files into fewer ones (e.g. one JSONL dataset, sharded safetensors of >= 1 GB)"
                    )
                _check_layout(rel, finished | set(handles), folders)
                parts = rel.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                handles[rel] = open(target, "wb")  # noqa: SIM115 - closed at eof or in finally
                checks[rel] = ContentCheck(rel)
            # Checked as the bytes arrive: a pickle is refused before the rest of it is stored.
            checks[rel].feed(chunk.data)
            handles[rel].write(chunk.data)
            if chunk.eof:
                handles.pop(rel).close()
                checks.pop(rel).finish()
                finished.add(rel)
        if header is None:
            raise InvalidArgument("empty upload: send a header and at least one file")
        if handles:
            raise InvalidArgument(f"upload ended before these files were complete: {sorted(handles)}")
        if not finished:
            raise InvalidArgument("upload holds no files: send at least one file after the header")
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
    except OSError as exc:
        # Never the staging path in a message; a full disk is the caller's to retry, not a bug.
        if exc.errno in DISK_FULL:
            raise ResourceExhausted("the gateway's disk is full: nothing was stored; retry later") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise InvalidArgument("a file path of this upload is too long") from None
        raise
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
