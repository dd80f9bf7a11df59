"""GatewayService: pipelines and artifacts for authenticated callers. Proto <-> engine only.

Every database read and write runs off the event loop, on the state store's threads (`self._db`):
a commit waiting on the disk or on a database that is away holds up only its own call.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from google.protobuf import json_format, timestamp_pb2

from tailor.common.v1 import common_pb2 as common
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tailor_gateway import ids
from tailor_gateway import state as st
from tailor_gateway.access import Access
from tailor_gateway.artifacts import (
    MAX_UPLOAD_FILES,
    clean_stale_staging,
    iter_download,
    receive_upload,
)
from tailor_gateway.auth import current_caller
from tailor_gateway.engine import Engine, create_phase
from tailor_gateway.spec import plan
from tailor_runtime.errors import InvalidArgument, NotFound
from tailor_runtime.interceptors import current_principal
from tailor_runtime.operations import to_struct
from tailor_runtime.store import ArtifactStore
from tailor_runtime.store.keys import check_artifact_id

_PIPELINE_STATE = {
    st.PENDING: pb.PIPELINE_STATE_PENDING,
    st.RUNNING: pb.PIPELINE_STATE_RUNNING,
    st.SUCCEEDED: pb.PIPELINE_STATE_SUCCEEDED,
    st.FAILED: pb.PIPELINE_STATE_FAILED,
    st.CANCELLED: pb.PIPELINE_STATE_CANCELLED,
}
_STAGE_STATE = {
    st.PENDING: common.OPERATION_STATE_PENDING,
    st.RUNNING: common.OPERATION_STATE_RUNNING,
    st.SUCCEEDED: common.OPERATION_STATE_SUCCEEDED,
    st.FAILED: common.OPERATION_STATE_FAILED,
    st.CANCELLED: common.OPERATION_STATE_CANCELLED,
    st.REJECTED: common.OPERATION_STATE_REJECTED,
    st.SKIPPED: common.OPERATION_STATE_SKIPPED,
}


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _ref(d: dict) -> common.ArtifactRef:
    return common.ArtifactRef(**{k: d.get(k, "") for k in ("id", "kind", "uri", "sha256")})


class GatewayServicer(pb_grpc.GatewayServiceServicer):
    def __init__(
        self,
        engine: Engine,
        store: ArtifactStore,
        staging: Path,
        max_upload_bytes: int,
        list_limit: int = 1000,
        max_upload_files: int = MAX_UPLOAD_FILES,
    ):
        self.engine = engine
        self.access: Access = engine.access
        self.list_limit = list_limit
        self.store = store
        self.staging = staging
        clean_stale_staging(staging)  # folders of a gateway killed mid-upload (issue 23)
        self.max_upload_bytes = max_upload_bytes
        self.max_upload_files = max_upload_files

    async def _db(self, fn, *args, **kwargs):
        return await self.engine.state.run(fn, *args, **kwargs)

    async def _pipeline(self, pipeline_id: str, full: bool = True) -> pb.Pipeline:
        """The caller's pipeline as a message (read on a database thread)."""
        return await self._db(lambda: self._to_proto(self._owned(pipeline_id), full))

    async def _pipeline_id(self, given: str) -> str:
        """The whole id of the caller's pipeline that `given` (a whole id or a unique prefix) names."""
        project = current_principal.get()
        return await self._db(
            ids.resolve, given, ids.PIPELINE_ID_LENGTH, "pipeline",
            lambda prefix, n: self.engine.state.pipeline_ids_starting(project, prefix, n),
        )  # fmt: skip

    async def _artifact_id(self, given: str) -> str:
        """The whole id of the caller's artifact that `given` (a whole id or a unique prefix) names."""
        project = current_principal.get()
        found = await self._db(
            ids.resolve, given, ids.ARTIFACT_ID_LENGTH, "artifact",
            lambda prefix, n: self.access.owned_starting(project, prefix, n),
        )  # fmt: skip
        return check_artifact_id(found)

    # --- pipelines ------------------------------------------------------------------------------
    def _owned(self, pipeline_id: str) -> st.PipelineRow:
        p = self.engine.state.get_pipeline(pipeline_id)
        # Another project's pipeline reads as absent: its existence is not disclosed.
        if p is None or p.project != current_principal.get():
            raise NotFound(f"pipeline {pipeline_id!r} not found")
        return p

    def _to_proto(self, p: st.PipelineRow, full: bool = True) -> pb.Pipeline:
        message = pb.Pipeline(
            id=p.id,
            name=p.name,
            state=_PIPELINE_STATE[p.state],
            project=p.project,
            create_time=_ts(p.created),
            update_time=_ts(p.updated),
        )
        if p.error_message:
            message.error.CopyFrom(common.Status(code=p.error_code, message=p.error_message))
        if p.report:
            message.report.CopyFrom(_ref(p.report))
        if not full:
            return message
        if p.summary:
            message.summary.CopyFrom(to_struct(p.summary))
        for s in self.engine.state.stages(p.id):
            stage = pb.Stage(
                name=s.name,
                kind=s.kind,
                state=_STAGE_STATE[s.state],
                operation_id=s.operation_id,
                worker=s.worker,
                depends_on=s.depends_on,
                attempts=s.attempts,
                cached=s.cached,
                results=[_ref(r) for r in s.results],
            )
            progress = self.engine.progress_of(p.id, s.name)
            if progress is not None:
                stage.progress.CopyFrom(progress)
            if s.state == st.SUCCEEDED:
                stage.progress.percent = 100.0
            if s.error_message:
                stage.error.CopyFrom(common.Status(code=s.error_code, message=s.error_message))
            message.stages.append(stage)
        return message

    async def CreatePipeline(self, request, context):
        caller = current_caller.get()

        def audit_and_read(row: st.PipelineRow) -> pb.Pipeline:
            # On the engine's database thread, right after the row is stored: no trip of its own.
            self.access.audit(caller, "pipeline.create", row.id, name=row.name)
            return self._to_proto(self._owned(row.id))

        if request.validate_only:
            project = current_principal.get()
            spec = await self.engine.submit(request.spec_yaml, project, validate_only=True)
            planned = dict(await self._plan(spec, project, request.model_config_json))
            return pb.Pipeline(
                name=spec.name,
                state=pb.PIPELINE_STATE_PENDING,
                stages=[
                    pb.Stage(
                        name=s.name,
                        kind=s.kind,
                        state=common.OPERATION_STATE_PENDING,
                        plans=[_resource_plan(*row) for row in planned.get(s.name, [])],
                    )
                    for s in plan(spec)
                ],
            )
        with create_phase("total_in_handler"):
            return await self.engine.submit(
                request.spec_yaml, current_principal.get(), request.idempotency_key, then=audit_and_read
            )

    async def _plan(self, spec, project: str, config_json: str) -> list[tuple]:
        """The planner's rows per stage (capabilities.plan; it refuses a stage that fits no machine): from
        the client's config.json of a `path:` model, else the stored model's."""
        if config_json:
            try:
                config = json.loads(config_json)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"model_config_json is not JSON: {exc}") from None
        else:
            config = await asyncio.to_thread(self.engine._model_config, spec, project)
        if not isinstance(config, dict):
            return []
        return await self.engine.capabilities.plan(spec, config)

    async def GetPipeline(self, request, context):
        return await self._pipeline(await self._pipeline_id(request.pipeline_id))

    async def ListPipelines(self, request, context):
        # The newest first, bounded: a project with thousands of pipelines must not stall the gateway.
        limit = min(request.page_size or self.list_limit, self.list_limit)
        project = current_principal.get()
        # The basic view leaves out stages and summaries: a listing of 20 full pipelines is ~67 KB and a
        # query per pipeline, which made ListPipelines ~30x slower than GetPipeline under load.
        full = request.view == pb.PIPELINE_VIEW_FULL

        def listing() -> pb.ListPipelinesResponse:
            rows = self.engine.state.list_pipelines(project, limit)[::-1]
            return pb.ListPipelinesResponse(pipelines=[self._to_proto(p, full) for p in rows])

        return await self._db(listing)

    async def WatchPipeline(self, request, context):
        last = None
        pipeline_id = await self._pipeline_id(request.pipeline_id)
        while True:
            snapshot = await self._pipeline(pipeline_id)
            if snapshot != last:
                yield pb.PipelineEvent(pipeline=snapshot)
                last = snapshot
            if snapshot.state in (
                pb.PIPELINE_STATE_SUCCEEDED,
                pb.PIPELINE_STATE_FAILED,
                pb.PIPELINE_STATE_CANCELLED,
            ):
                return
            await self.engine.wait_change(pipeline_id, timeout=2.0)

    async def CancelPipeline(self, request, context):
        pipeline_id = await self._pipeline_id(request.pipeline_id)
        await self._db(self._owned, pipeline_id)
        await self.engine.cancel(pipeline_id)
        await self._db(self.access.audit, current_caller.get(), "pipeline.cancel", pipeline_id)
        return await self._pipeline(pipeline_id)

    # --- artifacts ------------------------------------------------------------------------------
    async def UploadArtifact(self, request_iterator, context):
        manifest = await receive_upload(
            request_iterator, self.store, self.max_upload_bytes, self.staging, self.max_upload_files
        )
        await self._db(self.access.own, current_principal.get(), [(manifest.id, manifest.kind)])
        size = sum(f.size for f in manifest.files)
        await self._db(
            self.access.audit,
            current_caller.get(),
            "artifact.upload",
            manifest.id,
            kind=manifest.kind,
            bytes=size,
        )
        ref = common.ArtifactRef(
            id=manifest.id, kind=manifest.kind, uri=self.store.uri_for(manifest.id), sha256=manifest.id
        )
        return pb.UploadArtifactResponse(artifact=ref, manifest_json=manifest.canonical_bytes().decode())

    async def DownloadArtifact(self, request, context):
        artifact_id = await self._artifact_id(request.artifact_id)
        await self._db(self.access.require_owned, current_principal.get(), artifact_id)
        await self._db(self.access.audit, current_caller.get(), "artifact.download", artifact_id)
        iterator = iter_download(self.store, artifact_id)
        while True:
            # The store may be remote (S3): read off the event loop.
            message = await asyncio.to_thread(next, iterator, None)
            if message is None:
                return
            yield message

    async def ListArtifacts(self, request, context):
        # Only what this project owns; the ownership table answers without reading the store.
        found = await self._db(self.access.listing, current_principal.get(), request.kind)
        refs = [common.ArtifactRef(id=a["id"], kind=a["kind"], uri=self.store.uri_for(a["id"]), sha256=a["id"])
                for a in found]  # fmt: skip
        listings = []
        for ref, a in zip(refs, found, strict=True):
            listing = pb.ArtifactListing(
                artifact=ref, pipeline_id=a["pipeline"][0], pipeline_name=a["pipeline"][1]
            )
            listing.stored_time.FromSeconds(int(a["created"]))
            listings.append(listing)
        return pb.ListArtifactsResponse(artifacts=refs, listings=listings)

    async def ImportModel(self, request, context):
        manifest, cached = await self.engine.import_model(
            current_principal.get(), request.hub_repo, request.revision or None
        )
        await self._db(
            self.access.audit,
            current_caller.get(),
            "artifact.import",
            manifest.id,
            hub=manifest.name,
            commit=manifest.recipe.get("commit", ""),
            cached=cached,
        )
        ref = common.ArtifactRef(
            id=manifest.id, kind=manifest.kind, uri=self.store.uri_for(manifest.id), sha256=manifest.id
        )
        return pb.ImportModelResponse(
            artifact=ref,
            manifest_json=manifest.canonical_bytes().decode(),
            commit=manifest.recipe.get("commit", ""),
            cached=cached,
        )

    async def ListCapabilities(self, request, context):
        listing = await self.engine.capabilities.listing()

        def union(pool: str, field: str) -> list:
            seen: dict[str, object] = {}
            for reply in listing.get(pool) or []:
                for item in getattr(reply, field):
                    seen.setdefault(item.name, item)
            return [seen[name] for name in sorted(seen)]

        return pb.ListCapabilitiesResponse(
            quantize_methods=union("quantizer", "methods"),
            finetune_methods=union("trainer", "methods"),
            export_formats=union("exporter", "formats"),
            export_targets=sorted({t.name for t in union("exporter", "targets")}),
            unanswered_pools=sorted(pool for pool, replies in listing.items() if replies is None),
        )

    async def GetArtifact(self, request, context):
        artifact_id = await self._artifact_id(request.artifact_id)
        await self._db(self.access.require_owned, current_principal.get(), artifact_id)
        manifest = await asyncio.to_thread(self.store.get_manifest, artifact_id)
        ref = common.ArtifactRef(
            id=manifest.id, kind=manifest.kind, uri=self.store.uri_for(manifest.id), sha256=manifest.id
        )
        return pb.GetArtifactResponse(artifact=ref, manifest_json=manifest.canonical_bytes().decode())


def _resource_plan(hardware, est, fits: bool, reason: str, alternatives: list[str]) -> pb.ResourcePlan:
    gib = 2**30
    message = pb.ResourcePlan(
        device=est.device,
        accelerator_peak_gb=est.accelerator_bytes / gib,
        host_peak_gb=est.host_bytes / gib,
        disk_gb=est.disk_bytes / gib,
        seconds=est.seconds,
        fits=fits,
        known=hardware is not None,
        reason=reason,
        terms={k: float(v) for k, v in est.terms.items()},
        notes=est.notes,
        alternatives=alternatives,
    )
    if hardware is not None:
        message.hardware.CopyFrom(hardware)
    return message


def pipeline_to_dict(p: pb.Pipeline) -> dict:
    return json_format.MessageToDict(p, preserving_proto_field_name=True)
