"""An S3 outage on a real server: Ceph's RADOS Gateway is stopped (the cluster and its data stay) while
work publishes. An operation whose publish hits the outage fails with UNAVAILABLE and says so, publishing
nothing; the gateway's own report publish retries with backoff and succeeds once the store is back; the
re-dispatched operation then publishes the same artifact; and everything stored before still verifies.

Runner and engine level, not a whole stack: the test mode that makes stack tests fast is refused on
s3://, and real stages would make this minutes long. Stays under a minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from support.s3_server import start_rgw, stop_rgw

from tailor.common.v1 import common_pb2 as common
from tailor_gateway import state as st
from tailor_gateway.engine import Engine
from tailor_gateway.spec import parse_spec, plan
from tailor_gateway.workers import WorkerPools
from tailor_runtime.operations import OperationRunner, WorkResult
from tailor_runtime.store.s3 import S3Store

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "tailor-outage"
TERMINAL = (
    common.OPERATION_STATE_SUCCEEDED,
    common.OPERATION_STATE_FAILED,
    common.OPERATION_STATE_CANCELLED,
)


def _store(s3_server, prefix: str) -> S3Store:
    # Few attempts and short timeouts inside the store: the retrying under test is the platform's.
    return S3Store.from_url(
        f"s3://{BUCKET}/{prefix}",
        endpoint_url=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
        create_bucket=True,
        connect_timeout=2,
        read_timeout=10,
        max_attempts=2,
    )


def _verify_everything(store: S3Store, expected: set[str], tmp: Path) -> None:
    """Every manifest matches its id and every file its sha256, read back from S3."""
    listed = {artifact_id for artifact_id, _ in store.list_manifests()}
    assert expected <= listed, expected - listed
    for artifact_id in listed:
        manifest = store.get_manifest(artifact_id)  # checks the manifest against its id
        dest = tmp / artifact_id
        store.download(artifact_id, dest)  # checks each file while reading
        for entry in manifest.files:
            data = (dest / entry.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry.sha256 and len(data) == entry.size


def _folder(root: Path, name: str, files: int, size: int) -> Path:
    folder = root / name
    folder.mkdir()
    for i in range(files):
        (folder / f"part-{i:02d}.bin").write_bytes(
            hashlib.sha256(f"{name}{i}".encode()).digest() * (size // 32)
        )
    return folder


def test_store_outage_mid_publish_loses_nothing(s3_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tailor.gateway.engine")
    store = _store(s3_server, f"run-{uuid.uuid4().hex[:8]}")
    work_dir = Path(tempfile.mkdtemp(dir=tmp_path))

    # Stored before the outage: a real model folder and a multi-file artifact.
    before = {
        store.publish_directory(ROOT / "examples" / "models" / "stories260K", kind="model", format="hf").id,
        store.publish_directory(_folder(work_dir, "earlier", 4, 256 << 10), kind="model", format="test").id,
    }

    # 1. An operation publishes 6 files; the gateway of S3 goes away after the second one.
    payload = _folder(work_dir, "payload", 6, 128 << 10)
    puts = {"n": 0}
    real_put = store._put_file

    def put_then_outage(key, src):
        real_put(key, src)
        puts["n"] += 1
        if puts["n"] == 2:
            stop_rgw(s3_server)

    def work(progress):
        progress(10.0, "publishing")
        manifest = store.publish_directory(payload, kind="model", format="test", name="payload")
        return WorkResult(results=[manifest])

    async def run_operation() -> common.Operation:
        runner = OperationRunner("quantizer", store)
        op = runner.start("quantize", work)
        async for snapshot in runner.watch(op.id):
            if snapshot.state in TERMINAL:
                return snapshot
        raise AssertionError("watch ended early")

    store._put_file = put_then_outage
    outage_started = time.monotonic()
    try:
        op = asyncio.run(run_operation())
        assert op.state == common.OPERATION_STATE_FAILED
        assert op.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "unreachable" in op.error.message and "nothing was lost" in op.error.message, op.error
        assert not op.results

        # 2. The gateway's report publish meets the same outage: it retries with backoff; the store
        # comes back after a few seconds, and the report is published.
        report_done = _report_through_outage(store, s3_server, tmp_path)
    finally:
        store._put_file = real_put
        start_rgw(s3_server)  # whatever happened, the other tests get their server back
    assert report_done["seconds_unavailable"] >= 3
    assert any("store unavailable" in r.getMessage() for r in caplog.records)
    report_id = report_done["report"]["id"]  # published within the engine's 40 s retry budget
    print(f"outage to report published: {time.monotonic() - outage_started:.1f} s")

    # 3. Nothing half-published: the payload has no manifest, so it does not exist...
    assert not any(m.name == "payload" for _, m in store.list_manifests())
    # ... and the operation, dispatched again as the gateway does after UNAVAILABLE, now publishes it.
    op = asyncio.run(run_operation())
    assert op.state == common.OPERATION_STATE_SUCCEEDED, op.error.message
    payload_id = op.results[0].id

    # 4. Everything stored, before and after, is intact.
    _verify_everything(store, before | {report_id, payload_id}, tmp_path / "check")


def _report_through_outage(store: S3Store, s3_server, tmp_path: Path) -> dict:
    """Engine._run_report on a pipeline whose other stages are done, while RGW is down."""
    spec_yaml = yaml.safe_dump(
        {"name": "outage", "model": {"artifact": "a" * 64}, "data": {"eval": {"artifact": "b" * 64}}}
    )
    spec = parse_spec(spec_yaml)
    state = st.StateStore(tmp_path / "gateway.db")
    now = time.time()
    p = st.PipelineRow("p-outage", "proj", "outage", spec_yaml, st.RUNNING, now, now)
    state.create_pipeline(
        p, [st.StageRow(p.id, s.name, s.kind, i, s.depends_on, s.params) for i, s in enumerate(plan(spec))]
    )
    state.set_stage(
        p.id, "benchmark/original", state=st.SUCCEEDED, metrics={"perplexity": 4.2, "size_mb": 1.0}
    )
    state.set_stage(
        p.id, "select", state=st.SUCCEEDED, metrics={"recommended_id": "original", "verdicts": []}
    )
    stages = {s.name: s for s in state.stages(p.id)}
    engine = Engine(state, WorkerPools({}), store, unavailable_retry_s=40)
    back_after_s = 4.0

    def bring_back():
        time.sleep(back_after_s)
        start_rgw(s3_server)

    async def main():
        started = time.monotonic()
        thread = threading.Thread(target=bring_back, daemon=True)
        thread.start()
        await engine._run_report(p, spec, stages["report"], stages)
        thread.join()
        return time.monotonic() - started

    seconds = asyncio.run(main())
    row = state.get_pipeline(p.id)
    assert {s.name: s for s in state.stages(p.id)}["report"].state == st.SUCCEEDED
    return {"report": row.report, "seconds_unavailable": seconds}
