"""`tailor up` as a user runs it (a real process and its six services): one stack per state directory,
refusals that say why, `tailor status` and `tailor down`, and no service left behind when `tailor up`
dies by SIGHUP (the terminal closed) or SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailor_cli.stack import free_base_port, health_status, running_stack

pytestmark = pytest.mark.integration
READY_TIMEOUT_S = 300  # six Python services importing torch on a loaded 2-core machine


def _cli(state: Path, *argv: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TAILOR_STATE_DIR": str(state)}
    return subprocess.run(
        [sys.executable, "-m", "tailor_cli.main", *argv], env=env, capture_output=True, text=True, **kw
    )


def _up(state: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "TAILOR_STATE_DIR": str(state)}
    log = open(state.parent / f"{state.name}-up.log", "w")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailor_cli.main", "up", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        info = running_stack(state)
        if info and all(health_status(a) == "SERVING" for a in [info["gateway"], *info["services"].values()]):
            return proc
        assert proc.poll() is None, (state.parent / f"{state.name}-up.log").read_text()[-3000:]
        time.sleep(1)
    proc.kill()
    raise AssertionError("the stack did not become healthy")


def _gone(pids: list[int], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
            return True
        time.sleep(0.5)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"  # gone meanwhile


def test_one_stack_per_state_dir_refusals_status_and_down(tmp_path):
    state, port = tmp_path / "state", free_base_port()
    up = _up(state, port)
    try:
        pids = list(json.loads((state / "stack.json").read_text())["pids"].values())
        again = _cli(state, "up", "--port", str(port))
        assert again.returncode != 0 and "already running from" in again.stdout + again.stderr
        other = _cli(tmp_path / "other", "up", "--port", str(port))
        out = other.stdout + other.stderr
        assert other.returncode != 0 and f"port {port} (gateway)" in out and "--port" in out, out
        assert "Traceback" not in out
        status = _cli(state, "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["health"]["gateway"] == "SERVING"
        down = _cli(state, "down")
        assert down.returncode == 0 and "stopped the local stack" in down.stdout, down.stdout + down.stderr
        assert up.wait(timeout=60) == 0
        assert _gone(pids) and not (state / "stack.json").exists()
        assert _cli(state, "status").returncode != 0  # nothing running now, and it says so
    finally:
        if up.poll() is None:
            up.kill()


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])
def test_no_service_outlives_tailor_up(tmp_path, signum):
    state = tmp_path / "state"
    up = _up(state, free_base_port())
    pids = list(json.loads((state / "stack.json").read_text())["pids"].values())
    up.send_signal(signum)
    up.wait(timeout=60)
    assert _gone(pids), [p for p in pids if Path(f"/proc/{p}").exists()]
    # After a SIGKILL stack.json is left behind; it is recognised as stale and nothing claims to run.
    assert running_stack(state) is None and not (state / "stack.json").exists()
