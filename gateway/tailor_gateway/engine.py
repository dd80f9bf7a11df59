"""The pipeline engine: spec -> stages in the durable state -> operations on workers -> summary.

Each pipeline has one driver task. It starts every stage whose dependencies succeeded, records each
transition in the state store before acting on it, and follows remote operations by streaming. On a
gateway restart, `resume()` re-attaches to recorded operations, or dispatches again where the worker
no longer knows them; finished stages are never run again (and the workers' recipe cache makes a
re-dispatched stage cheap when its output already exists).

Every database call runs on the state store's threads (`await self._db(...)`), never on the event loop;
CreatePipeline's admission (key lookup, spec, inputs, which read the store too) runs in one
`asyncio.to_thread`, so that a slow store does not hold a database thread.
When the database stays away past its retry budget (db.py) the driver stops where it is, leaving the
durable state as it was, and drives the pipeline again a little later, as a restarted gateway would:
an outage delays a pipeline, it never fails it or leaves it RUNNING without a driver.
A stage's metrics that are not finite (NaN, Inf: a model with broken weights) reject that candidate,
with the reason; a failed or cancelled pipeline cancels its other operations on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import Histogram

from tailor.common.v1 import common_pb2 as common
from tailor.common.v1 import common_pb2_grpc as common_grpc
from tailor.selector.v1 import selector_service_pb2_grpc as select_grpc
from tailor_gateway import state as st
from tailor_gateway.access import Access
from tailor_gateway.capabilities import Capabilities
from tailor_gateway.db import DatabaseUnavailable
from tailor_gateway.reporting import publish_report
from tailor_gateway.spec import PipelineSpec, parse_spec, plan
from tailor_gateway.stage_requests import select_request, start_call, trace_metadata
from tailor_gateway.workers import STAGE_POOL, Backoff, WorkerPools
from tailor_runtime.errors import NotFound, TailorError, Unavailable
from tailor_runtime.logs import bind
from tailor_runtime.ml import hub
from tailor_runtime.stage import read_model_config
from tailor_runtime.store import ArtifactStore, Manifest
from tailor_runtime.telemetry import tracer
from tailor_runtime.trust import call_project

log = logging.getLogger("tailor.gateway.engine")
MAX_ATTEMPTS = 3
# A stage whose store or worker is away (UNAVAILABLE) is retried this long, with backoff, then fails.
UNAVAILABLE_RETRY_S = 300.0
# No progress event from a worker for this long: ask its health service; no answer means it hangs.
WORKER_STALL_S = 120.0
HEALTH_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
# The database was away past its retry budget: drive the pipeline again after this long (logged).
REDRIVE_AFTER_S = 5.0
# A finished worker operation's state -> the stage's.
_OP_STATE = {
    common.OperationState.OPERATION_STATE_SUCCEEDED: st.SUCCEEDED,
    common.OperationState.OPERATION_STATE_FAILED: st.FAILED,
    common.OperationState.OPERATION_STATE_CANCELLED: st.CANCELLED,
}


# Where a CreatePipeline's time goes (issue 23's load bar): one series per step, on the gateway's /metrics.
CREATE_PHASE_SECONDS = Histogram(
    "tailor_gateway_create_pipeline_phase_seconds",
    "Wall time of each step of CreatePipeline",
    ["phase"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
)


@contextlib.contextmanager
def create_phase(name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        CREATE_PHASE_SECONDS.labels(name).observe(time.perf_counter() - started)


NOTHING_TO_EXPORT = "no candidate met the constraints, so none was exported"


class StageFailed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def struct_to_dict(struct) -> dict:
    """A Struct as a dict, NaN and Inf included (json_format refuses them with a ValueError)."""

    def value(v):
        kind = v.WhichOneof("kind")
        if kind == "struct_value":
            return struct_to_dict(v.struct_value)
        if kind == "list_value":
            return [value(x) for x in v.list_value.values]
        if kind == "number_value":
            return v.number_value
        if kind == "string_value":
            return v.string_value
        if kind == "bool_value":
            return v.bool_value
        return None

    return {k: value(v) for k, v in struct.fields.items()}


def non_finite(metrics: dict, prefix: str = "") -> list[str]:
    """'name=nan' for every metric (nested too) that is NaN or infinite."""
    found = []
    for key, v in metrics.items():
        if isinstance(v, dict):
            found += non_finite(v, f"{prefix}{key}.")
        elif isinstance(v, float) and not math.isfinite(v):
            found.append(f"{prefix}{key}={v}")
    return found


def finite_only(metrics: dict) -> dict:
    """The metrics without their NaN / Inf values: what is stored and reported of a rejected candidate."""
    return {
        k: finite_only(v) if isinstance(v, dict) else v
        for k, v in metrics.items()
        if not (isinstance(v, float) and not math.isfinite(v))
    }


class Engine:
    def __init__(
        self,
        state: st.StateStore,
        pools: WorkerPools,
        store: ArtifactStore,
        access: Access | None = None,
        worker_lost_after_s: float = 30.0,
        unavailable_retry_s: float = UNAVAILABLE_RETRY_S,
        worker_stall_s: float = WORKER_STALL_S,
        staging_dir: Path | None = None,
    ):
        self.state = state
        # Hub imports link the snapshot's files here before publishing them (same disk as the cache).
        self.staging_dir = staging_dir or Path(tempfile.gettempdir()) / "tailor-imports"
        self.pools = pools
        self.store = store
        self.access = access or Access(state.db)
        self.worker_lost_after_s = worker_lost_after_s
        self.unavailable_retry_s = unavailable_retry_s
        self.worker_stall_s = worker_stall_s
        # Starting an operation answers within seconds on a live worker (its first call imports the
        # method's libraries); past this deadline dispatch tries the next worker of the pool.
        self.start_timeout_s = START_TIMEOUT_S
        self.capabilities = Capabilities(pools)
        self._drivers: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        self._progress: dict[tuple[str, str], common.Progress] = {}
        self._changed: dict[str, asyncio.Event] = {}

    # --- public API -----------------------------------------------------------------------------
    async def submit(
        self,
        spec_yaml: str,
        project: str,
        idempotency_key: str = "",
        then: Callable[[st.PipelineRow], Any] | None = None,
        validate_only: bool = False,
    ) -> Any:
        """A new pipeline, durable before this returns, after checking the spec's names against the worker
        pools (and the model's architecture) and that every input is this project's artifact. With the
        same idempotency key as an earlier call: that call's pipeline, not checked again.

        Two trips off the event loop (the key, the spec and the inputs; then the insert): under load each
        trip waits its turn on a busy loop, so CreatePipeline makes no more than it needs. `then(row)`,
        when given, runs in the same thread right after the row is stored or found (the caller's audit
        row and read-back cost no trip of their own), and its result is returned instead of the row."""
        with create_phase("admit"):
            existing, spec, config, missing = await asyncio.to_thread(
                self._admit, spec_yaml, project, "" if validate_only else idempotency_key, then, validate_only
            )
        if existing is not None:
            return existing
        with create_phase("capabilities"):
            await self.capabilities.check(spec, config)
        if missing is not None:
            raise NotFound(missing)
        if validate_only:  # everything checked; nothing stored
            return spec
        return await self._create(spec, spec_yaml, project, idempotency_key, then)

    def _admit(
        self, spec_yaml: str, project: str, idempotency_key: str, then, validate_only: bool = False
    ) -> tuple:
        """Blocking (run it in a thread): (the earlier call's answer, or None; the parsed spec; the model's
        config.json or None; what input is missing, or None). Every input must be an artifact of this
        project in the store; another project's artifact is as absent as a missing one."""
        if idempotency_key:
            found = self.state.find_by_idempotency_key(project, idempotency_key)
            if found is not None:
                return (then(found) if then else found), None, None, None
        # A validation accepts `path:` inputs (the CLI uploads them once the spec is valid).
        spec = parse_spec(spec_yaml, require_artifacts=not validate_only)
        missing = next(
            (
                f"{field}: artifact {ref.artifact} not found in the store; upload it first"
                for field, ref in spec.inputs().items()
                if ref.artifact is not None
                and (not self.access.owns(project, ref.artifact) or not self.store.exists(ref.artifact))
            ),
            None,
        )
        return None, spec, self._model_config(spec, project), missing

    async def _db(self, fn, *args, **kwargs):
        """A blocking state (or access) call, run on the state store's threads."""
        return await self.state.run(fn, *args, **kwargs)

    def _model_config(self, spec: PipelineSpec, project: str) -> dict | None:
        """The spec model's parsed config.json, for the architecture check (blocking: run it in a thread).

        `artifact:` read from the store; `hub:` from the store when that commit was imported before, else
        only config.json is fetched from the Hub (huggingface_hub's cache first). None when the model is not
        (yet) a readable artifact of this project (submit() then reports it as not found), or when the Hub
        cannot be reached now (the import stage then fails with the reason, or finds it in the cache)."""
        model = spec.model
        if model.hub is not None:
            revision = hub.check_revision(model.revision)
            found = hub.find_imported(self.store, model.hub, revision if len(revision) == 40 else None)
            if found is not None:
                return read_model_config(self.store, found.id)
            try:
                return hub.read_config(model.hub, revision)
            except Unavailable as exc:
                log.warning("model config not checked at submit: %s", exc.message)
                return None
        artifact = model.artifact
        if artifact is None or not self.access.owns(project, artifact) or not self.store.exists(artifact):
            return None
        return read_model_config(self.store, artifact)

    async def import_model(self, project: str, repo: str, revision: str | None) -> tuple[Manifest, bool]:
        """A Hub model as an artifact of `project`: (manifest, cached: found in the store, nothing fetched).

        The download runs in a thread: the event loop (every other RPC) keeps serving meanwhile."""
        manifest, cached = await asyncio.to_thread(
            hub.import_from_hub, self.store, repo, revision, self.staging_dir
        )
        await self._db(self.access.own, project, [(manifest.id, manifest.kind)])
        return manifest, cached

    async def _create(
        self, spec: PipelineSpec, spec_yaml: str, project: str, idempotency_key: str, then=None
    ) -> Any:
        pipeline_id = uuid.uuid4().hex
        # One trace per pipeline: a short root span whose context every stage continues, across restarts.
        request_span = trace.get_current_span().get_span_context()
        with tracer().start_as_current_span(
            f"pipeline {spec.name}", context=otel_context.Context(), links=[trace.Link(request_span)]
        ) as span:
            span.set_attribute("tailor.pipeline_id", pipeline_id)
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        now = time.time()
        row = st.PipelineRow(
            id=pipeline_id,
            project=project,
            name=spec.name,
            spec_yaml=spec_yaml,
            state=st.PENDING,
            created=now,
            updated=now,
            idempotency_key=idempotency_key or None,
            trace_parent=json.dumps(carrier),
        )
        stages = [
            st.StageRow(pipeline_id, s.name, s.kind, i, s.depends_on, s.params)
            for i, s in enumerate(plan(spec))
        ]

        def insert() -> tuple[st.PipelineRow, Any]:
            stored = self.state.create_pipeline(row, stages)
            return stored, (then(stored) if then else stored)

        with create_phase("insert"):
            stored, answer = await self._db(insert)
        if stored.id != pipeline_id:
            return answer  # a concurrent retry with the same idempotency key won the race
        log.info("pipeline created", extra={"fields": {"pipeline_id": pipeline_id, "pipeline": spec.name}})
        self._start_driver(pipeline_id)
        return answer

    def resume(self) -> None:
        """After a restart: drive every pipeline that was not finished (in a task: the database is read
        off the event loop, and retried should it be away)."""
        loop = asyncio.get_running_loop()
        # And the pools' method lists, so that the first submissions find them cached instead of each
        # waiting (up to the deadline) on a cold worker's first listing.
        for task in (loop.create_task(self.resume_now()), loop.create_task(self.capabilities.warm())):
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def resume_now(self) -> int:
        while True:
            try:
                unfinished = await self._db(self.state.unfinished_pipelines)
                break
            except DatabaseUnavailable as exc:
                log.warning("resume: %s; trying again in %.0fs", exc.message, REDRIVE_AFTER_S)
                await asyncio.sleep(REDRIVE_AFTER_S)
        for p in unfinished:
            if p.id not in self._drivers:
                self._start_driver(p.id)
        return len(unfinished)

    async def cancel(self, pipeline_id: str) -> None:
        p = await self._db(self.state.get_pipeline, pipeline_id)
        if p is None:
            raise NotFound(f"pipeline {pipeline_id} not found")
        if p.state in st.TERMINAL:
            return
        call_project.set(p.project)  # the cancel calls to its workers name the pipeline's project
        # Durable first: a driver that ends a moment later finds the pipeline finished and leaves it so.
        await self._db(
            self.state.set_pipeline,
            pipeline_id,
            state=st.CANCELLED,
            error_code=grpc.StatusCode.CANCELLED.value[0],
            error_message="cancelled by the user",
        )
        driver = self._drivers.get(pipeline_id)
        if driver:
            driver.cancel()
        await self._stop_operations(pipeline_id, "the pipeline was cancelled")
        self._notify(pipeline_id)

    async def _stop_operations(self, pipeline_id: str, why: str) -> None:
        """Cancel every operation of the pipeline still running on a worker (they would otherwise go on,
        holding the worker, for nothing), and mark every unfinished stage CANCELLED with why."""
        for s in await self._db(self.state.stages, pipeline_id):
            if s.state == st.RUNNING and s.operation_id and s.worker and s.worker != "gateway":
                try:
                    await common_grpc.OperationsServiceStub(self.pools.channel(s.worker)).CancelOperation(
                        common.CancelOperationRequest(operation_id=s.operation_id), timeout=10
                    )
                except grpc.aio.AioRpcError as exc:
                    log.warning("could not cancel %s on %s: %s", s.operation_id, s.worker, exc.details())
            if s.state in (st.PENDING, st.RUNNING):
                await self._db(
                    self.state.set_stage, pipeline_id, s.name, state=st.CANCELLED, error_message=why
                )

    def progress_of(self, pipeline_id: str, stage: str) -> common.Progress | None:
        return self._progress.get((pipeline_id, stage))

    async def wait_change(self, pipeline_id: str, timeout: float) -> None:
        event = self._changed.setdefault(pipeline_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass

    async def shutdown(self) -> None:
        tasks = [*self._drivers.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- driving --------------------------------------------------------------------------------
    def _notify(self, pipeline_id: str) -> None:
        event = self._changed.pop(pipeline_id, None)
        if event:
            event.set()

    def _start_driver(self, pipeline_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(pipeline_id))
        self._drivers[pipeline_id] = task

        def done(t: asyncio.Task) -> None:
            if self._drivers.get(pipeline_id) is t:
                del self._drivers[pipeline_id]

        task.add_done_callback(done)

    def _redrive_later(self, pipeline_id: str) -> None:
        async def later() -> None:
            await asyncio.sleep(REDRIVE_AFTER_S)
            if pipeline_id not in self._drivers:
                self._start_driver(pipeline_id)

        task = asyncio.get_running_loop().create_task(later())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drive(self, pipeline_id: str) -> None:
        bind(pipeline_id=pipeline_id)
        running: dict[str, asyncio.Task] = {}
        try:
            p = await self._db(self.state.get_pipeline, pipeline_id)
            call_project.set(p.project)  # every worker call of this pipeline names its project
            if p.state in st.TERMINAL:
                return  # cancelled while this driver waited to start
            spec = parse_spec(p.spec_yaml)
            if p.state == st.PENDING:
                await self._db(self.state.set_pipeline, pipeline_id, state=st.RUNNING)
                self._notify(pipeline_id)
            while True:
                stages = {s.name: s for s in await self._db(self.state.stages, pipeline_id)}
                failed = [s for s in stages.values() if s.state == st.FAILED]
                if failed:
                    first = failed[0]
                    raise StageFailed(first.error_code, f"stage {first.name} failed: {first.error_message}")
                if all(s.state in st.SETTLED for s in stages.values()):
                    await self._db(self.state.set_pipeline, pipeline_id, state=st.SUCCEEDED)
                    log.info("pipeline succeeded")
                    return
                if await self._skip_dependents_of_rejected(pipeline_id, stages):
                    continue
                for s in stages.values():
                    ready = all(stages[d].state in st.SETTLED for d in s.depends_on)
                    if s.name not in running and s.state in (st.PENDING, st.RUNNING) and ready:
                        running[s.name] = asyncio.create_task(self._run_stage(p, spec, s, stages))
                if not running:
                    raise StageFailed(
                        grpc.StatusCode.INTERNAL.value[0], "pipeline is stuck: no stage can run"
                    )
                done, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
                for name in [n for n, t in running.items() if t in done]:
                    running.pop(name).result()
        except asyncio.CancelledError:
            await _cancel_tasks(running)
            raise
        except DatabaseUnavailable as exc:
            # Nothing is decided on what could not be recorded: stop here, drive again from the durable
            # state later (operations recorded as RUNNING are re-attached to, as after a restart).
            await _cancel_tasks(running)
            log.warning("pipeline paused: %s; driving it again in %.0fs", exc.message, REDRIVE_AFTER_S)
            self._redrive_later(pipeline_id)
        except StageFailed as exc:
            await _cancel_tasks(running)
            await self._end_failed(pipeline_id, exc.code, exc.message)
            log.warning("pipeline failed: %s", exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug fails this pipeline, not the gateway
            log.error("pipeline driver crashed", exc_info=exc)
            await _cancel_tasks(running)
            await self._end_failed(
                pipeline_id,
                grpc.StatusCode.INTERNAL.value[0],
                f"internal error in the gateway ({type(exc).__name__})",
            )
        finally:
            # Live progress is only kept while the pipeline runs: a long-lived gateway must not grow.
            for key in [k for k in self._progress if k[0] == pipeline_id]:
                del self._progress[key]
            self._notify(pipeline_id)

    async def _end_failed(self, pipeline_id: str, code: int, message: str) -> None:
        try:
            await self._db(
                self.state.set_pipeline, pipeline_id, state=st.FAILED, error_code=code, error_message=message
            )
            # The other stages' operations stop too: the pipeline's outcome is decided.
            await self._stop_operations(pipeline_id, "another stage failed, so the pipeline stopped")
        except DatabaseUnavailable as exc:
            log.warning("pipeline failure not recorded yet: %s; trying again later", exc.message)
            self._redrive_later(pipeline_id)

    async def _run_stage(self, p: st.PipelineRow, spec: PipelineSpec, s: st.StageRow, stages) -> None:
        ctx = propagate.extract(json.loads(p.trace_parent or "{}"))
        with tracer().start_as_current_span(f"stage {s.name}", context=ctx) as span:
            span.set_attribute("tailor.pipeline_id", p.id)
            try:
                if s.kind in STAGE_POOL and s.kind != "select":
                    await self._run_remote(p, spec, s, stages)
                elif s.kind == "import":
                    await self._run_import(p, s)
                elif s.kind == "select":
                    await self._run_select(p, spec, s, stages)
                else:
                    await self._run_report(p, spec, s, stages)
            except DatabaseUnavailable:
                raise  # not this stage's failure: the driver pauses the pipeline
            except StageFailed as exc:
                await self._fail_stage(p.id, s, exc.code, exc.message)
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
            except TailorError as exc:
                await self._fail_stage(p.id, s, exc.code.value[0], exc.message)
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
            except grpc.aio.AioRpcError as exc:
                await self._fail_stage(p.id, s, exc.code().value[0], exc.details() or exc.code().name)
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.code().name))
            finally:
                self._notify(p.id)

    async def _skip_dependents_of_rejected(self, pipeline_id: str, stages: dict) -> bool:
        """A benchmark of a rejected candidate has nothing to measure: mark it SKIPPED. True if any was."""
        skipped = False
        for s in stages.values():
            if s.kind == "benchmark" and s.state == st.PENDING:
                if any(stages[d].state in (st.REJECTED, st.SKIPPED) for d in s.depends_on):
                    await self._db(
                        self.state.set_stage,
                        pipeline_id,
                        s.name,
                        state=st.SKIPPED,
                        error_message="its candidate was rejected",
                    )
                    skipped = True
        return skipped

    async def _fail_stage(self, pipeline_id: str, s: st.StageRow, code: int, message: str) -> None:
        await self._db(
            self.state.set_stage, pipeline_id, s.name, state=st.FAILED, error_code=code, error_message=message
        )

    async def _succeed_stage(self, pipeline_id: str, s: st.StageRow, results, metrics, cached=False) -> None:
        # Ownership first: once the stage reads SUCCEEDED its results must be visible to the project.
        project = (await self._db(self.state.get_pipeline, pipeline_id)).project
        await self._db(self.access.own, project, [(r.get("id", ""), r.get("kind", "")) for r in results])
        await self._db(
            self.state.set_stage,
            pipeline_id,
            s.name,
            state=st.SUCCEEDED,
            results=results,
            metrics=metrics,
            cached=cached,
        )

    # --- remote stages --------------------------------------------------------------------------
    async def _run_remote(self, p, spec: PipelineSpec, s: st.StageRow, stages) -> None:
        pool = STAGE_POOL[s.kind]
        attempts = s.attempts
        operation_id, worker = s.operation_id, s.worker
        backoff, unavailable_since = Backoff(base=1.0, cap=30.0), None
        while True:
            if not operation_id:
                if attempts >= MAX_ATTEMPTS:
                    raise StageFailed(
                        grpc.StatusCode.UNAVAILABLE.value[0],
                        f"gave up after {attempts} attempts: the {pool} workers kept losing it",
                    )
                attempts += 1
                request_call = start_call(p, spec, s, stages, self.start_timeout_s)
                worker, op = await self.pools.dispatch(pool, request_call)
                operation_id = op.id
                # Durable before we wait on it: a restarted gateway re-attaches to this operation.
                try:
                    await self._db(
                        self.state.set_stage,
                        p.id,
                        s.name,
                        state=st.RUNNING,
                        operation_id=op.id,
                        worker=worker,
                        attempts=attempts,
                    )
                except (DatabaseUnavailable, asyncio.CancelledError):
                    # Not recorded, so nobody would ever re-attach to it: stop it, it is dispatched anew.
                    self._cancel_in_background(worker, op.id)
                    raise
                self._notify(p.id)
            op = await self._follow(p.id, s.name, worker, operation_id)
            if op is None:
                # The worker restarted or died and forgot the operation: dispatch again.
                log.warning("stage %s lost its operation on %s; dispatching again", s.name, worker)
                operation_id = ""
                continue
            final = _OP_STATE.get(op.state)
            metrics = struct_to_dict(op.metrics)
            broken = non_finite(metrics) if s.kind in ("quantize", "benchmark") else []
            if final == st.SUCCEEDED and broken:
                # NaN or Inf measurements (broken weights, an overflow): a verdict on this candidate,
                # not a failure of the pipeline; the other candidates go on to selection.
                reason = (
                    f"measured values that are not finite ({', '.join(sorted(broken)[:5])}): the model's "
                    "weights or outputs are NaN or infinite, so this candidate is left out"
                )
                await self._reject_stage(p.id, s.name, metrics, grpc.StatusCode.FAILED_PRECONDITION, reason)
                log.warning("stage %s: rejected, %s", s.name, reason)
                return
            if final == st.SUCCEEDED:
                results = [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in op.results]
                await self._succeed_stage(p.id, s, results, metrics, cached=op.cached)
                return
            if final == st.CANCELLED:
                # Not by the user (that cancels this task first): the worker shut down. Dispatch again.
                log.warning(
                    "stage %s was cancelled on %s (worker shutdown?); dispatching again", s.name, worker
                )
                operation_id = ""
                continue
            if op.error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                # The store (or something the worker needs) is away: wait and retry, within a bound.
                unavailable_since = unavailable_since or time.monotonic()
                if time.monotonic() - unavailable_since < self.unavailable_retry_s:
                    delay = backoff.next_delay()
                    log.warning("stage %s: %s; retrying in %.1fs", s.name, op.error.message, delay)
                    await asyncio.sleep(delay)
                    operation_id, attempts = "", max(0, attempts - 1)  # not the worker's fault
                    continue
                raise StageFailed(
                    op.error.code,
                    f"still unavailable after {self.unavailable_retry_s:.0f}s of retries: {op.error.message}",
                )
            if s.kind == "quantize" and metrics.get("gate") == "rejected":
                # The accuracy gate refused the result: a verdict on this candidate, not a failure of
                # the pipeline. Nothing was published; the numbers are kept for the report.
                await self._reject_stage(p.id, s.name, metrics, op.error.code, op.error.message)
                log.info("stage %s: rejected by the accuracy gate", s.name)
                return
            raise StageFailed(op.error.code or grpc.StatusCode.UNKNOWN.value[0], op.error.message or "failed")

    async def _reject_stage(self, pipeline_id: str, stage: str, metrics: dict, code, message: str) -> None:
        """A verdict on one candidate (REJECTED, with its finite numbers kept for the report), not a failure
        of the pipeline. `code`: a grpc.StatusCode or its number."""
        number = code.value[0] if isinstance(code, grpc.StatusCode) else code
        await self._db(
            self.state.set_stage,
            pipeline_id,
            stage,
            state=st.REJECTED,
            metrics=finite_only(metrics),
            error_code=number,
            error_message=message,
        )

    async def _follow(self, pipeline_id: str, stage: str, worker: str, operation_id: str):
        """Stream the operation's progress until it ends; None when the worker no longer knows it, is
        unreachable for worker_lost_after_s, or hangs (no event for worker_stall_s, and its health
        check fails or times out: a stopped process keeps its connections, so only a deadline sees it)."""
        channel = self.pools.channel(worker)
        stub = common_grpc.OperationsServiceStub(channel)
        backoff_s = 0.5
        lost_since: float | None = None
        while True:
            stream = stub.WatchOperation(common.WatchOperationRequest(operation_id=operation_id))
            events = stream.__aiter__()
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(anext(events), self.worker_stall_s)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        stream.cancel()
                        if await self._worker_alive(channel):
                            log.info(
                                "stage %s: no progress from %s for %.0fs; it is alive, still waiting",
                                stage,
                                worker,
                                self.worker_stall_s,
                            )
                            break  # watch again
                        log.warning(
                            "stage %s: %s made no progress for %.0fs and fails its health "
                            "check: treated as lost",
                            stage,
                            worker,
                            self.worker_stall_s,
                        )
                        self.pools.suspect(worker, self.worker_stall_s)
                        self._cancel_in_background(worker, operation_id)
                        return None
                    op = event.operation
                    lost_since = None
                    self._progress[(pipeline_id, stage)] = op.progress
                    self._notify(pipeline_id)
                    if op.state in _OP_STATE:
                        return op
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                # Unreachable: wait a little for it to come back, then treat the operation as lost.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > self.worker_lost_after_s:
                    return None
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    async def _worker_alive(self, channel: grpc.aio.Channel) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=min(HEALTH_TIMEOUT_S, self.worker_stall_s)
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def _cancel_in_background(self, worker: str, operation_id: str) -> None:
        """A hung worker that wakes up must not finish (and publish) what was dispatched elsewhere."""

        async def cancel() -> None:
            try:
                await common_grpc.OperationsServiceStub(self.pools.channel(worker)).CancelOperation(
                    common.CancelOperationRequest(operation_id=operation_id), timeout=600
                )
            except grpc.aio.AioRpcError:
                pass  # dead for good, or restarted and forgot it: nothing to stop

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- local stages ---------------------------------------------------------------------------
    async def _run_import(self, p, s: st.StageRow) -> None:
        """`model: {hub: ...}`: the gateway imports it (it holds the token and the store); a restarted
        gateway runs it again, answered from the recipe index (or the Hub cache) once it was published."""
        await self._db(self.state.set_stage, p.id, s.name, state=st.RUNNING, worker="gateway")
        self._notify(p.id)
        manifest, cached = await self.import_model(p.project, s.params["hub"], s.params["revision"])
        result = {
            "id": manifest.id,
            "kind": manifest.kind,
            "uri": self.store.uri_for(manifest.id),
            "sha256": manifest.id,
        }
        metrics = {
            "hub": s.params["hub"],
            "commit": manifest.recipe.get("commit", ""),
            "bytes": manifest.total_bytes,
        }
        await self._succeed_stage(p.id, s, [result], metrics, cached=cached)

    async def _run_select(self, p, spec: PipelineSpec, s: st.StageRow, stages) -> None:
        request, models = select_request(spec, stages)
        metadata = trace_metadata()
        worker, response = await self.pools.dispatch(
            "selector",
            lambda ch: select_grpc.SelectorServiceStub(ch).Select(request, metadata=metadata, timeout=30),
        )
        result = json_format.MessageToDict(response, preserving_proto_field_name=True)
        result["recommended_model"] = models.get(response.recommended_id, {})
        await self._db(self.state.set_stage, p.id, s.name, worker=worker)
        await self._succeed_stage(p.id, s, [], result)
        if not response.recommended_id and "export" in stages:
            # Nothing to export; the report still runs and shows how far each candidate missed.
            await self._db(
                self.state.set_stage, p.id, "export", state=st.SKIPPED, error_message=NOTHING_TO_EXPORT
            )

    async def _run_report(self, p, spec: PipelineSpec, s: st.StageRow, stages) -> None:
        backoff, started = Backoff(base=1.0, cap=30.0), time.monotonic()
        while True:
            try:
                summary, ref = await asyncio.to_thread(publish_report, self.store, p, spec, stages)
                break
            except Unavailable as exc:
                # The store is away: nothing was published (the manifest goes last); try again later.
                if time.monotonic() - started > self.unavailable_retry_s:
                    raise Unavailable(
                        f"the artifact store stayed unavailable for {self.unavailable_retry_s:.0f}s: "
                        f"{exc.message}"
                    ) from None
                delay = backoff.next_delay()
                log.warning("report: store unavailable (%s); retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
        await self._db(self.state.set_pipeline, p.id, summary=summary, report=ref)
        await self._succeed_stage(p.id, s, [ref], {})


async def _cancel_tasks(tasks: dict[str, asyncio.Task]) -> None:
    """Cancel the stage tasks and wait for them: none writes to the state after the driver decided."""
    for t in tasks.values():
        t.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
