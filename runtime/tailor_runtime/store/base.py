"""ArtifactStore: publish, read and verify immutable, content-addressed artifacts.

Layout under the store root (a directory or a bucket prefix):
    artifacts/<id>/files/<path>     the artifact's files
    artifacts/<id>/manifest.json    written last: an artifact exists once its manifest does
    recipes/<recipe key>            the id published for a recipe (the cluster-wide stage cache)

Backends implement the few blob primitives; everything that decides correctness (hashing, the
publish order, verification on read) lives here once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tailor_runtime.errors import IntegrityError, InvalidArgument, NotFound
from tailor_runtime.store.content import check_safetensors_header
from tailor_runtime.store.keys import check_artifact_id, check_relative_path
from tailor_runtime.store.manifest import (
    CHUNK,
    KINDS,
    Manifest,
    canonical_json,
    recipe_key,
    scan_directory,
)

log = logging.getLogger(__name__)


class ArtifactStore(ABC):
    """Shared logic; subclasses provide blob storage."""

    # --- blob primitives (backend-specific) ---------------------------------------------------
    @abstractmethod
    def _put_file(self, key: str, src: Path) -> None: ...

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes:
        """Raise NotFound when the key is absent."""

    @abstractmethod
    def _iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream a blob; raise NotFound when absent."""

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _list_prefixes(self, prefix: str) -> list[str]:
        """Names directly under prefix (one level, like a directory listing)."""

    @abstractmethod
    def uri_for(self, artifact_id: str) -> str: ...

    def check_ready(self) -> None:  # noqa: B027 - optional hook; a local directory is always ready
        """Raise Unavailable when the backend cannot be reached (used by health checks)."""

    # --- publishing ---------------------------------------------------------------------------
    def publish_directory(
        self,
        src_dir: Path,
        *,
        kind: str,
        format: str,
        name: str = "",
        parents: tuple[str, ...] | list[str] = (),
        recipe: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Manifest:
        """Upload every file of src_dir, then the manifest. Idempotent: same content, same id."""
        if kind not in KINDS:
            raise InvalidArgument(f"unknown artifact kind {kind!r}", choices=KINDS)
        for parent in parents:
            check_artifact_id(parent)
        try:
            files = scan_directory(src_dir)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not files:
            raise InvalidArgument(f"nothing to publish: {name or kind} holds no files")
        manifest = Manifest(
            kind=kind,
            format=format,
            name=name,
            files=files,
            parents=tuple(parents),
            recipe=recipe or {},
            metrics=metrics or {},
        )
        artifact_id = manifest.id
        if self._exists(self._manifest_key(artifact_id)):
            return manifest
        for entry in files:
            self._put_file(self._file_key(artifact_id, entry.path), src_dir / entry.path)
        # The manifest goes last: readers never see an artifact whose files are not all there.
        self._put_bytes(self._manifest_key(artifact_id), manifest.canonical_bytes())
        return manifest

    # --- reading ------------------------------------------------------------------------------
    def exists(self, artifact_id: str) -> bool:
        return self._exists(self._manifest_key(check_artifact_id(artifact_id)))

    def get_manifest(self, artifact_id: str) -> Manifest:
        check_artifact_id(artifact_id)
        try:
            raw = self._get_bytes(self._manifest_key(artifact_id))
        except NotFound:
            raise NotFound(f"artifact {artifact_id} not found in the store") from None
        return Manifest.from_stored(raw, artifact_id)

    def list_manifests(self, kind: str = "") -> list[tuple[str, Manifest]]:
        found = []
        for artifact_id in self._list_prefixes("artifacts/"):
            if not self._exists(self._manifest_key(artifact_id)):
                continue  # an upload in progress, or one that failed: not an artifact
            manifest = self.get_manifest(artifact_id)
            if not kind or manifest.kind == kind:
                found.append((artifact_id, manifest))
        return found

    def iter_file(self, artifact_id: str, path: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream one file, checking its sha256 and size; the last chunk is only released once verified."""
        entry = self._entry(artifact_id, path)
        digest, size, pending = hashlib.sha256(), 0, None
        for chunk in self._iter_chunks(self._file_key(artifact_id, path), chunk_size):
            digest.update(chunk)
            size += len(chunk)
            if pending is not None:
                yield pending
            pending = chunk
        if digest.hexdigest() != entry.sha256 or size != entry.size:
            raise IntegrityError(
                f"file {path!r} of artifact {artifact_id} is corrupt: sha256 {digest.hexdigest()[:12]}..., "
                f"{size} bytes; the manifest says {entry.sha256[:12]}..., {entry.size} bytes"
            )
        if pending is not None:
            yield pending

    def download(self, artifact_id: str, dest_dir: Path) -> Manifest:
        """Write every file to dest_dir (created), verified; nothing is left behind on a failure."""
        manifest = self.get_manifest(artifact_id)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=dest_dir.parent))
        try:
            for entry in manifest.files:
                target = staging / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as handle:
                    for chunk in self.iter_file(artifact_id, entry.path):
                        handle.write(chunk)
            if dest_dir.exists():
                shutil.rmtree(dest_dir)
            os.replace(staging, dest_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return manifest

    def materialize(self, artifact_id: str, cache_dir: Path) -> Path:
        """A verified local copy of the artifact under cache_dir/<id>. A cached copy is re-hashed every
        time it is used (a worker's cache can be changed under it); a copy that no longer matches its
        manifest is discarded and fetched again from the store, which verifies what it sends."""
        check_artifact_id(artifact_id)
        target = cache_dir / artifact_id
        if target.is_dir():
            manifest = self.get_manifest(artifact_id)
            if cached_copy_matches(target, manifest):
                return target
            log.warning(
                "cached copy of artifact %s does not match its manifest: fetching it again", artifact_id
            )
        manifest = self.download(artifact_id, target)
        # Imports and stage outputs reach the store without the upload's checks: a lying safetensors
        # header is refused here as INVALID_ARGUMENT, not left to the loader's SafetensorError.
        for entry in manifest.files:
            if entry.path.lower().endswith(".safetensors"):
                check_safetensors_header(target / entry.path, entry.path)
        return target

    # --- the recipe cache ---------------------------------------------------------------------
    def lookup_recipe(self, recipe: dict[str, Any]) -> Manifest | None:
        key = f"recipes/{recipe_key(recipe)}"
        if not self._exists(key):
            return None
        artifact_id = self._get_bytes(key).decode().strip()
        try:
            check_artifact_id(artifact_id)
        except InvalidArgument:
            log.warning("recipe index entry %s is not an artifact id: treated as a miss", key)
            return None
        if not self.exists(artifact_id):
            return None
        manifest = self.get_manifest(artifact_id)
        # An index entry can be rewritten: a hit counts only when the artifact says it was made by this
        # recipe (checkpoint pointers publish without a recipe and are taken as they are).
        if manifest.recipe and canonical_json(manifest.recipe) != canonical_json(recipe):
            log.warning(
                "recipe index entry %s names artifact %s of another recipe: treated as a miss",
                key,
                artifact_id,
            )
            return None
        # A hit is served instead of a run: its stored files are verified first (DATA_LOSS when corrupt).
        self.verify(artifact_id)
        return manifest

    def verify(self, artifact_id: str) -> Manifest:
        """Read and hash every stored file of the artifact; IntegrityError (DATA_LOSS) names a corrupt one."""
        manifest = self.get_manifest(artifact_id)
        for entry in manifest.files:
            for _ in self.iter_file(artifact_id, entry.path):
                pass
        return manifest

    def remember_recipe(self, recipe: dict[str, Any], artifact_id: str) -> None:
        self._put_bytes(f"recipes/{recipe_key(recipe)}", artifact_id.encode())

    # --- helpers ------------------------------------------------------------------------------
    def _entry(self, artifact_id: str, path: str):
        check_relative_path(path)
        manifest = self.get_manifest(artifact_id)
        try:
            return manifest.file(path)
        except KeyError:
            raise NotFound(f"artifact {artifact_id} has no file {path!r}") from None

    @staticmethod
    def _manifest_key(artifact_id: str) -> str:
        return f"artifacts/{artifact_id}/manifest.json"

    @staticmethod
    def _file_key(artifact_id: str, path: str) -> str:
        return f"artifacts/{artifact_id}/files/{path}"

    @staticmethod
    def _temp_name() -> str:
        return f".tmp-{uuid.uuid4().hex}"


def cached_copy_matches(folder: Path, manifest: Manifest) -> bool:
    """Every file of the manifest is in folder with its size and sha256, and nothing else is."""
    try:
        return set(scan_directory(folder)) == set(manifest.files)
    except (OSError, ValueError, InvalidArgument):  # unreadable, a symlink, an odd name: not a match
        return False


def open_store(url: str, **s3_options: Any) -> ArtifactStore:
    """Choose the backend by URL scheme: a path or file:// -> local directory; s3://bucket/prefix -> S3."""
    if url.startswith("s3://"):
        from tailor_runtime.store.s3 import S3Store

        return S3Store.from_url(url, **s3_options)
    from tailor_runtime.store.local import LocalStore

    path = url.removeprefix("file://")
    return LocalStore(Path(path))
