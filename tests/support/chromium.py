"""Headless Debian Chromium for the browser tests: a fresh profile per run, nothing fetched, no sandbox
(CI runs as root, where Chromium's sandbox cannot start)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    # A failure, not a skip: a page nobody opened in a browser is not tested.
    pytest.fail("chromium not found on PATH: run `make system-deps` (as root)", pytrace=False)


def run_chromium(url: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="tailor-chromium-") as profile:
        result = subprocess.run(
            [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if result.returncode != 0:
        pytest.fail(f"chromium exited with {result.returncode}:\n{result.stderr[-3000:]}", pytrace=False)
    return result
