"""A Hugging Face Hub cache written the way huggingface_hub lays it out, for offline tests of the Hub path.

    <cache>/models--<org>--<name>/blobs/<sha256 of the file>       the bytes, once per content
    <cache>/models--<org>--<name>/refs/<revision>                  the commit sha (no newline)
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>        relative symlink into blobs/

huggingface_hub's own `snapshot_download` / `hf_hub_download` then read it with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def commit_of(folder: Path) -> str:
    """A deterministic 40-hex "commit" for a folder's content (what the Hub's git sha would be)."""
    digest = hashlib.sha1()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def write_hub_cache(
    cache: Path, repo: str, folder: Path, revision: str = "main", commit: str | None = None
) -> str:
    """Put every file of `folder` into `cache` as repo@revision; returns the commit sha."""
    commit = commit or commit_of(folder)
    storage = Path(cache) / ("models--" + repo.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    snapshot = storage / "snapshots" / commit
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs" / revision).write_text(commit)
    return commit
