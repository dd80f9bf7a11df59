"""A real PostgreSQL server for tests: its own cluster in a temp dir, on a free port, stopped afterwards.

Needs initdb, pg_ctl and postgres on PATH (PostgreSQL 15 on the CI image). A missing binary FAILS the
test with what to install: PostgreSQL support is tested for real, never skipped. As root, the server
runs as an unprivileged user (postgres refuses to run as root), created here if needed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from support.ports import free_port

USER = "tailorpg"


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", USER], check=True)
    return ["runuser", "-u", USER, "--", *cmd]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a postgresql:// URL of a fresh, empty cluster."""
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if shutil.which(b) is None]
    if missing:
        pytest.fail(
            f"PostgreSQL server binaries not on PATH: {', '.join(missing)}; install PostgreSQL 15 "
            "(apt-get install postgresql-15, then put /usr/lib/postgresql/15/bin on PATH)"
        )
    root = tempfile.mkdtemp(prefix="tailor-pg-")
    data = os.path.join(root, "data")
    if os.geteuid() == 0:
        _as_server_user(["true"])  # creates the user
        shutil.chown(root, USER)
    port = free_port()
    run = dict(check=True, capture_output=True, text=True)
    try:
        subprocess.run(_as_server_user(["initdb", "-D", data, "-A", "trust", "-U", "tailor", "-N"]), **run)
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(root, "server.log")
        subprocess.run(
            _as_server_user(["pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "start"]), **run
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.cmd}: {exc.stderr or exc.stdout}")
    try:
        yield f"postgresql://tailor@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_server_user(["pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new empty database on the server: each test gets its own."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name
