"""Mutual TLS: the whole stack with TAILOR_TLS_CERT/KEY/CA set. A pipeline runs (the gateway reaches its
workers over mTLS); a client without a certificate, or without TLS, is refused before any RPC.
Certificates are made here with openssl. Stage work is the test mode (TAILOR_FAKE_WORK=instant)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
import pytest
import yaml

from tailor.connection import Connection
from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from tailor.transfer import upload
from tailor_cli.stack import Stack, free_base_port

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> dict[str, Path]:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=tailor-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name in ("service", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return {n: d / n for n in ("ca.pem", "service.pem", "service.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    env = {
        "TAILOR_TLS_CA": str(certs["ca.pem"]),
        "TAILOR_TLS_CERT": str(certs["service.pem"]),
        "TAILOR_TLS_KEY": str(certs["service.key"]),
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():  # this process's health checks and clients use them too
        mp.setenv(k, v)
    stack = Stack(
        tmp_path_factory.mktemp("tls"),
        base_port=free_base_port(),
        extra_env={"TAILOR_FAKE_WORK": "instant", "TAILOR_GRACE_SECONDS": "2"},
    )
    try:
        stack.start(timeout=120)
        yield stack, certs
    finally:
        stack.stop()
        mp.undo()


def test_pipeline_runs_over_mutual_tls(tls_stack, monkeypatch):
    stack, certs = tls_stack
    monkeypatch.setenv("TAILOR_TLS_CERT", str(certs["client.pem"]))
    monkeypatch.setenv("TAILOR_TLS_KEY", str(certs["client.key"]))
    conn = Connection(stack.address("gateway"), stack.token)
    spec = {
        "name": "tls",
        "model": {"artifact": upload(conn, EXAMPLES / "models" / "stories260K").artifact.id},
        "data": {"eval": {"artifact": upload(conn, EXAMPLES / "data" / "tinystories_eval.txt").artifact.id}},
        "quantize": [{"method": "nf4"}],
    }
    stub = conn.gateway_stub()
    p = stub.CreatePipeline(
        gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec)), metadata=conn.metadata()
    )
    deadline = time.monotonic() + 60
    while (
        p.state not in (gw.PIPELINE_STATE_SUCCEEDED, gw.PIPELINE_STATE_FAILED) and time.monotonic() < deadline
    ):
        time.sleep(0.2)
        p = stub.GetPipeline(gw.GetPipelineRequest(pipeline_id=p.id), metadata=conn.metadata())
    assert p.state == gw.PIPELINE_STATE_SUCCEEDED, p.error.message


def test_clients_without_a_certificate_are_refused(tls_stack):
    stack, certs = tls_stack
    address, meta = stack.address("gateway"), [("authorization", f"Bearer {stack.token}")]
    plain = grpc.insecure_channel(address)
    no_cert = grpc.secure_channel(address, grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes()))
    for channel in (plain, no_cert):
        with pytest.raises(grpc.RpcError) as err:
            gw_grpc.GatewayServiceStub(channel).ListPipelines(
                gw.ListPipelinesRequest(), metadata=meta, timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
