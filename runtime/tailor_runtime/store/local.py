"""The embedded default: artifacts in a local directory. Writes are atomic (temp file + rename)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tailor_runtime.errors import NotFound
from tailor_runtime.store.base import ArtifactStore
from tailor_runtime.store.manifest import CHUNK


class LocalStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys are built from validated ids and paths; this is the last line of defence.
        if self.root not in path.parents:
            raise NotFound(f"key {key!r} escapes the store")
        return path

    def _put_file(self, key: str, src: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / self._temp_name()
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)

    def _put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / self._temp_name()
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def _get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key} not found") from None

    def _iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            handle = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"{key} not found") from None
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _list_prefixes(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def uri_for(self, artifact_id: str) -> str:
        return f"file://{self.root}/artifacts/{artifact_id}"
