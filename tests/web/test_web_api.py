"""The HTTP/JSON API against a real stack: every gateway RPC has a route (from the service descriptor,
not a list kept here), and HTTP and gRPC give the same answers and the same refusals for the same
requests, with the statuses of errors.py's one table; a bundled-model pipeline submitted, watched over
SSE and downloaded over HTTP; two projects kept apart over HTTP as over gRPC."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import grpc
import pytest
import yaml
from google.protobuf import json_format
from web_client import MODEL, auth, sse_events, upload_folder

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor_gateway.tokens import issue_token
from tailor_web.app import WITHOUT_ROUTE
from tailor_web.errors import HTTP_STATUS

pytestmark = pytest.mark.integration
SERVICE = pb.DESCRIPTOR.services_by_name["GatewayService"]


def auth_md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def grpc_call(stack, method: str, request, token: str):
    """The same request straight to the gateway: (reply, None) or (None, RpcError)."""
    stub = stack.connection().gateway_stub()
    try:
        return getattr(stub, method)(request, metadata=auth_md(token)), None
    except grpc.RpcError as exc:
        return None, exc


def assert_same_refusal(reply, exc: grpc.RpcError) -> None:
    assert exc is not None, "gRPC accepted what HTTP refused"
    assert reply.status_code == HTTP_STATUS[exc.code()], (reply.status_code, exc.code())
    assert reply.json() == {"error": {"code": exc.code().name, "message": exc.details()}}


@pytest.fixture(scope="module")
def finished(web_stack, http, inputs, submit):
    """A bundled-model pipeline uploaded, submitted and watched to its end, all over HTTP."""
    created = submit("web-api")
    events = sse_events(http, web_stack.token, created["id"])
    return {**inputs, "pipeline": created, "events": events}


def test_every_gateway_rpc_has_a_route_or_a_named_reason(http):
    document = http.get("/api/openapi.json").json()
    routed = {
        op["x-grpc-method"].rsplit("/", 1)[1]
        for path in document["paths"].values()
        for op in path.values()
        if isinstance(op, dict) and "x-grpc-method" in op
    }
    rpcs = {m.name for m in SERVICE.methods}
    assert routed <= rpcs, f"routes name RPCs the gateway does not have: {sorted(routed - rpcs)}"
    assert not routed & set(WITHOUT_ROUTE), "an RPC is both routed and excused"
    assert rpcs == routed | set(WITHOUT_ROUTE), f"RPCs with no route and no reason: {sorted(rpcs - routed)}"
    assert all(WITHOUT_ROUTE.values()), "each RPC left without a route says why"
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_every_grpc_code_has_one_http_status():
    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert (
        HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404 and HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED] == 401
    )


def test_a_pipeline_watched_over_sse_and_the_answers_equal_grpcs(web_stack, http, finished):
    token = web_stack.token
    events = finished["events"]
    assert events[-1] == ("end", {})
    snapshots = [data for name, data in events if name == "pipeline"]
    assert snapshots[-1]["state"] == "PIPELINE_STATE_SUCCEEDED", snapshots[-1]
    assert all(s["state"] != "PIPELINE_STATE_SUCCEEDED" for s in snapshots[:-1])
    pipeline_id = finished["pipeline"]["id"]

    # The same requests over both: the HTTP JSON parsed back is the gRPC reply itself.
    pairs = [
        (f"/api/v1/pipelines/{pipeline_id}", "GetPipeline", pb.GetPipelineRequest(pipeline_id=pipeline_id), pb.Pipeline),
        (f"/api/v1/pipelines/{pipeline_id[:10]}", "GetPipeline", pb.GetPipelineRequest(pipeline_id=pipeline_id[:10]), pb.Pipeline),
        ("/api/v1/pipelines?view=full", "ListPipelines", pb.ListPipelinesRequest(view=pb.PIPELINE_VIEW_FULL), pb.ListPipelinesResponse),
        ("/api/v1/artifacts?kind=model", "ListArtifacts", pb.ListArtifactsRequest(kind="model"), pb.ListArtifactsResponse),
        (f"/api/v1/artifacts/{finished['model']['artifact']['id']}", "GetArtifact",
         pb.GetArtifactRequest(artifact_id=finished["model"]["artifact"]["id"]), pb.GetArtifactResponse),
    ]  # fmt: skip
    for path, method, request, message in pairs:
        reply = http.get(path, headers=auth(token))
        assert reply.status_code == 200, (path, reply.text)
        expected, exc = grpc_call(web_stack, method, request, token)
        assert exc is None and json_format.ParseDict(reply.json(), message()) == expected, path
    # Watching the finished pipeline again: the same events over SSE as over the gRPC stream.
    stub = web_stack.connection().gateway_stub()
    streamed = list(
        stub.WatchPipeline(pb.WatchPipelineRequest(pipeline_id=pipeline_id), metadata=auth_md(token))
    )
    again = sse_events(http, token, pipeline_id)
    assert [json_format.ParseDict(d, pb.Pipeline()) for n, d in again if n == "pipeline"] == [
        e.pipeline for e in streamed
    ]
    capabilities = http.get("/api/v1/capabilities", headers=auth(token)).json()
    assert "bf16" in {m["name"] for m in capabilities["quantize_methods"]}


def test_refusals_are_the_gateways_with_the_mapped_status(web_stack, http):
    token = web_stack.token
    bad_spec = yaml.safe_dump({"name": "typo", "model": {"artifact": "0" * 64},
                               "quantize": [{"method": "rtn", "config": {"bitz": 4}}]})  # fmt: skip
    cases = [
        ("get", "/api/v1/pipelines", "not-a-token", "ListPipelines", pb.ListPipelinesRequest(), None),
        ("get", "/api/v1/pipelines", "", "ListPipelines", pb.ListPipelinesRequest(), None),
        ("get", "/api/v1/pipelines/0123456789abcdef", token, "GetPipeline",
         pb.GetPipelineRequest(pipeline_id="0123456789abcdef"), None),
        ("post", "/api/v1/pipelines/0123456789abcdef/cancel", token, "CancelPipeline",
         pb.CancelPipelineRequest(pipeline_id="0123456789abcdef"), None),
        ("post", "/api/v1/pipelines", token, "CreatePipeline",
         pb.CreatePipelineRequest(spec_yaml=bad_spec, validate_only=True), {"spec_yaml": bad_spec, "validate_only": True}),
        ("post", "/api/v1/pipelines:validate", token, "CreatePipeline",
         pb.CreatePipelineRequest(spec_yaml=bad_spec, validate_only=True), {"spec_yaml": bad_spec}),
        ("get", "/api/v1/artifacts/" + "f" * 64, token, "GetArtifact", pb.GetArtifactRequest(artifact_id="f" * 64), None),
    ]  # fmt: skip
    for verb, path, caller, method, request, body in cases:
        headers = auth(caller) if caller else {}
        reply = http.request(verb.upper(), path, headers=headers, json=body)
        _, exc = grpc_call(web_stack, method, request, caller)
        assert_same_refusal(reply, exc)
    unauthenticated = http.get("/api/v1/pipelines", headers=auth("not-a-token"))
    assert unauthenticated.status_code == 401 and unauthenticated.headers["www-authenticate"] == "Bearer"
    # A watch refused before its first event is a status, not a stream.
    watch = http.get("/api/v1/pipelines/0123456789abcdef/events", headers=auth(token))
    assert watch.status_code == 404 and watch.json()["error"]["code"] == "NOT_FOUND"
    # A body that is not the request message never reaches the gateway, and reads like its refusals.
    extra = http.post("/api/v1/pipelines", json={"spec": "x"}, headers=auth(token))
    assert extra.status_code == 400 and extra.json()["error"]["code"] == "INVALID_ARGUMENT"
    bad_upload = http.post("/api/v1/artifacts", params={"kind": "pickle", "format": "x", "path": "a.bin"},
                           content=b"x", headers={**auth(token), "Content-Type": "application/octet-stream"})  # fmt: skip
    assert bad_upload.status_code == 400 and "kind" in bad_upload.json()["error"]["message"]


def test_downloads_stream_every_file_checked(web_stack, http, finished):
    token = web_stack.token
    model_id = finished["model"]["artifact"]["id"]
    manifest = json.loads(finished["model"]["manifest_json"])
    archive = http.get(f"/api/v1/artifacts/{model_id}/archive", headers=auth(token))
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        got = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()}
    assert got == {f["path"]: f["sha256"] for f in manifest["files"]}
    assert got["model.safetensors"] == hashlib.sha256((MODEL / "model.safetensors").read_bytes()).hexdigest()

    one = http.get(f"/api/v1/artifacts/{model_id}/files/config.json", headers=auth(token))
    assert one.status_code == 200 and one.content == (MODEL / "config.json").read_bytes()
    assert one.headers["x-content-sha256"] == hashlib.sha256(one.content).hexdigest()
    missing = http.get(f"/api/v1/artifacts/{model_id}/files/nope.bin", headers=auth(token))
    assert missing.status_code == 404 and "config.json" in missing.json()["error"]["message"]


def test_two_projects_are_kept_apart_over_http_as_over_grpc(web_stack, http, finished):
    other = issue_token(web_stack.state_dir / "tokens", "web-other")  # the gateway re-reads the file
    pipeline_id = finished["pipeline"]["id"]
    model_id = finished["model"]["artifact"]["id"]

    listed = http.get("/api/v1/pipelines", headers=auth(other))
    assert listed.status_code == 200 and pipeline_id not in {p["id"] for p in listed.json()["pipelines"]}
    artifacts = http.get("/api/v1/artifacts", headers=auth(other)).json()
    assert model_id not in {a["id"] for a in artifacts["artifacts"]}
    for path, method, request in [
        (f"/api/v1/pipelines/{pipeline_id}", "GetPipeline", pb.GetPipelineRequest(pipeline_id=pipeline_id)),
        (f"/api/v1/artifacts/{model_id}", "GetArtifact", pb.GetArtifactRequest(artifact_id=model_id)),
        (f"/api/v1/artifacts/{model_id}/archive", "GetArtifact", pb.GetArtifactRequest(artifact_id=model_id)),
        (
            f"/api/v1/pipelines/{pipeline_id}/events",
            "GetPipeline",
            pb.GetPipelineRequest(pipeline_id=pipeline_id),
        ),
    ]:
        reply = http.get(path, headers=auth(other))
        _, exc = grpc_call(web_stack, method, request, other)
        assert_same_refusal(reply, exc)
    cancel = http.post(f"/api/v1/pipelines/{pipeline_id}/cancel", headers=auth(other))
    _, exc = grpc_call(web_stack, "CancelPipeline", pb.CancelPipelineRequest(pipeline_id=pipeline_id), other)
    assert_same_refusal(cancel, exc)
    # Uploading the same bytes makes them the other project's too, without showing the first's listing.
    again = upload_folder(http, other, MODEL, "model", "hf-safetensors")
    assert again["artifact"]["id"] == model_id
    mine = http.get("/api/v1/artifacts", headers=auth(other)).json()
    assert all(listing["pipeline_id"] == "" for listing in mine["listings"])


def test_the_web_front_never_logs_a_token(web_stack, http, finished):
    other = issue_token(web_stack.state_dir / "tokens", "web-logs")
    assert http.get("/api/v1/pipelines", headers=auth(other)).status_code == 200
    assert http.get("/api/v1/pipelines", headers=auth(other + "x")).status_code == 401
    log = (web_stack.state_dir / "logs" / "web.log").read_text()
    assert "GET /api/v1/pipelines" in log  # the access log is there, with paths and statuses only
    assert web_stack.token not in log and other not in log
