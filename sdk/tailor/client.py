"""`tailor.Client`: submit pipelines, follow them, move artifacts; everything through the gateway."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from tailor.connection import Connection, open_channel
from tailor.errors import ClientError, PipelineFailed, refused
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tailor.specs import LocalSpec
from tailor.transfer import OnProgress, download, import_hub, upload

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    state: str  # pending, running, succeeded, failed, cancelled, rejected, skipped
    percent: float
    message: str
    results: list[str]  # artifact ids
    error: str
    cached: bool
    # A running stage's own measurements so far (the trainer's loss, learning_rate, tokens_per_s, eta_s).
    metrics: dict[str, Any]
    # From validate() / plan(): the planner's prediction on each machine of the stage's pool (docs/planning.md).
    plans: list[ResourcePlan] = field(default_factory=list)


@dataclass(frozen=True)
class ResourcePlan:
    """A stage's predicted peak memory (GiB), disk (GiB) and rough time on one machine of its pool."""

    machine: str  # the worker's hardware in words ("" when the pool reports none)
    device: str  # where the work was planned: cuda or cpu
    gpu_peak_gb: float
    host_peak_gb: float
    disk_gb: float
    seconds: float  # rough
    fits: bool | None  # None: the pool reports no hardware
    reason: str
    terms: dict[str, float]  # the parts of the peak, bytes
    alternatives: list[str]  # changes that would fit, with their peaks
    notes: list[str]

    @classmethod
    def from_proto(cls, p) -> ResourcePlan:
        hw = p.hardware
        machine = ""
        if p.known:
            gpu = f", {hw.accelerator} {hw.accelerator_memory_gb:.0f} GiB" if hw.accelerator_memory_gb else ""
            machine = f"{hw.name or 'worker'}: {hw.memory_gb:.1f} GiB RAM, {hw.cpu_cores} cores{gpu}"
        return cls(
            machine=machine,
            device=p.device,
            gpu_peak_gb=p.accelerator_peak_gb,
            host_peak_gb=p.host_peak_gb,
            disk_gb=p.disk_gb,
            seconds=p.seconds,
            fits=p.fits if p.known else None,
            reason=p.reason,
            terms=dict(p.terms),
            alternatives=list(p.alternatives),
            notes=list(p.notes),
        )


@dataclass(frozen=True)
class Pipeline:
    """A snapshot of a pipeline. `summary` holds the candidates table and the recommendation once it
    has succeeded; `proto` is the gateway's message itself."""

    id: str
    name: str
    state: str  # pending, running, succeeded, failed, cancelled
    stages: list[Stage]
    error: str
    summary: dict[str, Any]
    report_id: str
    created: datetime
    proto: pb.Pipeline = field(repr=False)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def recommended(self) -> str:
        """The recommended candidate's name ("" before the select stage, or when none qualified)."""
        return self.summary.get("recommended") or ""

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"pipeline {self.name} has no stage {name!r}; it has {[s.name for s in self.stages]}")

    @classmethod
    def from_proto(cls, p: pb.Pipeline) -> Pipeline:
        from tailor.common.v1 import common_pb2 as common

        stages = [
            Stage(
                name=s.name,
                kind=s.kind,
                state=common.OperationState.Name(s.state).removeprefix("OPERATION_STATE_").lower(),
                percent=s.progress.percent,
                message=s.progress.message,
                results=[r.id for r in s.results],
                error=s.error.message,
                cached=s.cached,
                metrics=json_format.MessageToDict(s.progress.metrics),
                plans=[ResourcePlan.from_proto(r) for r in s.plans],
            )
            for s in p.stages
        ]
        return cls(
            id=p.id,
            name=p.name,
            state=pb.PipelineState.Name(p.state).removeprefix("PIPELINE_STATE_").lower(),
            stages=stages,
            error=p.error.message,
            summary=json_format.MessageToDict(p.summary),
            report_id=p.report.id,
            created=p.create_time.ToDatetime(),
            proto=p,
        )


@dataclass(frozen=True)
class Artifact:
    """An artifact in the store: its id, kind and manifest (name, format, files with sha256, recipe)."""

    id: str
    kind: str
    manifest: dict[str, Any]
    # From a listing (`Client.artifacts`): when the project got it, and the pipeline that made it ("" for
    # uploads and imports). None / "" from `Client.artifact`, which reads only the manifest.
    stored: datetime | None = None
    pipeline_id: str = ""
    pipeline_name: str = ""

    @classmethod
    def from_reply(cls, reply) -> Artifact:
        """From a gateway reply that carries `artifact` and `manifest_json` (upload, import, get)."""
        return cls(reply.artifact.id, reply.artifact.kind, json.loads(reply.manifest_json))

    @property
    def name(self) -> str:
        return self.manifest.get("name", "")

    @property
    def format(self) -> str:
        return self.manifest.get("format", "")

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest.get("files", []))

    @property
    def made_by(self) -> str:
        """The stage that made it (quantize, finetune, export...), or "upload"."""
        return self.manifest.get("recipe", {}).get("stage", "upload")

    @property
    def parents(self) -> list[str]:
        return list(self.manifest.get("parents", []))


class Client:
    """One gateway, one API token. Without arguments: TAILOR_GATEWAY and TAILOR_TOKEN, else the local stack
    that `tailor up` runs. Every method raises `tailor.ClientError` (a `RequestRefused` with the gRPC code
    when the gateway says no) with a message that says what to change."""

    def __init__(
        self, gateway: str | None = None, token: str | None = None, *, state_dir: Path | None = None
    ):
        if gateway and token:
            self.connection = Connection(gateway, token)
        else:
            found = Connection.discover(state_dir)
            self.connection = Connection(gateway or found.gateway, token or found.token)
        self._stub = pb_grpc.GatewayServiceStub(open_channel(self.connection.gateway))

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, metadata=self.connection.metadata())
        except grpc.RpcError as exc:
            raise refused(exc) from None

    # --- pipelines ------------------------------------------------------------------------------
    def validate(self, spec: str | Path | dict) -> Pipeline:
        """The gateway's whole check of a spec (method names, every stage's config against the schema its
        worker publishes, artifact inputs) and the stages it would run; nothing is uploaded or created."""
        return self._validate(LocalSpec.load(spec))

    def plan(self, spec: str | Path | dict) -> list[Stage]:
        """The stages the spec would run, each with the planner's predicted peak GPU and host memory,
        disk and rough time on every machine of its pool (`Stage.plans`); the gateway refuses a stage
        that fits no machine (RequestRefused naming the stage, the numbers and what would fit). A local
        `path:` model's config.json is read here; nothing is uploaded."""
        return [s for s in self._validate(LocalSpec.load(spec)).stages if s.plans]

    def _validate(self, local: LocalSpec) -> Pipeline:
        local.check_local_paths()
        model = local.raw.get("model") or {}
        config = local.base / str(model.get("path", "")) / "config.json" if "path" in model else None
        request = pb.CreatePipelineRequest(
            spec_yaml=local.yaml(),
            validate_only=True,
            model_config_json=config.read_text() if config is not None and config.is_file() else "",
        )
        return Pipeline.from_proto(self._call("CreatePipeline", request))

    def submit(
        self,
        spec: str | Path | dict,
        *,
        idempotency_key: str = "",
        on_upload: Callable[[str, Path, int, int], None] | None = None,
    ) -> Pipeline:
        """Validate, upload the spec's local inputs, create the pipeline; returns at once (see `wait`).
        `on_upload(label, path, done_bytes, total_bytes)` reports upload progress. The same
        `idempotency_key` twice creates one pipeline."""
        local = LocalSpec.load(spec)
        self._validate(local)  # a bad name or config is refused before anything is uploaded

        def send(label: str, path: Path) -> str:
            progress = (lambda done, total: on_upload(label, path, done, total)) if on_upload else None
            return self.upload(path, on_progress=progress).id

        uploaded = local.uploaded(send)
        request = pb.CreatePipelineRequest(
            spec_yaml=uploaded.yaml(), idempotency_key=idempotency_key or uuid.uuid4().hex
        )
        return Pipeline.from_proto(self._call("CreatePipeline", request))

    def watch(self, pipeline_id: str) -> Iterator[Pipeline]:
        """Every change of the pipeline until it ends (the last one is terminal)."""
        request = pb.WatchPipelineRequest(pipeline_id=pipeline_id)
        try:
            for event in self._stub.WatchPipeline(request, metadata=self.connection.metadata()):
                yield Pipeline.from_proto(event.pipeline)
        except grpc.RpcError as exc:
            raise refused(exc) from None

    def wait(
        self, pipeline_id: str, on_update: Callable[[Pipeline], None] | None = None, *, check: bool = True
    ) -> Pipeline:
        """Follow the pipeline to its end, calling `on_update` on every change. With `check`, a pipeline
        that ends failed or cancelled raises `PipelineFailed` (its last state is on the exception)."""
        last = None
        for last in self.watch(pipeline_id):
            if on_update is not None:
                on_update(last)
        if last is None:
            raise ClientError("the gateway closed the stream without news of the pipeline")
        if not last.done:  # the stream ended early (a gateway restart): ask once more
            last = self.pipeline(pipeline_id)
        if check and last.state != "succeeded":
            raise PipelineFailed(last)
        return last

    def run(self, spec: str | Path | dict, on_update: Callable[[Pipeline], None] | None = None) -> Pipeline:
        """submit + wait: the finished pipeline, or `PipelineFailed`."""
        return self.wait(self.submit(spec).id, on_update)

    def pipeline(self, pipeline_id: str) -> Pipeline:
        """A pipeline by id or by a unique prefix of 8+ characters."""
        return Pipeline.from_proto(self._call("GetPipeline", pb.GetPipelineRequest(pipeline_id=pipeline_id)))

    def pipelines(self) -> list[Pipeline]:
        reply = self._call("ListPipelines", pb.ListPipelinesRequest())
        return [Pipeline.from_proto(p) for p in reply.pipelines]

    def cancel(self, pipeline_id: str) -> Pipeline:
        return Pipeline.from_proto(
            self._call("CancelPipeline", pb.CancelPipelineRequest(pipeline_id=pipeline_id))
        )

    # --- artifacts ------------------------------------------------------------------------------
    def artifact(self, artifact_id: str) -> Artifact:
        return Artifact.from_reply(self._call("GetArtifact", pb.GetArtifactRequest(artifact_id=artifact_id)))

    def artifacts(self, kind: str = "") -> list[Artifact]:
        """The project's artifacts (of one kind, if given), oldest first, with their manifests."""
        reply = self._call("ListArtifacts", pb.ListArtifactsRequest(kind=kind))
        found = []
        for listing in reply.listings:
            manifest = self.artifact(listing.artifact.id).manifest
            stored = listing.stored_time.ToDatetime() if listing.HasField("stored_time") else None
            found.append(
                Artifact(listing.artifact.id, listing.artifact.kind, manifest, stored,
                         listing.pipeline_id, listing.pipeline_name)
            )  # fmt: skip
        return found

    def upload(
        self, path: str | Path, kind: str | None = None, format: str | None = None,  # noqa: A002
        on_progress: OnProgress | None = None,
    ) -> Artifact:  # fmt: skip
        """A file or folder into the store (a model folder's format is read from its config.json;
        pytorch_model.bin is converted to safetensors first, which needs torch)."""
        return Artifact.from_reply(upload(self.connection, Path(path), kind, format, on_progress))

    def download(
        self, artifact_id: str, dest: str | Path, on_progress: OnProgress | None = None
    ) -> list[Path]:
        """Every file of the artifact into dest, each checked against its sha256 before it appears there."""
        return download(self.connection, artifact_id, Path(dest), on_progress)

    def import_model(self, hub_repo: str, revision: str = "") -> Artifact:
        """A Hugging Face Hub model, downloaded once by the gateway (a cached commit is not fetched again)."""
        return Artifact.from_reply(import_hub(self.connection, hub_repo, revision))

    # --- what the workers offer -----------------------------------------------------------------
    def capabilities(self) -> pb.ListCapabilitiesResponse:
        """Quantize and finetune methods and export formats of the gateway's pools, with their schemas."""
        return self._call("ListCapabilities", pb.ListCapabilitiesRequest())
