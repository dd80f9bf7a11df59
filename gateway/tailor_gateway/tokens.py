"""API tokens: only their sha256 is stored, one '<hash> <project>' per line; re-read when it changes."""

from __future__ import annotations

import hashlib
import os
import secrets
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
