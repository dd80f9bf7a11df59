"""The HTTP/JSON API (/api/v1/...) and the dashboard page (/), one route per gateway RPC or more.

Every route says which RPC it calls (`x-grpc-method` in the OpenAPI document), which is how the contract
test checks that each RPC of the gateway has a route. Handlers only translate: HTTP in, the RPC with the
caller's token, the reply as JSON out; refusals become HTTP statuses in errors.py.
"""

from __future__ import annotations

import json
import mimetypes
import queue
import threading
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import anyio
import grpc
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import format_sse_event
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor_web import transfer
from tailor_web.errors import (
    ApiError,
    api_error_handler,
    error_body,
    rpc_error_handler,
    validation_error_handler,
)
from tailor_web.gateway import IMPORT_TIMEOUT_S, Gateway, to_json

SERVICE = pb.DESCRIPTOR.services_by_name["GatewayService"].full_name
# RPCs of the gateway with no HTTP route, each with the reason (tests/web/test_web_api.py holds every
# other RPC to having one). Empty: every RPC is reachable over HTTP.
WITHOUT_ROUTE: dict[str, str] = {}
STATIC = Path(__file__).parent / "static"
# A comment line on a quiet watch, so proxies and load balancers do not close an idle stream.
HEARTBEAT_S = 15.0
# The page runs only its own files: no inline script, nothing from another origin, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

bearer = HTTPBearer(auto_error=False, description="An API token of a project, as on gRPC")


def token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    # Passed on as it is: the gateway alone decides whether it is valid (and says so).
    return credentials.credentials if credentials else ""


Token = Annotated[str, Depends(token)]


def rpc(method: str) -> dict[str, Any]:
    return {"openapi_extra": {"x-grpc-method": f"{SERVICE}/{method}"}}


class CreatePipelineBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec_yaml: str = Field(description="The pipeline spec as YAML; inputs must be artifact ids.")
    idempotency_key: str = Field(
        "", description="A retried submission with the same key returns the same pipeline."
    )
    validate_only: bool = Field(False, description="Check everything and create nothing.")


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec_yaml: str = Field(description="The pipeline spec as YAML.")


class ImportModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hub_repo: str = Field(description="org/name on the Hugging Face Hub.")
    revision: str = Field("", description="Branch, tag or commit; empty means main.")


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(
        title="Tailor HTTP/JSON API",
        version="1",
        description="The gateway's gRPC API over HTTP: the same tokens, projects, limits and errors.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(grpc.RpcError, rpc_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    # --- pipelines ------------------------------------------------------------------------------
    @app.post("/api/v1/pipelines", tags=["pipelines"], **rpc("CreatePipeline"))
    def create_pipeline(body: CreatePipelineBody, caller: Token) -> dict:
        """Submit a pipeline (or, with validate_only, check it): the gateway's Pipeline."""
        request = pb.CreatePipelineRequest(**body.model_dump())
        return to_json(gateway.call("CreatePipeline", request, caller))

    @app.post("/api/v1/pipelines:validate", tags=["pipelines"], **rpc("CreatePipeline"))
    def validate_pipeline(body: ValidateBody, caller: Token) -> dict:
        """The gateway's whole check of a spec; nothing is created. The pipeline that would run."""
        request = pb.CreatePipelineRequest(spec_yaml=body.spec_yaml, validate_only=True)
        return to_json(gateway.call("CreatePipeline", request, caller))

    @app.get("/api/v1/pipelines", tags=["pipelines"], **rpc("ListPipelines"))
    def list_pipelines(
        caller: Token,
        page_size: Annotated[int, Query(ge=0, description="0: the gateway's limit")] = 0,
        view: Annotated[str, Query(pattern="^(basic|full)$")] = "basic",
    ) -> dict:
        """The project's pipelines, newest first."""
        request = pb.ListPipelinesRequest(
            page_size=page_size, view=pb.PipelineView.Value(f"PIPELINE_VIEW_{view.upper()}")
        )
        return to_json(gateway.call("ListPipelines", request, caller))

    @app.get("/api/v1/pipelines/{pipeline_id}", tags=["pipelines"], **rpc("GetPipeline"))
    def get_pipeline(pipeline_id: str, caller: Token) -> dict:
        """A pipeline by id or a unique prefix of 8+ characters."""
        return to_json(gateway.call("GetPipeline", pb.GetPipelineRequest(pipeline_id=pipeline_id), caller))

    @app.post("/api/v1/pipelines/{pipeline_id}/cancel", tags=["pipelines"], **rpc("CancelPipeline"))
    def cancel_pipeline(pipeline_id: str, caller: Token) -> dict:
        return to_json(
            gateway.call("CancelPipeline", pb.CancelPipelineRequest(pipeline_id=pipeline_id), caller)
        )

    @app.get(
        "/api/v1/pipelines/{pipeline_id}/events",
        tags=["pipelines"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
        **rpc("WatchPipeline"),
    )
    async def watch_pipeline(pipeline_id: str, caller: Token) -> StreamingResponse:
        """Server-Sent Events: `pipeline` (the whole Pipeline) on every change until it ends, then `end`;
        `error` if the stream breaks after it began. A refusal before the first event is an HTTP status."""
        call = gateway.stream("WatchPipeline", pb.WatchPipelineRequest(pipeline_id=pipeline_id), caller)
        events: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(call, events), daemon=True, name="watch").start()
        first = await anyio.to_thread.run_sync(events.get)
        if isinstance(first, grpc.RpcError):
            raise first  # not found, not this project's, no token: a status, as for GetPipeline
        return StreamingResponse(
            _sse(call, events, first), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )

    # --- artifacts ------------------------------------------------------------------------------
    @app.get("/api/v1/artifacts", tags=["artifacts"], **rpc("ListArtifacts"))
    def list_artifacts(caller: Token, kind: str = "") -> dict:
        """The project's artifacts (of one kind, if given), with when each came and what made it."""
        return to_json(gateway.call("ListArtifacts", pb.ListArtifactsRequest(kind=kind), caller))

    @app.get("/api/v1/artifacts/{artifact_id}", tags=["artifacts"], **rpc("GetArtifact"))
    def get_artifact(artifact_id: str, caller: Token) -> dict:
        """The artifact and its manifest (manifest_json: name, format, files with sha256, parents)."""
        return to_json(gateway.call("GetArtifact", pb.GetArtifactRequest(artifact_id=artifact_id), caller))

    @app.post("/api/v1/artifacts", tags=["artifacts"], **rpc("UploadArtifact"))
    async def upload_artifact(
        request: Request,
        caller: Token,
        kind: Annotated[str, Query(description="model, dataset, ...")],
        format: Annotated[str, Query(description="hf-safetensors, text, jsonl, ...")],  # noqa: A002
        name: str = "",
        path: Annotated[str, Query(description="the file's path, for an application/octet-stream body")] = "",
    ) -> dict:
        """Upload files as multipart/form-data (each part's filename is its path in the artifact), or one
        file as application/octet-stream with ?path=. Streamed to the gateway as it arrives."""
        reader = transfer.body_reader(request.headers.get("content-type", ""), path)
        header = pb.UploadHeader(kind=kind, format=format, name=name or Path(path).name)
        return to_json(await transfer.upload(gateway, caller, header, request.stream(), reader))

    @app.get(
        "/api/v1/artifacts/{artifact_id}/archive",
        tags=["artifacts"],
        response_class=StreamingResponse,
        responses={200: {"content": {"application/x-tar": {}}}},
        **rpc("DownloadArtifact"),
    )
    def download_archive(artifact_id: str, caller: Token) -> StreamingResponse:
        """Every file of the artifact as one tar, streamed, each file checked against its sha256."""
        reply, manifest = _manifest(artifact_id, caller)
        files = transfer.files_by_path(manifest)
        call = gateway.stream(
            "DownloadArtifact", pb.DownloadArtifactRequest(artifact_id=reply.artifact.id), caller
        )
        name = f"{manifest.get('name') or reply.artifact.id[:12]}.tar"
        return StreamingResponse(
            transfer.tar_bytes(call, files), media_type="application/x-tar", headers=_attachment(name)
        )

    @app.get(
        "/api/v1/artifacts/{artifact_id}/files/{path:path}",
        tags=["artifacts"],
        response_class=StreamingResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
        **rpc("DownloadArtifact"),
    )
    def download_file(artifact_id: str, path: str, caller: Token) -> StreamingResponse:
        """One file of the artifact; its sha256 is in the X-Content-SHA256 header and checked on the way."""
        reply, manifest = _manifest(artifact_id, caller)
        files = transfer.files_by_path(manifest)
        if path not in files:
            raise ApiError(
                grpc.StatusCode.NOT_FOUND,
                f"artifact {reply.artifact.id} has no file {path!r}; it has {sorted(files)}",
            )
        call = gateway.stream(
            "DownloadArtifact", pb.DownloadArtifactRequest(artifact_id=reply.artifact.id), caller
        )
        entry = files[path]
        headers = {
            **_attachment(Path(path).name),
            "Content-Length": str(entry["size"]),
            "X-Content-SHA256": entry["sha256"],
        }
        media = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return StreamingResponse(transfer.file_bytes(call, files, path), media_type=media, headers=headers)

    @app.post("/api/v1/models:import", tags=["artifacts"], **rpc("ImportModel"))
    def import_model(body: ImportModelBody, caller: Token) -> dict:
        """A Hugging Face Hub model into the project's store (downloaded by the gateway, once)."""
        request = pb.ImportModelRequest(**body.model_dump())
        return to_json(gateway.call("ImportModel", request, caller, timeout=IMPORT_TIMEOUT_S))

    # --- what the workers offer -----------------------------------------------------------------
    @app.get("/api/v1/capabilities", tags=["capabilities"], **rpc("ListCapabilities"))
    def list_capabilities(caller: Token) -> dict:
        """Methods, export formats and targets of the worker pools, with each config's JSON Schema."""
        return to_json(gateway.call("ListCapabilities", pb.ListCapabilitiesRequest(), caller))

    # --- the page -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}  # this process only: the gateway's health is the gateway's

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def _manifest(artifact_id: str, caller: str) -> tuple[pb.GetArtifactResponse, dict]:
        # Asked first so a refusal is a status, and so the tar headers and checks have every file's size.
        reply = gateway.call("GetArtifact", pb.GetArtifactRequest(artifact_id=artifact_id), caller)
        return reply, json.loads(reply.manifest_json)

    return app


def _attachment(filename: str) -> dict[str, str]:
    return {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}"}


def _pump(call, events: queue.Queue) -> None:
    """Reads the watch stream on a thread of its own (the gRPC iterator blocks) into `events`: each
    PipelineEvent, then None at the end or the RpcError that broke it."""
    try:
        for event in call:
            events.put(event)
        events.put(None)
    except grpc.RpcError as exc:
        events.put(exc)


async def _sse(call, events: queue.Queue, first):
    item = first
    try:
        while item is not None and not isinstance(item, grpc.RpcError):
            yield format_sse_event(event="pipeline", data_str=json.dumps(to_json(item.pipeline)))
            while True:
                try:
                    item = await anyio.to_thread.run_sync(
                        events.get, True, HEARTBEAT_S, abandon_on_cancel=True
                    )
                    break
                except queue.Empty:
                    yield format_sse_event(comment="still watching")
        if item is None:
            yield format_sse_event(event="end", data_str="{}")
        else:  # the stream broke after it began (the gateway restarted): the page may watch again
            error = ApiError.from_rpc(item)
            yield format_sse_event(event="error", data_str=json.dumps(error_body(error.code, error.message)))
    finally:
        call.cancel()  # the browser left: stop the gateway's stream, which ends the pump
