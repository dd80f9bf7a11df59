"""The manifest that describes an artifact; its sha256 is the artifact's id (content addressing)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tailor_runtime.errors import IntegrityError
from tailor_runtime.store.keys import check_relative_path

MANIFEST_SCHEMA = "tailor.artifact/v1"
KINDS = ("model", "adapter", "dataset", "quantized-model", "export", "report", "checkpoint")
CHUNK = 1 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: str
    size: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_: str = Field(MANIFEST_SCHEMA, alias="schema")
    kind: str
    format: str
    name: str = ""
    files: tuple[FileEntry, ...]
    parents: tuple[str, ...] = ()
    # How it was made: stage, method, config, library versions, seed. Deterministic fields only,
    # so the same recipe on the same inputs gives the same address.
    recipe: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(by_alias=True, mode="json"))

    @property
    def id(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_stored(cls, raw: bytes, artifact_id: str) -> Manifest:
        """The manifest of `artifact_id` from its stored bytes, which must hash to the id (content
        addressing): IntegrityError (DATA_LOSS) when they do not or do not parse."""
        if hashlib.sha256(raw).hexdigest() != artifact_id:
            raise IntegrityError(f"manifest of artifact {artifact_id} does not match its id: refusing it")
        try:
            return cls.model_validate(json.loads(raw))
        except (ValidationError, ValueError) as exc:
            raise IntegrityError(f"manifest of artifact {artifact_id} is malformed: {exc}") from None


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan_directory(root: Path) -> tuple[FileEntry, ...]:
    """Hash every regular file under root (streamed, bounded memory); symlinks are refused."""
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise ValueError(
                f"{path.relative_to(root).as_posix()} is a symbolic link; artifacts hold regular files only"
            )
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            check_relative_path(rel)
            entries.append(FileEntry(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    return tuple(entries)


def recipe_key(recipe: dict[str, Any]) -> str:
    """The address of a recipe in the cache index: the same stage, method, config and inputs."""
    return hashlib.sha256(canonical_json(recipe)).hexdigest()
