"""The helm fixture of tests/deploy (helpers: deploy_support.py)."""

from __future__ import annotations

import pytest
from deploy_support import render_tool


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary. Missing helm fails (never skips): the chart must be checked in CI."""
    try:
        return render_tool().helm_binary()
    except SystemExit as exc:
        pytest.fail(f"{exc}. The chart tests need helm 3.6.2: run `make system-deps`.")
