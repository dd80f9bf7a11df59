"""One real local stack for the web tests, with its web front (`python -m tailor_web`, started by the
Stack as `tailor up` starts it), reached over HTTP only."""

from __future__ import annotations

import httpx
import pytest
from support.remote_stack import started_stack


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory):
    with started_stack(tmp_path_factory.mktemp("web-stack"), first_port=53000) as stack:
        yield stack


@pytest.fixture(scope="session")
def http(web_stack) -> httpx.Client:
    # trust_env off: a proxy from the environment must not see the local stack's tokens.
    with httpx.Client(base_url=web_stack.web_url, timeout=300, trust_env=False) as client:
        yield client
