"""The operation runner: long work in a worker thread, with progress, cancellation and watchers.

A servicer calls `runner.start(kind, work, ...)` and returns the operation at once. `work` gets a
ProgressFn; calling it after a cancel raises Cancelled, so work stops at its next report. Work
publishes its artifacts only at its very end, so a failed or cancelled operation publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from opentelemetry import trace

from tailor.common.v1 import common_pb2 as common
from tailor_runtime.errors import (
    Cancelled,
    InvalidArgument,
    NotFound,
    TailorError,
    WorkerBusy,
    is_out_of_memory,
)
from tailor_runtime.interceptors import current_principal
from tailor_runtime.logs import bind
from tailor_runtime.store import ArtifactStore, Manifest
from tailor_runtime.telemetry import OPERATIONS, STAGE_SECONDS, tracer

log = logging.getLogger("tailor.operations")
S = common.OperationState
TERMINAL = {S.OPERATION_STATE_SUCCEEDED, S.OPERATION_STATE_FAILED, S.OPERATION_STATE_CANCELLED}
# Finished operations kept for Get/Watch; older ones are forgotten first.
KEEP_FINISHED = 500
_LOOK_UP = object()  # start(): no recipe-cache answer given, look it up here


@dataclass
class WorkResult:
    results: list[Manifest]
    metrics: dict[str, Any] = field(default_factory=dict)
    cached: bool = False


Work = Callable[[Callable[..., None]], WorkResult]


def to_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(_jsonable(values))
    return struct


def _free_accelerator_memory() -> None:
    """Return cached GPU memory after an out-of-memory failure (only if torch is already loaded)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    return str(value)


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class _Record:
    def __init__(self, op: common.Operation, project: str):
        self.op = op
        self.project = project  # only calls for this project see the operation
        self.cancel = threading.Event()
        self.started = time.monotonic()
        self.method = op.labels.get("method", "")


class OperationRunner:
    def __init__(
        self,
        service: str,
        store: ArtifactStore,
        max_operations: int = 1,
        fake_work: str = "",
        fake_work_seconds: float = 0.0,
        require_project: bool = False,
    ):
        self.service = service
        # With authenticated callers (serve() sets it): every operation belongs to the project the
        # gateway named, and a call without a project sees none.
        self.require_project = require_project
        # Set when the worker starts shutting down: work that can checkpoint does so at once.
        self.draining = threading.Event()
        # TEST MODE only (TAILOR_FAKE_WORK): see fake_work.py.
        self.fake_work, self.fake_work_seconds = fake_work, fake_work_seconds
        self.store = store
        self.max_operations = max_operations
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future] = set()

    # --- starting -------------------------------------------------------------------------------
    def start(
        self,
        kind: str,
        work: Work,
        *,
        labels: dict[str, str] | None = None,
        recipe: dict[str, Any] | None = None,
        project: str | None = None,
        cached: Any = _LOOK_UP,
    ) -> common.Operation:
        """Begin work in a thread; a recipe already in the store's cache finishes at once, cached.
        The operation belongs to `project` (default: the caller's, as the auth check found it).
        `cached`: the recipe-cache answer when the caller looked it up already (`start_async`)."""
        project = current_principal.get() if project is None else project
        if self.require_project and not project:
            raise InvalidArgument(
                f"the call names no project: {self.service} operations belong to a project, which the "
                "gateway sends as 'x-tailor-project' metadata"
            )
        self._loop = asyncio.get_running_loop()
        recipe = self._recipe(recipe)  # idempotent: start_async may have marked it already
        if self.fake_work:
            from tailor_runtime import fake_work

            work = fake_work.fake_work(kind, labels or {}, recipe, self.store, self.fake_work_seconds)
        if self._changed is None:
            self._changed = asyncio.Event()
        op = common.Operation(
            id=uuid.uuid4().hex,
            kind=kind,
            state=S.OPERATION_STATE_PENDING,
            create_time=_now(),
            update_time=_now(),
            labels=labels or {},
        )
        record = _Record(op, project)
        if cached is _LOOK_UP:
            cached = self.store.lookup_recipe(recipe) if recipe else None
        with self._lock:
            if cached is None and self.active_count() >= self.max_operations:
                raise WorkerBusy(
                    f"{self.service} worker is busy ({self.active_count()} of {self.max_operations} "
                    "operations running); retry later or on another worker"
                )
            self._records[op.id] = record
            self._forget_old()
        if cached is not None:
            # The manifest's own metrics (deterministic ones) stand in for the run that did not happen.
            self._finish(
                record, WorkResult(results=[cached], metrics=dict(cached.metrics), cached=True), None
            )
            return self._copy(record)
        OPERATIONS.labels(self.service, kind, "RUNNING").inc()
        ctx = contextvars.copy_context()
        future = self._loop.run_in_executor(None, ctx.run, self._run, record, work, recipe)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)
        return self._copy(record)

    async def start_async(
        self,
        kind: str,
        work: Work,
        *,
        labels: dict[str, str] | None = None,
        recipe: dict[str, Any] | None = None,
        project: str | None = None,
    ) -> common.Operation:
        """`start` for servicers: the recipe-cache lookup re-hashes every file of a cached artifact
        (seconds for a 7B model), so it runs in a thread and the event loop keeps answering meanwhile."""
        recipe = self._recipe(recipe)
        cached = await asyncio.to_thread(self.store.lookup_recipe, recipe) if recipe else None
        return self.start(kind, work, labels=labels, recipe=recipe, project=project, cached=cached)

    def _recipe(self, recipe: dict[str, Any] | None) -> dict[str, Any] | None:
        """The recipe the cache is keyed by: in test mode, marked fake (fake_work.py)."""
        if not self.fake_work:
            return recipe
        from tailor_runtime import fake_work

        return fake_work.fake_recipe(recipe)

    def active_count(self) -> int:
        return sum(1 for r in self._records.values() if r.op.state not in TERMINAL)

    def _run(self, record: _Record, work: Work, recipe: dict | None) -> None:
        op = record.op
        bind(operation_id=op.id, **{k: v for k, v in op.labels.items() if k in ("pipeline_id", "stage")})
        with tracer().start_as_current_span(f"{self.service} operation {op.kind}") as span:
            span.set_attribute("tailor.operation_id", op.id)
            self._update(record, state=S.OPERATION_STATE_RUNNING)

            def progress(percent: float, phase: str = "", message: str = "", **metrics: float) -> None:
                if record.cancel.is_set():
                    raise Cancelled("operation cancelled")
                self._update(record, progress=(percent, phase, message, metrics))

            try:
                result = work(progress)
                if record.cancel.is_set():
                    raise Cancelled("operation cancelled")
                if recipe is not None and result.results:
                    self.store.remember_recipe(recipe, result.results[0].id)
                self._finish(record, result, None)
            except BaseException as exc:  # noqa: BLE001 - every failure ends the operation, never the worker
                if not isinstance(exc, TailorError):
                    log.error("operation %s failed unexpectedly", op.id, exc_info=exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                self._finish(record, None, exc)

    # --- state ----------------------------------------------------------------------------------
    def _update(self, record: _Record, *, state=None, progress=None) -> None:
        with self._lock:
            op = record.op
            if state is not None:
                op.state = state
            if progress is not None:
                percent, phase, message, metrics = progress
                op.progress.percent = float(percent)
                op.progress.phase = phase
                op.progress.message = message
                if metrics:
                    op.progress.metrics.Clear()
                    op.progress.metrics.update(_jsonable(metrics))
            op.update_time.CopyFrom(_now())
        self._notify()

    def _finish(self, record: _Record, result: WorkResult | None, exc: BaseException | None) -> None:
        op = record.op
        with self._lock:
            if result is not None:
                op.state = S.OPERATION_STATE_SUCCEEDED
                op.cached = result.cached
                op.progress.percent = 100.0
                for manifest in result.results:
                    op.results.append(
                        common.ArtifactRef(
                            id=manifest.id,
                            kind=manifest.kind,
                            uri=self.store.uri_for(manifest.id),
                            sha256=manifest.id,
                        )
                    )
                op.metrics.update(_jsonable(result.metrics))
                outcome = "cached" if result.cached else "succeeded"
            elif isinstance(exc, Cancelled) or record.cancel.is_set():
                op.state = S.OPERATION_STATE_CANCELLED
                op.error.CopyFrom(common.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled"))
                outcome = "cancelled"
            else:
                op.state = S.OPERATION_STATE_FAILED
                if isinstance(exc, TailorError):
                    status = common.Status(code=exc.code.value[0], message=exc.message)
                    # Numbers behind a refusal (an accuracy gate's measurements) travel with the failure.
                    if getattr(exc, "metrics", None):
                        op.metrics.update(_jsonable(exc.metrics))
                elif is_out_of_memory(exc):
                    _free_accelerator_memory()  # so that the worker's next operation has it back
                    detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                    status = common.Status(
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                        message=f"{op.kind} ran out of memory ({detail}): use a worker with more memory or "
                        "smaller inputs (batch, sequence length, calibration samples)",
                    )
                else:
                    status = common.Status(
                        code=grpc.StatusCode.INTERNAL.value[0],
                        message=f"internal error in {self.service} ({type(exc).__name__}); see the worker logs",
                    )
                op.error.CopyFrom(status)
                outcome = "failed"
            op.update_time.CopyFrom(_now())
        if not result or not result.cached:
            OPERATIONS.labels(self.service, op.kind, "RUNNING").dec()
        OPERATIONS.labels(self.service, op.kind, outcome.upper()).inc()
        STAGE_SECONDS.labels(self.service, op.kind, record.method, outcome).observe(
            time.monotonic() - record.started
        )
        log.info("operation %s %s", op.id, outcome, extra={"fields": {"kind": op.kind}})
        self._notify()

    def _notify(self) -> None:
        loop, event = self._loop, self._changed
        if loop is None or event is None:
            return

        def wake():
            event.set()
            self._changed = asyncio.Event()

        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:
            pass  # loop closed during shutdown

    def _forget_old(self) -> None:
        finished = [k for k, r in self._records.items() if r.op.state in TERMINAL]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._records[key]

    # --- queries --------------------------------------------------------------------------------
    # `project=None` is the worker itself (unscoped); a caller passes its project, and another
    # project's operation reads as not found, like one that never existed.
    def _record(self, operation_id: str, project: str | None = None) -> _Record:
        record = self._records.get(operation_id)
        if record is None or not self._visible(record, project):
            raise NotFound(f"operation {operation_id!r} not found on this {self.service} worker")
        return record

    def _visible(self, record: _Record, project: str | None) -> bool:
        if project is None:
            return True
        if self.require_project and not project:
            return False
        return record.project == project

    def _copy(self, record: _Record) -> common.Operation:
        with self._lock:
            copy = common.Operation()
            copy.CopyFrom(record.op)
            return copy

    def snapshot(self, operation_id: str, project: str | None = None) -> common.Operation:
        return self._copy(self._record(operation_id, project))

    def list(self, project: str | None = None) -> list[common.Operation]:
        records = [r for r in list(self._records.values()) if self._visible(r, project)]
        return [self._copy(r) for r in records]

    async def watch(self, operation_id: str, project: str | None = None) -> AsyncIterator[common.Operation]:
        record = self._record(operation_id, project)
        last = None
        while True:
            event = self._changed
            snap = self._copy(record)
            if last is None or snap.update_time != last.update_time or snap.state != last.state:
                yield snap
                last = snap
            if snap.state in TERMINAL:
                return
            if event is None:
                await asyncio.sleep(0.2)
            else:
                try:
                    await asyncio.wait_for(event.wait(), timeout=5.0)
                except TimeoutError:
                    pass

    def cancel(self, operation_id: str, project: str | None = None) -> common.Operation:
        record = self._record(operation_id, project)
        if record.op.state not in TERMINAL:
            record.cancel.set()
        return self._copy(record)

    def cancel_all(self) -> None:
        for record in self._records.values():
            if record.op.state not in TERMINAL:
                record.cancel.set()

    async def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.active_count() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
