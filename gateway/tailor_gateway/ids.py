"""Ids as git takes them: any unique prefix of at least 8 hex characters stands for the whole id.

Pipelines (32 hex) and artifacts (64 hex) are looked up within the caller's project only, so a prefix
never reveals another project's objects; two matches are refused with both shown, so that the caller
can add characters.
"""

from __future__ import annotations

import re

from tailor_runtime.errors import InvalidArgument, NotFound

MIN_PREFIX = 8
PIPELINE_ID_LENGTH = 32  # uuid4().hex (engine.py)
ARTIFACT_ID_LENGTH = 64  # sha256 of the manifest
_HEX = re.compile(r"^[0-9a-f]+$")


def resolve(given: str, full_length: int, what: str, matches) -> str:
    """`given` when it is a whole id; else the one id of the project starting with it.

    `matches(prefix, limit)` returns up to `limit` ids of the caller's project that start with the prefix."""
    if len(given) == full_length:
        return given
    if not given or len(given) > full_length or not _HEX.match(given):
        raise InvalidArgument(
            f"{what} id {given!r} is not an id: give the whole id ({full_length} hex characters) or a "
            f"unique prefix of {MIN_PREFIX} or more"
        )
    if len(given) < MIN_PREFIX:
        raise InvalidArgument(
            f"{what} id prefix {given!r} is too short: give {MIN_PREFIX} or more of its hex characters"
        )
    found = matches(given, 2)
    if not found:
        raise NotFound(f"no {what} of this project has an id starting with {given}")
    if len(found) > 1:
        raise InvalidArgument(
            f"{what} id prefix {given} is ambiguous ({', '.join(found)} ...): give more characters"
        )
    return found[0]


def prefix_pattern(prefix: str) -> str:
    """The LIKE pattern for ids starting with `prefix` (hex only, checked by resolve: no wildcards in it)."""
    return prefix + "%"
