"""A real S3 server for the tests: Ceph RADOS Gateway started by tools/s3-ceph-up.sh, or an external one.

Set TAILOR_TEST_S3_ENDPOINT (+ TAILOR_TEST_S3_ACCESS_KEY / TAILOR_TEST_S3_SECRET_KEY) to test against
a server you run yourself (MinIO, AWS); otherwise one Ceph RGW is started per test session on free
ports in a temp dir and stopped at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CEPH_SCRIPT = REPO / "tools" / "s3-ceph-up.sh"
START_TIMEOUT_S = 180
CEPH_TOOLS = ("radosgw", "radosgw-admin", "ceph-mon", "ceph-osd", "ceph", "monmaptool")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    started_in_s: float = 0.0  # how long the server took to start (0 for an external one)
    state_dir: Path | None = None  # the Ceph cluster's folder (None for an external server)

    def client(self, secret_key: str | None = None):
        """A plain boto3 client, for tests that reach past the store (corrupting a blob, say)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )


def _log_tails(state_dir: Path, lines: int = 15) -> str:
    tails = []
    for log in sorted((state_dir / "log").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails)


def start_ceph_rgw(state_dir: Path, access_key: str, secret_key: str) -> S3Server:
    """Start Ceph RGW in state_dir; on any failure stop what did start and fail with the logs."""
    missing = [tool for tool in CEPH_TOOLS if shutil.which(tool) is None]
    if missing:
        # A failure, not a skip: a suite that silently skips its S3 tests proves nothing.
        pytest.fail(
            f"{', '.join(missing)} not found on PATH: the S3 integration tests need Ceph RGW; run "
            "`make system-deps` (as root) or point TAILOR_TEST_S3_ENDPOINT at an S3 server",
            pytrace=False,
        )
    rgw_port, mon_port = free_port(), free_port()
    env = {**os.environ, "RGW_PORT": str(rgw_port), "MON_PORT": str(mon_port)}
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["bash", str(CEPH_SCRIPT), "start", str(state_dir), access_key, secret_key],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        stop_ceph_rgw(state_dir)
        pytest.fail(f"Ceph RGW did not start in {START_TIMEOUT_S} s\n{_log_tails(state_dir)}", pytrace=False)
    if result.returncode != 0:
        stop_ceph_rgw(state_dir)
        pytest.fail(
            f"tools/s3-ceph-up.sh failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
            f"{_log_tails(state_dir)}",
            pytrace=False,
        )
    return S3Server(
        endpoint=f"http://127.0.0.1:{rgw_port}",
        access_key=access_key,
        secret_key=secret_key,
        started_in_s=round(time.monotonic() - started, 1),
        state_dir=state_dir,
    )


def stop_ceph_rgw(state_dir: Path) -> None:
    subprocess.run(["bash", str(CEPH_SCRIPT), "stop", str(state_dir)], capture_output=True, timeout=60)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie no longer serves (RGW is not our child: nobody may reap it)


def stop_rgw(server: S3Server, timeout: float = 10.0) -> None:
    """An S3 outage: stop only the RADOS Gateway. The monitor and the OSD (which holds the data, in
    memory) keep running, so start_rgw() brings back the same objects."""
    if server.state_dir is None:
        pytest.skip("an external S3 server (TAILOR_TEST_S3_ENDPOINT) cannot be stopped by the tests")
    pid = int((server.state_dir / "run" / "rgw.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += timeout
        time.sleep(0.1)


def start_rgw(server: S3Server, timeout: float = 60.0) -> None:
    """Start the RADOS Gateway stopped by stop_rgw() again; return once S3 answers."""
    if server.state_dir is None:
        pytest.skip("an external S3 server (TAILOR_TEST_S3_ENDPOINT) cannot be started by the tests")
    pid_file = server.state_dir / "run" / "rgw.pid"
    if pid_file.exists() and not _gone(int(pid_file.read_text().strip() or 0)):
        return  # already running
    env = {**os.environ, "CEPH_CONF": str(server.state_dir / "ceph.conf")}
    subprocess.run(
        ["radosgw", "-n", "client.rgw", "--pid-file", str(pid_file)],
        cwd=server.state_dir,
        env=env,
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.client().list_buckets()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def s3_server_session() -> Iterator[S3Server]:
    """Body of the session fixture `s3_server` (see tests/conftest.py)."""
    endpoint = os.environ.get("TAILOR_TEST_S3_ENDPOINT")
    if endpoint:
        yield S3Server(
            endpoint=endpoint,
            access_key=os.environ.get("TAILOR_TEST_S3_ACCESS_KEY", ""),
            secret_key=os.environ.get("TAILOR_TEST_S3_SECRET_KEY", ""),
            region=os.environ.get("TAILOR_TEST_S3_REGION", "us-east-1"),
        )
        return
    # A short path: Ceph's admin sockets live in it and Unix socket paths stop at 107 bytes.
    state_dir = Path(tempfile.mkdtemp(prefix="tailor-rgw-"))
    try:
        yield start_ceph_rgw(state_dir, access_key="TAILORTESTKEY", secret_key="tailor-test-secret-1234")
    finally:
        stop_ceph_rgw(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
