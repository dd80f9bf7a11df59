"""The gateway's database under trouble: another process holding SQLite's write lock, and two gateways
on one state. Real SQLite files, real processes; no mocks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from tailor_gateway import state as st

pytestmark = pytest.mark.integration


def _pipeline(store: st.StateStore, pipeline_id: str) -> None:
    now = time.time()
    row = st.PipelineRow(pipeline_id, "proj", "p", "name: p", st.RUNNING, now, now)
    store.create_pipeline(row, [st.StageRow(pipeline_id, "select", "select", 0, [], {})])


def test_a_held_write_lock_delays_writes_and_reads_keep_answering(tmp_path):
    store = st.StateStore(tmp_path / "gateway.db")
    _pipeline(store, "p1")
    locked, release = threading.Event(), threading.Event()

    def hold_lock():  # another process's transaction (the tokens CLI, an operator's sqlite3 shell)
        other = sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait(5)

    async def main():
        write = asyncio.create_task(store.run(store.set_stage, "p1", "select", state=st.SUCCEEDED))
        # While the write waits for the lock, the event loop and reads go on.
        read = await store.run(store.get_pipeline, "p1")
        assert read is not None and not write.done()
        await asyncio.sleep(2.5)  # longer than SQLite's busy timeout: only the retry loop waits this long
        assert not write.done()
        release.set()
        await write

    asyncio.run(main())
    holder.join()
    assert store.stages("p1")[0].state == st.SUCCEEDED


def test_a_finished_pipeline_is_never_rewritten(tmp_path):
    store = st.StateStore(tmp_path / "gateway.db")
    _pipeline(store, "p2")
    store.set_pipeline("p2", state=st.CANCELLED, error_message="cancelled by the user")
    store.set_pipeline("p2", state=st.FAILED, error_message="stage x failed")  # a late driver
    assert store.get_pipeline("p2").state == st.CANCELLED


def _second_gateway_stands_by_until_the_first_stops(state: str) -> None:
    """A second gateway process on `state` (an SQLite path or a postgresql:// URL) waits while the first
    holds it, and becomes the active one once the first stops."""
    first = st.StateStore(state)
    first.hold_exclusive()
    code = (
        "from tailor_gateway.state import StateStore; "
        f"s = StateStore({state!r}); s.hold_exclusive(); print('active', flush=True)"
    )
    second = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            second.wait(timeout=4)  # standing by: the lock is the first gateway's
        first.close()  # the first gateway stops (its flock / its session lock's connection goes)
        out, _ = second.communicate(timeout=30)
        assert out.strip() == "active" and second.returncode == 0
    finally:
        if second.poll() is None:
            second.kill()


def test_a_second_gateway_stands_by_until_the_first_stops(tmp_path):
    _second_gateway_stands_by_until_the_first_stops(str(tmp_path / "gateway.db"))


def test_a_second_gateway_on_postgresql_stands_by_until_the_first_stops():
    # D2 on the cluster's database: the session advisory lock, held on a connection of its own.
    from support.postgres import fresh_database, postgres_server

    with postgres_server() as server:
        _second_gateway_stands_by_until_the_first_stops(fresh_database(server))


def test_a_postgresql_restart_delays_a_write_and_loses_nothing(tmp_path):
    import os

    import psycopg
    from support.postgres import _as_server_user, fresh_database, postgres_server

    with postgres_server() as server:
        store = st.StateStore(fresh_database(server))
        _pipeline(store, "p3")
        with psycopg.connect(server, autocommit=True) as conn:
            data = conn.execute("SHOW data_directory").fetchone()[0]
        port = server.rsplit(":", 1)[1].split("/")[0]
        options = f"-p {port} -k {os.path.dirname(data)} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = ["pg_ctl", "-D", data, "-w"]
        subprocess.run(_as_server_user([*pg_ctl, "-m", "fast", "stop"]), check=True, capture_output=True)

        async def main():
            write = asyncio.create_task(store.run(store.set_stage, "p3", "select", state=st.SUCCEEDED))
            await asyncio.sleep(3)  # the server is down: the write retries, the event loop goes on
            assert not write.done()
            start = [*pg_ctl, "-o", options, "-l", f"{data}/../restart.log", "start"]
            await asyncio.to_thread(subprocess.run, _as_server_user(start), check=True, capture_output=True)
            await write

        asyncio.run(main())
        assert store.stages("p3")[0].state == st.SUCCEEDED
        store.close()
