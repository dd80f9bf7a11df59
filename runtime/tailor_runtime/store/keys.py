"""Validation of every artifact id and file path that reaches the store from a request."""

from __future__ import annotations

import posixpath
import re

from tailor_runtime.errors import InvalidArgument

_ARTIFACT_ID = re.compile(r"^[0-9a-f]{64}$")
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._+=@-]+$")
# Linux's NAME_MAX per segment; the whole path is kept well under PATH_MAX once under a store root.
MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 1024


def check_artifact_id(artifact_id: str) -> str:
    if not _ARTIFACT_ID.fullmatch(artifact_id or ""):
        raise InvalidArgument(
            f"artifact id {artifact_id!r} is not valid: expected 64 lowercase hex characters (a sha256)"
        )
    return artifact_id


def check_relative_path(path: str) -> str:
    """A file path inside an artifact: relative, forward slashes, no '..', no empty or odd segments."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise InvalidArgument(f"file path {path!r} must be relative, with forward slashes")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(f"file path {path[:64]!r}... is longer than {MAX_PATH_BYTES} bytes")
    normalized = posixpath.normpath(path)
    if normalized != path:
        raise InvalidArgument(f"file path {path!r} is not normalized (expected {normalized!r})")
    for segment in path.split("/"):
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise InvalidArgument(
                f"file path {path[:64]!r}... has a name longer than {MAX_SEGMENT_BYTES} bytes"
            )
        if segment in ("", ".", "..") or not _SAFE_SEGMENT.fullmatch(segment):
            raise InvalidArgument(
                f"file path {path!r} has a bad segment {segment!r}: use letters, digits and . _ + = @ -"
            )
    return path
