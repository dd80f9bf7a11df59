"""The operation runner: success, failure codes, cancellation, busy workers, the recipe cache."""

import asyncio
import threading
import time

import grpc
import pytest

from tailor.common.v1 import common_pb2 as common
from tailor_runtime.errors import InvalidArgument, NotFound, WorkerBusy
from tailor_runtime.operations import OperationRunner, WorkResult
from tailor_runtime.store.local import LocalStore

S = common.OperationState


def _publish(store, tmp_path, text="x"):
    folder = tmp_path / f"out-{text}"
    folder.mkdir()
    (folder / "weights.safetensors").write_text(text)
    return store.publish_directory(folder, kind="model", format="hf-safetensors")


async def _final(runner, op_id):
    last = None
    async for snap in runner.watch(op_id):
        last = snap
    return last


def test_success_failure_and_codes(tmp_path):
    store = LocalStore(tmp_path / "store")

    async def scenario():
        runner = OperationRunner("test", store, max_operations=2)

        def good(progress):
            progress(50, "working", "half")
            return WorkResult([_publish(store, tmp_path)], {"bytes": 1})

        def bad(progress):
            raise InvalidArgument("no good", choices=["a", "b"])

        def crash(progress):
            raise RuntimeError("secret stack detail")

        ok = await _final(runner, runner.start("t", good).id)
        assert ok.state == S.OPERATION_STATE_SUCCEEDED and ok.results[0].kind == "model"
        assert ok.metrics["bytes"] == 1
        failed = await _final(runner, runner.start("t", bad).id)
        assert failed.state == S.OPERATION_STATE_FAILED
        assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "valid choices: a, b" in failed.error.message
        crashed = await _final(runner, runner.start("t", crash).id)
        assert crashed.error.code == grpc.StatusCode.INTERNAL.value[0]
        assert "secret stack detail" not in crashed.error.message

    asyncio.run(scenario())


def test_cancel_stops_work_and_publishes_nothing(tmp_path):
    store = LocalStore(tmp_path / "store")
    published = []

    async def scenario():
        runner = OperationRunner("test", store)
        started = threading.Event()

        def slow(progress):
            started.set()
            for i in range(200):
                progress(i / 2, "loop")
                time.sleep(0.02)
            published.append(_publish(store, tmp_path))
            return WorkResult(published)

        op = runner.start("t", slow)
        await asyncio.to_thread(started.wait, 5)
        runner.cancel(op.id)
        final = await _final(runner, op.id)
        assert final.state == S.OPERATION_STATE_CANCELLED
        assert not published and store.list_manifests() == []

    asyncio.run(scenario())


def test_busy_worker_refuses_and_cache_answers(tmp_path):
    store = LocalStore(tmp_path / "store")

    async def scenario():
        runner = OperationRunner("test", store, max_operations=1)
        gate = threading.Event()
        recipe = {"stage": "quantize", "method": "m", "inputs": ["x"]}

        def blocked(progress):
            gate.wait(5)
            return WorkResult([_publish(store, tmp_path, "cached")])

        first = runner.start("t", blocked, recipe=recipe)
        with pytest.raises(WorkerBusy):
            runner.start("t", blocked)
        gate.set()
        done = await _final(runner, first.id)
        assert done.state == S.OPERATION_STATE_SUCCEEDED
        again = runner.start("t", lambda p: pytest.fail("must not run"), recipe=recipe)
        assert again.cached and again.state == S.OPERATION_STATE_SUCCEEDED
        assert again.results[0].id == done.results[0].id

    asyncio.run(scenario())


def test_operations_are_scoped_to_the_project_that_started_them(tmp_path):
    store = LocalStore(tmp_path / "store")
    release = threading.Event()

    def slow(progress):
        while not release.wait(0.05):
            progress(10, "waiting")
        return WorkResult([_publish(store, tmp_path)])

    async def scenario():
        runner = OperationRunner("test", store, max_operations=2, require_project=True)
        a = runner.start("quantize", slow, project="team-a")
        with pytest.raises(InvalidArgument, match="names no project"):
            runner.start("quantize", slow, project="")
        assert [o.id for o in runner.list("team-a")] == [a.id]
        assert runner.list("team-b") == [] and runner.list("") == []
        for project in ("team-b", ""):
            with pytest.raises(NotFound):
                runner.snapshot(a.id, project)
            with pytest.raises(NotFound):
                runner.cancel(a.id, project)
            with pytest.raises(NotFound):
                async for _ in runner.watch(a.id, project):
                    pass
        assert runner.snapshot(a.id, "team-a").state != S.OPERATION_STATE_CANCELLED  # B's cancel did nothing
        runner.cancel(a.id, "team-a")
        release.set()
        final = await _final(runner, a.id)
        assert final.state == S.OPERATION_STATE_CANCELLED

    asyncio.run(scenario())
