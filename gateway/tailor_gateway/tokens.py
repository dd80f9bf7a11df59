"""API tokens: the file of '<sha256> <project>' lines (re-read when it changes), and the cache of
verified tokens that keeps the gateway's per-request check off the database."""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from pathlib import Path


class TokenFile:
    def __init__(self, path: Path):
        self.path = path
        self._mtime = -1.0
        self._hashes: dict[str, str] = {}

    def hashes(self) -> dict[str, str]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if mtime != self._mtime:
            entries = {}
            for line in self.path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.startswith("#"):
                    entries[parts[0]] = parts[1]
            self._hashes, self._mtime = entries, mtime
        return self._hashes


def issue_token(path: Path, project: str = "default") -> str:
    """Create a token for project, append its hash to the file, return the token (shown once)."""
    token = "tlr_" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(f"{hashlib.sha256(token.encode()).hexdigest()} {project}\n")
    os.chmod(path, 0o600)
    return token


# How long a verified token is trusted without reading the database again. Bounds how late a revocation
# takes effect where nothing tells this process about it: revoked through PostgreSQL by another process,
# or by hand in SQL. Revocations through Access.revoke_token take effect at once in the revoking process
# and, on SQLite, in every process on the same file (the marker below).
TOKEN_CACHE_TTL_S = 5.0


class VerifiedTokens:
    """Principals of recently verified tokens, keyed by the token's sha256 (never the token): lets the
    gateway admit a caller on its event loop without a database read (issue 23).

    `marker` is a file every process on the same database can stat (Database.sidecar): a revocation
    replaces it, and a changed stat empties every cache on the next lookup. A database read that began
    before a revocation never stores its (stale) answer: `put` takes the version seen before the read.
    """

    def __init__(self, marker: Path | None, ttl_s: float = TOKEN_CACHE_TTL_S, clock=time.monotonic):
        self.marker, self.ttl_s, self.clock = marker, ttl_s, clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._marker_seen = self._marker_stat()
        self._invalidations = 0

    def version(self) -> tuple:
        """Take before reading the database; hand to put()."""
        marker = self._marker_stat()
        with self._lock:
            return marker, self._invalidations

    def get(self, digest: str) -> tuple[object, bool] | None:
        """(principal, due) for a token verified under TTL ago, else None. `due` (once per entry, past
        half the TTL) asks the caller for a re-read in the background, so a busy token is never read
        inline."""
        marker = self._marker_stat()
        with self._lock:
            if marker != self._marker_seen:
                self._entries.clear()
                self._marker_seen = marker
                return None
            entry = self._entries.get(digest)
            if entry is None:
                return None
            age = self.clock() - entry.verified
            if age >= self.ttl_s:
                del self._entries[digest]
                return None
            due = age >= self.ttl_s / 2 and not entry.refreshing
            entry.refreshing = entry.refreshing or due
            return entry.principal, due

    def put(self, digest: str, principal: object, version: tuple) -> None:
        with self._lock:
            if version == (self._marker_seen, self._invalidations):
                self._entries[digest] = _Entry(principal, self.clock())

    def forget(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)

    def invalidate(self) -> None:
        """Empty this process's cache and tell every other process on the same file."""
        with self._lock:
            self._entries.clear()
            self._invalidations += 1
        if self.marker is not None:
            # A new file (new inode) rather than a rewrite: its stat differs even within one mtime tick.
            tmp = self.marker.with_name(f"{self.marker.name}.{os.getpid()}.tmp")
            tmp.write_text(f"{time.time_ns()}\n")
            os.replace(tmp, self.marker)

    def _marker_stat(self) -> tuple | None:
        if self.marker is None:
            return None
        try:
            st = os.stat(self.marker)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size


class _Entry:
    __slots__ = ("principal", "verified", "refreshing")

    def __init__(self, principal: object, verified: float):
        self.principal, self.verified, self.refreshing = principal, verified, False
