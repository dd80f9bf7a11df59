"""The Python SDK (`import tailor`) and the CLI built on it, against a real local stack started on ports
of its own and reached only through TAILOR_GATEWAY/TAILOR_TOKEN (as a remote gateway or the chart is):
submit a dict, watch it as an iterator and with a callback, fetch artifacts with progress, refusals as
typed errors; `tailor quantize` as a one-candidate pipeline whose result `--out` downloads; and the
light client (`pip install .`, no torch) talking to the same gateway from a virtualenv of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.remote_stack import gateway_env, started_stack

import tailor
from tailor_runtime.store.manifest import sha256_file

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MODEL = EXAMPLES / "models" / "stories260K"
EVAL = EXAMPLES / "data" / "tinystories_eval.txt"
QUICK_BENCHMARK = {
    "config": {"max_eval_tokens": 512, "context_length": 128, "stride": 64, "latency_new_tokens": 4,
               "warmup": 0, "repetitions": 1, "threads": 1}
}  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with started_stack(tmp_path_factory.mktemp("sdk-stack"), first_port=52000) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack) -> tailor.Client:
    return tailor.Client(stack.address("gateway"), stack.token)


def _env(stack, tmp_path: Path) -> dict:
    return gateway_env(stack, tmp_path / "no-stack-here")


def test_submit_a_dict_watch_it_and_fetch_its_report(client, tmp_path):
    uploads: dict[str, list[tuple[int, int]]] = {}
    spec = {
        "name": "sdk-dict",
        "model": {"path": str(MODEL)},
        "data": {"eval": {"path": str(EVAL)}},
        "quantize": [{"method": "bf16"}],
        "benchmark": QUICK_BENCHMARK,
        "export": {"format": "gguf", "config": {"type": "F16"}},
    }
    submitted = client.submit(
        spec, on_upload=lambda label, path, done, total: uploads.setdefault(label, []).append((done, total))
    )
    assert set(uploads) == {"model", "data.eval"}
    model_bytes = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert uploads["model"][-1] == (model_bytes, model_bytes)  # the bar ends full, on the real size
    assert spec["model"] == {"path": str(MODEL)}  # the caller's dict is not rewritten

    snapshots = list(client.watch(submitted.id[:10]))  # any unique prefix of 8+ characters
    assert snapshots and snapshots[-1].done and snapshots[-1].state == "succeeded"
    assert all(not s.done for s in snapshots[:-1])
    seen = []
    final = client.wait(submitted.id, on_update=seen.append)  # on a finished pipeline: its last state
    assert seen and final.state == "succeeded" and final.recommended in ("bf16", "original")
    assert {c["name"] for c in final.summary["candidates"]} >= {"bf16"}
    assert final.stage("quantize/bf16").state == "succeeded"
    assert submitted.id in {p.id for p in client.pipelines()}

    export = next(s for s in final.stages if s.kind == "export")
    exported = client.download(export.results[0], tmp_path / "gguf")
    modelfile = next(p for p in exported if p.name == "Modelfile").read_text()
    assert "ollama create sdk-dict -f Modelfile" in modelfile  # the pipeline's name, not a content hash

    progress: list[tuple[int, int]] = []
    files = client.download(final.report_id, tmp_path / "report",
                            on_progress=lambda done, total: progress.append((done, total)))  # fmt: skip
    manifest = client.artifact(final.report_id).manifest
    assert sorted(f.name for f in files) == sorted(Path(f["path"]).name for f in manifest["files"])
    assert progress[-1][0] == progress[-1][1] == sum(f["size"] for f in manifest["files"])
    for f in manifest["files"]:
        assert sha256_file(next(p for p in files if p.as_posix().endswith(f["path"]))) == f["sha256"]


def test_refusals_are_typed_and_name_what_to_change(client, tmp_path):
    with pytest.raises(tailor.RequestRefused) as bad_config:
        client.validate({"name": "typo", "model": {"path": str(MODEL)}, "data": {"eval": {"path": str(EVAL)}},
                         "quantize": [{"method": "rtn", "config": {"bitz": 4}}]})  # fmt: skip
    assert bad_config.value.code().name == "INVALID_ARGUMENT" and "bitz" in bad_config.value.details()
    with pytest.raises(tailor.RequestRefused) as missing:
        client.pipeline("0123456789abcdef")
    assert missing.value.code().name == "NOT_FOUND"
    with pytest.raises(tailor.ClientError, match="does not exist"):
        client.submit(str(tmp_path / "nope.yaml"))
    with pytest.raises(tailor.ClientError, match="quantize.0.method"):
        client.validate({"name": "x", "model": {"path": str(MODEL)}, "data": {"eval": {"path": str(EVAL)}},
                         "quantize": [{}]})  # fmt: skip
    failing = {"name": "sdk-gate", "model": {"path": str(MODEL)}, "data": {"eval": {"path": str(EVAL)}},
               "quantize": [{"method": "int8_dynamic"}], "benchmark": QUICK_BENCHMARK,
               "select": {"constraints": {"max_size_mb": 0.000001}}}  # fmt: skip
    done = client.run(failing)  # nothing fits: the pipeline still succeeds, with no recommendation
    assert done.state == "succeeded" and not any(c.get("feasible") for c in done.summary["candidates"])


def test_tailor_quantize_goes_through_the_gateway_and_out_downloads_it(stack, client, tmp_path):
    out = tmp_path / "int8"
    proc = subprocess.run(
        [sys.executable, "-m", "tailor_cli.main", "quantize", "--model", str(MODEL), "--method", "int8_dynamic",
         "--eval", str(EVAL), "--out", str(out)],
        env=_env(stack, tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = next(
        line.split()[2].rstrip(";") for line in proc.stdout.splitlines() if "quantized model" in line
    )
    artifact = client.artifact(result)  # owned by the token's project: the gateway recorded it
    assert artifact.made_by == "quantize"
    listed = {a.id: a for a in client.artifacts()}
    assert listed[result].pipeline_name == "quantize-int8_dynamic" and listed[result].stored is not None
    assert listed[client.upload(EVAL).id].pipeline_name == ""  # an upload: no pipeline made it
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f["path"] for f in artifact.manifest["files"])

    base = client.upload(MODEL).id  # already stored: the same id as the one the first run uploaded
    strict = subprocess.run(
        [sys.executable, "-m", "tailor_cli.main", "quantize", "--model", base[:12], "--method", "nf4",
         "--eval", str(EVAL), "--max-ppl-increase", "0.001"],
        env=_env(stack, tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    said = strict.stdout + strict.stderr
    assert strict.returncode != 0 and "Traceback" not in said
    assert "rejected" in said and "--max-ppl-increase" in said, said[-2000:]


@pytest.mark.slow
def test_the_light_client_installs_without_torch_and_talks_to_the_gateway(stack, tmp_path):
    """`pip install .` (no extras): the CLI and SDK with grpcio, protobuf, rich, pyyaml and pydantic only."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(ROOT), "-w", str(wheels)], check=True, timeout=300)  # fmt: skip
    venv = tmp_path / "light"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *map(str, wheels.glob("*.whl"))],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    installed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    names = {p["name"].lower() for p in json.loads(installed)}
    assert "grpcio" in names and not names & {"torch", "transformers", "numpy", "boto3", "opentelemetry-sdk"}

    env = _env(stack, tmp_path)
    listed = subprocess.run([str(venv / "bin" / "tailor"), "pipeline", "list", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    script = (
        "import json, sys, tailor\n"
        "c = tailor.Client()\n"
        f"a = c.upload({str(EVAL)!r})\n"
        "print(json.dumps({'id': a.id, 'kind': a.kind, 'methods': [m.name for m in c.capabilities().quantize_methods],"
        " 'torch': 'torch' in sys.modules}))\n"
    )
    sdk = subprocess.run([str(venv / "bin" / "python"), "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert sdk.returncode == 0, sdk.stderr[-3000:]
    reply = json.loads(sdk.stdout)
    assert reply["kind"] == "dataset" and len(reply["id"]) == 64 and not reply["torch"]
    assert "nf4" in reply["methods"]
    up = subprocess.run(
        [str(venv / "bin" / "tailor"), "up"], env=env, capture_output=True, text=True, timeout=60
    )
    assert up.returncode == 2 and "pip install '.[all]'" in up.stdout.replace("\n", "")
