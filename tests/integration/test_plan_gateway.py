"""The planner inside the gateway, on a real local stack (its workers report this machine's hardware in
ListMethods): `tailor plan` / Client.plan print every stage's predicted needs; a spec whose fine-tune
cannot fit the workers' memory is refused at validation and at CreatePipeline (FAILED_PRECONDITION)
naming the stage, the numbers, the worker's figures and what would fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from support.model_configs import LLAMA3_70B
from support.remote_stack import gateway_env, started_stack

import tailor
from tailor_runtime.hardware import memory_gb

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "models" / "stories260K"
TRAIN = ROOT / "examples" / "data" / "tinystories_train.txt"
EVAL = ROOT / "examples" / "data" / "tinystories_eval.txt"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with started_stack(tmp_path_factory.mktemp("plan-stack"), first_port=53400) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack) -> tailor.Client:
    return tailor.Client(stack.address("gateway"), stack.token)


def _big_model(folder: Path) -> Path:
    """A folder with the 70B's config.json and stories260K's tokenizer and (tiny) weights: the gateway
    plans from config.json alone, so nothing of 140 GB is needed to be refused."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_70B))
    for f in MODEL.iterdir():
        if f.name != "config.json" and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _spec(model: Path, **finetune) -> dict:
    return {
        "name": "plan-check",
        "model": {"path": str(model)},
        "data": {"train": {"path": str(TRAIN)}, "eval": {"path": str(EVAL)}},
        "finetune": {"method": "lora", "config": finetune},
        "quantize": [{"method": "rtn", "config": {"group_size": -1}}],
    }


def test_plan_lists_every_model_stage_with_the_workers_hardware(client):
    stages = {s.name: s for s in client.plan(_spec(MODEL, steps=2))}
    assert {"finetune", "quantize/rtn", "benchmark/original", "benchmark/rtn", "benchmark/base"} <= set(
        stages
    )
    finetune = stages["finetune"].plans[0]
    assert finetune.fits is True and finetune.device == "cpu"  # the local workers report no GPU
    assert abs(float(finetune.machine.split(": ")[1].split(" GiB")[0]) - memory_gb()) < 0.1
    assert 0 < finetune.host_peak_gb < 1 and finetune.terms["frozen base"] == MODEL_PARAMS * 4
    assert stages["benchmark/original"].plans[0].fits is None  # the benchmarker reports no hardware
    # A spec that fits is created as before (the gateway plans it again from the stored config.json).
    created = client.submit(_spec(MODEL, steps=2))
    assert created.id and client.cancel(created.id).id == created.id


MODEL_PARAMS = 260_032  # stories260K (tests/unit/test_planner.py counts it against transformers)


def test_a_finetune_that_fits_no_worker_is_refused_naming_the_stage_and_the_alternatives(client, tmp_path):
    big = _big_model(tmp_path / "llama3-70b-config")
    with pytest.raises(tailor.RequestRefused) as refused:
        client.plan(_spec(big))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details()
    assert message.startswith("finetune cannot fit any worker of its pool")
    assert f"the worker has {memory_gb():.1f} GiB" in message
    assert "GiB of host memory" in message and "needs a worker with more memory" in message
    # CreatePipeline refuses it too, once the inputs are uploaded (the gateway reads the stored config).
    with pytest.raises(tailor.RequestRefused) as submitted:
        client.submit(_spec(big))
    assert submitted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert submitted.value.details().startswith("finetune cannot fit")


def test_tailor_plan_prints_the_table(stack, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(_spec(MODEL, steps=2)))
    done = subprocess.run(
        [sys.executable, "-m", "tailor_cli.main", "plan", str(spec)],
        capture_output=True, text=True, env={**gateway_env(stack, tmp_path / "state"), "COLUMNS": "250"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "plan (predicted, not measured)" in done.stdout
    assert "finetune" in done.stdout and "quantize/rtn" in done.stdout and "yes" in done.stdout
