"""A trainer process killed with SIGKILL mid-run: the same request on a new process resumes from the last
checkpoint in the store and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format
from support.ports import free_port

from tailor.common.v1 import common_pb2 as common
from tailor.common.v1 import common_pb2_grpc as common_grpc
from tailor.trainer.v1 import trainer_service_pb2 as pb
from tailor.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tailor_cli.stack import health_status
from tailor_runtime.operations import to_struct
from tailor_runtime.progress import no_progress
from tailor_runtime.store import open_store
from tailor_trainer.lora import LoraTrainConfig, finetune_lora

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
TRAIN = REPO / "examples" / "data" / "tinystories_train.txt"
CONFIG = {"steps": 40, "checkpoint_every": 10, "batch_size": 8, "seq_len": 128, "lr_schedule": "cosine"}
# Same data order, optimizer, scheduler and RNG state: on the same CPU and thread count the resumed run
# repeats the uninterrupted one exactly; the bound allows for nothing more than float summation order.
LOSS_TOLERANCE = 1e-5
# peft's import pulls torch.ao modules that use TorchScript, deprecated in torch 2.13 (still works).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script")


def _start(root: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "TAILOR_STORE_URL": str(root / "store"),
        "TAILOR_CACHE_DIR": str(root / "cache"),
        "TAILOR_PORT": str(port),
        "TAILOR_INSECURE_OPEN_WORKER": "true",  # called directly, not through a gateway
        "OMP_NUM_THREADS": "1",  # the same thread count as the reference run below
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailor_trainer"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while health_status(f"127.0.0.1:{port}") != "SERVING":
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "trainer never became SERVING"
        time.sleep(0.3)
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    store = open_store(str(root / "store"))
    model = store.publish_directory(MODEL, kind="model", format="hf-safetensors", name="stories260K")
    data = root / "data"
    data.mkdir()
    shutil.copy(TRAIN, data / "train.txt")
    dataset = store.publish_directory(data, kind="dataset", format="text", name="train")
    return root, store, model.id, dataset.id


def _request(inputs) -> pb.FineTuneRequest:
    _, _, model_id, dataset_id = inputs
    return pb.FineTuneRequest(
        base_model=common.ArtifactRef(id=model_id),
        dataset=common.ArtifactRef(id=dataset_id),
        method="lora",
        config=to_struct(CONFIG),
    )


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_the_last_checkpoint(inputs):
    root, store, _, _ = inputs
    port = free_port()
    proc = _start(root, port)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    op = pb_grpc.TrainerServiceStub(channel).FineTune(_request(inputs))
    killed_at = 0
    for event in common_grpc.OperationsServiceStub(channel).WatchOperation(
        common.WatchOperationRequest(operation_id=op.id)
    ):
        step = json_format.MessageToDict(event.operation.progress.metrics).get("step", 0)
        if step >= 13:  # past the checkpoint of step 10
            proc.send_signal(signal.SIGKILL)
            killed_at = int(step)
            break
    proc.wait(timeout=30)
    channel.close()
    assert 13 <= killed_at < 40, "the run must be killed part-way"
    assert any(m.name.startswith("checkpoint-step") for _, m in store.list_manifests("checkpoint"))

    # A new process, the same request (what the gateway does when a worker is lost).
    proc = _start(root, port := free_port())
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        op = pb_grpc.TrainerServiceStub(channel).FineTune(_request(inputs))
        for event in common_grpc.OperationsServiceStub(channel).WatchOperation(
            common.WatchOperationRequest(operation_id=op.id)
        ):
            op = event.operation
        assert op.state == common.OPERATION_STATE_SUCCEEDED, op.error.message
        resumed = json_format.MessageToDict(op.metrics)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert 10 <= resumed["resumed_from_step"] < killed_at + 1

    # The uninterrupted reference, same thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = finetune_lora(
            MODEL, TRAIN, root / "ref-merged", root / "ref-adapter", LoraTrainConfig(**CONFIG), no_progress
        )
    finally:
        torch.set_num_threads(before)
    print(f"final loss resumed {resumed['final_loss']:.6f} vs uninterrupted {reference['final_loss']:.6f}")
    assert abs(resumed["final_loss"] - reference["final_loss"]) < LOSS_TOLERANCE
    assert len(resumed["loss_curve"]) == 40
    assert (
        max(abs(a - b) for a, b in zip(resumed["loss_curve"], reference["loss_curve"], strict=True))
        < LOSS_TOLERANCE
    )
