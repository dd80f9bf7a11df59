"""Fixtures shared by every test suite. Keep each concern in its own section; put the logic in tests/support/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# tests/ is on sys.path (pytest's rootdir-relative conftest import), so `support` is importable.
from support.s3_server import S3Server, s3_server_session

# --- S3 (Ceph RGW or TAILOR_TEST_S3_ENDPOINT) ------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server for the whole session: endpoint, access_key, secret_key."""
    yield from s3_server_session()
