"""Trust between services, on real worker processes: a worker takes calls from the gateway only (the
stack's shared secret, or the gateway's certificate over mutual TLS), its operations are scoped to the
project each call names, health stays open, a worker without any configured proof refuses to start; and
`tailor up` restarts a worker killed with SIGKILL, after which a pipeline still runs.

Stage work is the test mode (TAILOR_FAKE_WORK=instant; a long TAILOR_FAKE_WORK_SECONDS keeps operations
running while other projects try to reach them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.ports import free_port

from tailor.common.v1 import common_pb2 as common
from tailor.common.v1 import common_pb2_grpc as common_grpc
from tailor.connection import Connection
from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.quantizer.v1 import quantizer_service_pb2 as qpb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as qgrpc
from tailor.transfer import guess_format, upload
from tailor_cli.stack import free_base_port, health_status
from tailor_runtime.store import open_store
from tailor_runtime.trust import PROJECT_KEY

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "models" / "stories260K"
SECRET = "s3cret-of-this-test-stack"
TERMINAL = (
    common.OPERATION_STATE_SUCCEEDED,
    common.OPERATION_STATE_FAILED,
    common.OPERATION_STATE_CANCELLED,
)


def _worker_env(root: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILOR_")}
    return {
        **env,
        "TAILOR_PORT": str(port),
        "TAILOR_STORE_URL": str(root / "store"),
        "TAILOR_CACHE_DIR": str(root / "cache"),
        "TAILOR_FAKE_WORK": "instant",
        "TAILOR_FAKE_WORK_SECONDS": "60",
        "TAILOR_MAX_OPERATIONS": "8",
        "TAILOR_GRACE_SECONDS": "1",
        **extra,
    }


def _start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_serving(proc: subprocess.Popen, address: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while health_status(address) != "SERVING":
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"{address} not serving: {log.read_text()[-2000:]}"
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _meta(secret: str | None = SECRET, project: str | None = None) -> list[tuple[str, str]]:
    meta = [("authorization", f"Bearer {secret}")] if secret else []
    return meta + ([(PROJECT_KEY, project)] if project else [])


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """One real quantizer process that trusts the secret in its TAILOR_WORKER_SECRET_FILE."""
    root = tmp_path_factory.mktemp("worker")
    secret_file = root / "worker-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    store = open_store(str(root / "store"))
    kind, fmt = guess_format(MODEL)
    model = store.publish_directory(MODEL, kind=kind, format=fmt, name="stories260K")
    port = free_port()
    log = root / "quantizer.log"
    proc = _start(
        "tailor_quantizer", _worker_env(root, port, TAILOR_WORKER_SECRET_FILE=str(secret_file)), log
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(proc, address, log)
        yield address, model.id, log
    finally:
        _stop(proc)
    assert SECRET not in log.read_text()  # the secret is never logged


def _quantize_request(model_id: str, seed: int) -> qpb.QuantizeRequest:
    return qpb.QuantizeRequest(
        model=common.ArtifactRef(id=model_id),
        method="bf16",
        seed=seed,
        gate=qpb.AccuracyGate(disabled=True),
    )


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)  # a server stream fails at its first message
    return err.value.code()


def test_anonymous_and_wrong_secret_calls_are_refused(worker):
    address, model_id, _ = worker
    channel = grpc.insecure_channel(address)
    quantizer, ops = qgrpc.QuantizerServiceStub(channel), common_grpc.OperationsServiceStub(channel)
    calls = {
        "Quantize": lambda m: quantizer.Quantize(_quantize_request(model_id, 1), metadata=m, timeout=10),
        "ListMethods": lambda m: quantizer.ListMethods(qpb.ListMethodsRequest(), metadata=m, timeout=10),
        "ListOperations": lambda m: ops.ListOperations(
            common.ListOperationsRequest(), metadata=m, timeout=10
        ),
        "GetOperation": lambda m: ops.GetOperation(
            common.GetOperationRequest(operation_id="x"), metadata=m, timeout=10
        ),
        "CancelOperation": lambda m: ops.CancelOperation(
            common.CancelOperationRequest(operation_id="x"), metadata=m, timeout=10
        ),
        "WatchOperation": lambda m: ops.WatchOperation(
            common.WatchOperationRequest(operation_id="x"), metadata=m, timeout=10
        ),
    }
    for name, call in calls.items():
        for metadata in ([], [(PROJECT_KEY, "a")], _meta("wrong", "a"), [("authorization", SECRET)]):
            assert _code(lambda c=call, m=metadata: c(m)) == grpc.StatusCode.UNAUTHENTICATED, (name, metadata)
    # The gateway's proof is accepted (and the refusals above were not for some other reason).
    # (ListMethods probes every library on first call: seconds on a loaded machine, hence the long deadline)
    assert quantizer.ListMethods(qpb.ListMethodsRequest(), metadata=_meta(), timeout=60).methods


def test_health_and_reflection_stay_open(worker):
    address, _, _ = worker
    channel = grpc.insecure_channel(address)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for s in next(answers).list_services_response.service}
    assert "tailor.quantizer.v1.QuantizerService" in names


def test_a_project_sees_only_its_own_operations(worker):
    address, model_id, _ = worker
    channel = grpc.insecure_channel(address)
    quantizer, ops = qgrpc.QuantizerServiceStub(channel), common_grpc.OperationsServiceStub(channel)
    op_a = quantizer.Quantize(_quantize_request(model_id, 101), metadata=_meta(project="team-a"), timeout=30)
    op_b = quantizer.Quantize(_quantize_request(model_id, 102), metadata=_meta(project="team-b"), timeout=30)
    assert op_a.state not in TERMINAL and op_b.state not in TERMINAL

    listed = ops.ListOperations(common.ListOperationsRequest(), metadata=_meta(project="team-b")).operations
    assert op_b.id in {o.id for o in listed} and op_a.id not in {o.id for o in listed}
    nobody = ops.ListOperations(common.ListOperationsRequest(), metadata=_meta()).operations
    assert list(nobody) == []

    get_a = common.GetOperationRequest(operation_id=op_a.id)
    cancel = common.CancelOperationRequest(operation_id=op_a.id)
    watch = common.WatchOperationRequest(operation_id=op_a.id)
    for metadata in (_meta(project="team-b"), _meta()):
        assert _code(lambda m=metadata: ops.GetOperation(get_a, metadata=m)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda m=metadata: ops.CancelOperation(cancel, metadata=m)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda m=metadata: ops.WatchOperation(watch, metadata=m)) == grpc.StatusCode.NOT_FOUND
    # B's failed cancel left A's operation running; A itself can read and cancel it.
    assert ops.GetOperation(get_a, metadata=_meta(project="team-a")).state not in TERMINAL
    ops.CancelOperation(common.CancelOperationRequest(operation_id=op_a.id), metadata=_meta(project="team-a"))
    ops.CancelOperation(common.CancelOperationRequest(operation_id=op_b.id), metadata=_meta(project="team-b"))
    deadline = time.monotonic() + 30
    while (state := ops.GetOperation(get_a, metadata=_meta(project="team-a")).state) not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert state == common.OPERATION_STATE_CANCELLED
    # Starting work needs a project: the gateway always names one.
    assert (
        _code(lambda: quantizer.Quantize(_quantize_request(model_id, 103), metadata=_meta(), timeout=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_a_worker_without_a_proof_to_check_refuses_to_start(tmp_path):
    env = _worker_env(tmp_path, free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "tailor_selector"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "TAILOR_WORKER_SECRET_FILE" in proc.stderr and "TAILOR_GATEWAY_IDENTITIES" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- mutual TLS: the gateway's certificate is the proof -----------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _certs(d: Path, names: tuple[str, ...]) -> None:
    """A CA and, per name, a certificate it signed with that CN and DNS name (plus 127.0.0.1)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name in names:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{name},IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip


def _tls_channel(d: Path, address: str, name: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.pem").read_bytes(),
        private_key=(d / f"{name}.key").read_bytes(),
        certificate_chain=(d / f"{name}.pem").read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def test_the_gateway_certificate_is_accepted_and_a_worker_certificate_is_not(tmp_path):
    _certs(tmp_path, ("tailor-gateway", "tailor-quantizer"))
    port = free_port()
    env = _worker_env(
        tmp_path,
        port,
        TAILOR_TLS_CA=str(tmp_path / "ca.pem"),
        TAILOR_TLS_CERT=str(tmp_path / "tailor-quantizer.pem"),
        TAILOR_TLS_KEY=str(tmp_path / "tailor-quantizer.key"),
        TAILOR_GATEWAY_IDENTITIES="tailor-gateway",
    )
    log = tmp_path / "selector.log"
    proc = _start("tailor_selector", env, log)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # health over mTLS with the gateway's certificate
            try:
                health_pb2_grpc.HealthStub(_tls_channel(tmp_path, address, "tailor-gateway")).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                break
            except grpc.RpcError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.3)
        from tailor.selector.v1 import selector_service_pb2 as spb
        from tailor.selector.v1 import selector_service_pb2_grpc as sgrpc

        request = spb.SelectRequest()
        as_gateway = sgrpc.SelectorServiceStub(_tls_channel(tmp_path, address, "tailor-gateway"))
        try:
            as_gateway.Select(request, timeout=10)
        except grpc.RpcError as exc:  # an empty request may be refused, but not as unauthenticated
            assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, exc.details()
        as_worker = sgrpc.SelectorServiceStub(_tls_channel(tmp_path, address, "tailor-quantizer"))
        assert _code(lambda: as_worker.Select(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        _stop(proc)


# --- `tailor up` supervises ---------------------------------------------------------------------------
def _stack_info(state: Path) -> dict:
    try:
        return json.loads((state / "stack.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _until(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}; tailor up said:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    return value


def test_tailor_up_restarts_a_killed_worker_and_pipelines_still_run(tmp_path):
    state, out = tmp_path / "state", tmp_path / "up.log"
    base = free_base_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TAILOR_")},
        "TAILOR_FAKE_WORK": "instant",
        "TAILOR_GRACE_SECONDS": "1",
    }
    with open(out, "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "tailor_cli.main", "--state-dir", str(state), "up", "--port", str(base)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        info = _until(lambda: _stack_info(state).get("pids"), 240, "the stack did not start", out)
        _until(lambda: "stops the stack" in out.read_text(), 240, "the stack is not healthy", out)
        assert (state / "worker-secret").stat().st_mode & 0o777 == 0o600
        victim = info["quantizer"]
        os.kill(victim, signal.SIGKILL)

        def restarted():
            now = _stack_info(state)
            return now if now.get("pids", {}).get("quantizer") not in (None, victim) else None

        now = _until(restarted, 60, "the killed quantizer was not restarted", out)
        assert now["restarts"] == {"quantizer": 1}
        assert {s: p for s, p in now["pids"].items() if s != "quantizer"} == {
            s: p for s, p in info.items() if s != "quantizer"
        }  # nobody else was touched
        address = now["services"]["quantizer"]
        _until(
            lambda: health_status(address) == "SERVING", 120, "the restarted quantizer is not serving", out
        )
        assert "quantizer restarted" in (state / "logs" / "supervisor.log").read_text()

        conn = Connection.discover(state)
        spec = {
            "name": "after-a-crash",
            "model": {"artifact": upload(conn, MODEL).artifact.id},
            "data": {
                "eval": {"artifact": upload(conn, ROOT / "examples/data/tinystories_eval.txt").artifact.id}
            },
            "quantize": [{"method": "nf4"}],
        }
        stub = conn.gateway_stub()
        p = stub.CreatePipeline(
            gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec)), metadata=conn.metadata()
        )

        def finished():
            got = stub.GetPipeline(gw.GetPipelineRequest(pipeline_id=p.id), metadata=conn.metadata())
            done = (gw.PIPELINE_STATE_SUCCEEDED, gw.PIPELINE_STATE_FAILED, gw.PIPELINE_STATE_CANCELLED)
            return got if got.state in done else None

        final = _until(finished, 120, "the pipeline did not finish", out)
        assert final.state == gw.PIPELINE_STATE_SUCCEEDED, final.error.message
        assert up.poll() is None  # `tailor up` itself kept running
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()


def test_the_charts_generated_certificates_work_between_real_processes(tmp_path):
    """The chart's genCA/genSignedCert output, as the pods mount it: a worker with its own certificate
    accepts the gateway's (verified under the shared name tailor-workers, as the gateway dials pod IPs), not
    another worker's; kubelet's plaintext health port answers and serves nothing else."""
    import base64
    import shutil

    helm = shutil.which("helm") or str(ROOT / ".tools/node_modules/.bin/helm")
    if not Path(helm).is_file():
        pytest.fail("helm is needed to render the chart: run `make system-deps`")
    rendered = subprocess.run(
        [helm, "template", "tailor", str(ROOT / "charts/tailor"), "--namespace", "tailor", "--kube-version", "1.32.0", "--show-only",
         "templates/internal-tls.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    data = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Secret")["data"]
    for key, value in data.items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    port, health = free_port(), free_port()
    env = _worker_env(
        tmp_path,
        port,
        TAILOR_TLS_CA=str(tmp_path / "ca.crt"),
        TAILOR_TLS_CERT=str(tmp_path / "selector.crt"),
        TAILOR_TLS_KEY=str(tmp_path / "selector.key"),
        TAILOR_GATEWAY_IDENTITIES="tailor-gateway",
        TAILOR_HEALTH_PORT=str(health),
    )
    log = tmp_path / "selector.log"
    proc = _start("tailor_selector", env, log)
    try:
        _wait_serving(proc, f"127.0.0.1:{health}", log)  # plaintext, as kubelet probes

        def channel(name: str) -> grpc.Channel:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=(tmp_path / "ca.crt").read_bytes(),
                private_key=(tmp_path / f"{name}.key").read_bytes(),
                certificate_chain=(tmp_path / f"{name}.crt").read_bytes(),
            )
            options = [("grpc.ssl_target_name_override", "tailor-workers")]  # TAILOR_WORKER_TLS_SERVER_NAME
            return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)

        from tailor.selector.v1 import selector_service_pb2 as spb
        from tailor.selector.v1 import selector_service_pb2_grpc as sgrpc

        try:
            sgrpc.SelectorServiceStub(channel("gateway")).Select(spb.SelectRequest(), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE), (
                exc.details()
            )
        worker = sgrpc.SelectorServiceStub(channel("quantizer"))
        assert (
            _code(lambda: worker.Select(spb.SelectRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        )
        probe_port = sgrpc.SelectorServiceStub(grpc.insecure_channel(f"127.0.0.1:{health}"))
        assert (
            _code(lambda: probe_port.Select(spb.SelectRequest(), timeout=10)) == grpc.StatusCode.UNIMPLEMENTED
        )
    finally:
        _stop(proc)
