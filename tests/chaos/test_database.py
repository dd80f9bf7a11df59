"""The gateway's database under trouble: another process holding SQLite's write lock, two gateways on
one state, PostgreSQL stopped under a write and under a running pipeline. Real SQLite files, a real
PostgreSQL server, real processes and gRPC; no mocks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time

import grpc
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


class _PgControl:
    """Stop and start the test's PostgreSQL server (its data and port stay)."""

    def __init__(self, server: str):
        import os

        import psycopg

        with psycopg.connect(server, autocommit=True) as conn:
            self.data = conn.execute("SHOW data_directory").fetchone()[0]
        port = server.rsplit(":", 1)[1].split("/")[0]
        self.options = f"-p {port} -k {os.path.dirname(self.data)} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.pg_ctl = ["pg_ctl", "-D", self.data, "-w"]

    def _run(self, args: list[str]) -> None:
        from support.postgres import _as_server_user

        subprocess.run(_as_server_user([*self.pg_ctl, *args]), check=True, capture_output=True)

    def stop(self) -> None:
        self._run(["-m", "fast", "stop"])

    def start(self) -> None:
        self._run(["-o", self.options, "-l", f"{self.data}/../restart.log", "start"])


def test_a_postgresql_restart_delays_a_write_and_loses_nothing(tmp_path):
    from support.postgres import fresh_database, postgres_server

    with postgres_server() as server:
        store = st.StateStore(fresh_database(server))
        _pipeline(store, "p3")
        pg = _PgControl(server)
        pg.stop()

        async def main():
            write = asyncio.create_task(store.run(store.set_stage, "p3", "select", state=st.SUCCEEDED))
            await asyncio.sleep(3)  # the server is down: the write retries, the event loop goes on
            assert not write.done()
            await asyncio.to_thread(pg.start)
            await write

        asyncio.run(main())
        assert store.stages("p3")[0].state == st.SUCCEEDED
        store.close()


class _Worker:
    """One in-process gRPC server standing for the benchmarker and the selector: the pipeline's running
    benchmark operation finishes when the test says so (while the database is down); Select answers."""

    def __init__(self):
        from tailor.common.v1 import common_pb2_grpc
        from tailor.selector.v1 import selector_service_pb2_grpc

        self.finished = asyncio.Event()
        self.watches = self.selects = 0
        worker = self

        class Operations(common_pb2_grpc.OperationsServiceServicer):
            async def WatchOperation(self, request, context):
                from tailor.common.v1 import common_pb2 as common
                from tailor_runtime.operations import to_struct

                worker.watches += 1
                await worker.finished.wait()
                yield common.OperationEvent(
                    operation=common.Operation(
                        id=request.operation_id,
                        state=common.OPERATION_STATE_SUCCEEDED,
                        metrics=to_struct({"perplexity": 4.2, "size_mb": 1.0}),
                    )
                )

        class Selector(selector_service_pb2_grpc.SelectorServiceServicer):
            async def Select(self, request, context):
                from tailor.selector.v1 import selector_service_pb2 as select_pb

                worker.selects += 1
                return select_pb.SelectResponse(recommended_id="original", rationale="the only one")

        self.server = grpc.aio.server()
        common_pb2_grpc.add_OperationsServiceServicer_to_server(Operations(), self.server)
        selector_service_pb2_grpc.add_SelectorServiceServicer_to_server(Selector(), self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"


def test_a_stage_finishing_while_postgresql_is_down_past_the_retry_window_still_ends_the_pipeline(
    tmp_path, monkeypatch, caplog
):
    """D1: the benchmark finishes while the database is unreachable for longer than the state store's
    retry window; the driver pauses (nothing decided on what could not be recorded), drives the pipeline
    again from the durable state once the database is back, re-attaches to the finished operation (no
    second run), and the pipeline ends SUCCEEDED with the stage's measurements."""
    import logging

    import yaml
    from support.postgres import fresh_database, postgres_server

    from tailor_gateway import engine as engine_module
    from tailor_gateway.engine import Engine
    from tailor_gateway.spec import parse_spec, plan
    from tailor_gateway.workers import WorkerPools
    from tailor_runtime.store import open_store

    retry_s, outage_s = 1.5, 4.0  # the outage is well past the retry window
    monkeypatch.setattr(engine_module, "REDRIVE_AFTER_S", 0.5)
    caplog.set_level(logging.WARNING, logger="tailor.gateway.engine")
    spec_yaml = yaml.safe_dump(
        {"name": "outage", "model": {"artifact": "a" * 64}, "data": {"eval": {"artifact": "b" * 64}}}
    )

    with postgres_server() as server:
        state = st.StateStore(fresh_database(server))
        state.db.retry_s = retry_s
        pg = _PgControl(server)

        async def main():
            worker = _Worker()
            await worker.server.start()
            # A pipeline whose benchmark was dispatched and recorded (as a driver leaves it), then driven.
            now = time.time()
            p = st.PipelineRow("p-pg", "proj", "outage", spec_yaml, st.RUNNING, now, now)
            stages = [
                st.StageRow(p.id, s.name, s.kind, i, s.depends_on, s.params)
                for i, s in enumerate(plan(parse_spec(spec_yaml)))
            ]
            await state.run(state.create_pipeline, p, stages)
            await state.run(
                state.set_stage,
                p.id,
                "benchmark/original",
                state=st.RUNNING,
                operation_id="op-1",
                worker=worker.address,
                attempts=1,
            )
            pools = WorkerPools({"benchmarker": [worker.address], "selector": [worker.address]})
            engine = Engine(state, pools, open_store(str(tmp_path / "store")))
            try:
                assert await engine.resume_now() == 1
                while worker.watches == 0:  # the driver follows the operation
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(pg.stop)
                down = time.monotonic()
                worker.finished.set()  # the stage ends while nothing can be recorded
                await asyncio.sleep(outage_s)
                await asyncio.to_thread(pg.start)
                outage = time.monotonic() - down
                for _ in range(600):  # bounded: 30 s
                    row = await state.run(state.get_pipeline, p.id)
                    if row.state in st.TERMINAL:
                        break
                    await asyncio.sleep(0.05)
                return row, outage, worker.watches, worker.selects
            finally:
                await engine.shutdown()
                await pools.close()
                await worker.server.stop(None)

        # The retry window ran out during the outage: the driver paused (no wall-clock assertion here).
        row, _outage, watches, selects = asyncio.run(main())
        assert any("pipeline paused" in r.getMessage() for r in caplog.records)
        assert row.state == st.SUCCEEDED, (row.error_code, row.error_message)
        by_name = {s.name: s for s in state.stages("p-pg")}
        bench = by_name["benchmark/original"]
        # Re-attached to the finished operation after the outage, never dispatched again.
        assert bench.state == st.SUCCEEDED and bench.attempts == 1 and bench.operation_id == "op-1"
        assert bench.metrics["perplexity"] == 4.2 and watches >= 2
        assert selects == 1 and by_name["report"].state == st.SUCCEEDED and row.report["id"]
        state.close()
