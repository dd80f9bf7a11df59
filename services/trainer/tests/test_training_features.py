"""Gradient accumulation, learning-rate schedules, evaluation during training, early stopping and the
best weights kept: stories260K on real TinyStories text and Alpaca records, a handful of steps each."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from support.threads import torch_threads

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.stage import validate_config
from tailor_trainer.loop import lr_factor
from tailor_trainer.lora import LoraTrainConfig, finetune_lora

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
TRAIN = REPO / "examples" / "data" / "tinystories_train.txt"
ALPACA = REPO.parent / "shared" / "data" / "sft" / "alpaca" / "alpaca_100.json"

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):  # see support.threads
        yield


class Recorder:
    def __init__(self):
        self.training: list[dict] = []

    def __call__(self, percent, phase="", message="", **metrics):
        if phase == "training":
            self.training.append({"message": message, **metrics})


def run(tmp_path: Path, name: str, data: Path = TRAIN, progress=None, **config) -> tuple[dict, Path]:
    cfg = LoraTrainConfig(merge=False, **{"batch_size": 4, "seq_len": 64, **config})
    out = tmp_path / name
    metrics = finetune_lora(MODEL, data, out / "merged", out / "adapter", cfg, progress or Recorder())
    return metrics, out / "adapter"


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- gradient accumulation ------------------------------------------------------------------------


def test_two_micro_batches_of_b_give_the_losses_of_one_batch_of_2b(tmp_path):
    """End to end (float32, as a user runs it): same seed, same Alpaca rows; 2 x 4 rows accumulated
    give the losses of 8 rows at once, the second one measured after the accumulated update."""
    common = {"steps": 2, "seq_len": 256, "eval_fraction": 0.0, "learning_rate": 1e-2}
    big, _ = run(tmp_path, "big", ALPACA, batch_size=8, **common)
    accumulated, _ = run(tmp_path, "acc", ALPACA, batch_size=4, gradient_accumulation_steps=2, **common)
    # Measured: 4.7902427 vs 4.7902431, then 3.6697242 vs 3.6697245 (relative 1e-7: summation order).
    assert accumulated["loss_curve"] == pytest.approx(big["loss_curve"], rel=1e-6)
    assert accumulated["gradient_accumulation_steps"] == 2 and accumulated["tokens_per_s"] > 0
    # The check can fail: 4 rows a step (no accumulation) train on other rows and end elsewhere.
    small, _ = run(tmp_path, "small", ALPACA, batch_size=4, **common)
    assert small["loss_curve"][1] != pytest.approx(big["loss_curve"][1], rel=1e-3)


@pytest.mark.slow
def test_accumulated_steps_update_the_adapter_as_one_big_batch_does():
    """The LoRA weights after 3 steps, in float64 so that float32's rounding does not hide a real
    difference: AdamW divides by sqrt(v) + 1e-8, so in float32 a weight whose gradient is near 1e-8
    turns rounding noise into a visible step (measured: one LoRA A entry 7.5e-4 apart after 3 steps,
    every other below 2e-5). Measured in float64 (the loss itself is float32 cross-entropy): at most
    4.2e-6 apart, against 5.8e-2 without accumulation."""
    from tailor_runtime.ml.model_io import load_causal_lm
    from tailor_trainer.datasets import ExampleBatches, build_examples
    from tailor_trainer.loop import train
    from tailor_trainer.lora import build_peft_model, resolve_target_modules

    def trained(batch_size: int, accumulation: int) -> list[torch.Tensor]:
        model, tok = load_causal_lm(MODEL)
        model = model.to(torch.float64)
        model = build_peft_model(model, LoraTrainConfig(), resolve_target_modules(model, None))
        examples, _ = build_examples(ALPACA, tok, "alpaca", 256, "truncate")
        batches = ExampleBatches(examples, batch_size, 256, packing=True, seed=0, pad_id=0)
        params = [p for p in model.parameters() if p.requires_grad]
        train(model, params, batches.batch, 3, 1e-2, lambda *a, **k: None, accumulation=accumulation)
        return [p.detach() for p in params]

    big, accumulated, small = trained(8, 1), trained(4, 2), trained(4, 1)
    apart = max(float((a - b).abs().max()) for a, b in zip(big, accumulated, strict=True))
    without = max(float((a - b).abs().max()) for a, b in zip(big, small, strict=True))
    print(f"accumulated vs one batch: {apart:.2e}; without accumulation: {without:.2e}")
    assert apart < 1e-5 and without > 1e-2


def test_accumulation_weights_micro_batches_by_their_labelled_tokens():
    """Micro-batches with different numbers of labelled tokens: the accumulated gradient is the big
    batch's (token-weighted), which a plain average of the micro-batch losses is not."""
    from tailor_runtime.ml.model_io import load_causal_lm
    from tailor_trainer.datasets import IGNORE, build_examples, collate
    from tailor_trainer.loop import accumulate_gradients, batch_loss

    model, tok = load_causal_lm(MODEL)
    examples, _ = build_examples(ALPACA, tok, "alpaca", 256, "truncate")
    first, second = collate([[e] for e in examples[:1]], 0), collate([[e] for e in examples[1:4]], 0)
    assert int((first["labels"] != IGNORE).sum()) != int((second["labels"] != IGNORE).sum())
    params = [p for p in model.parameters() if p.requires_grad]

    def grads() -> torch.Tensor:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        model.zero_grad(set_to_none=True)
        return flat

    batch_loss(model, collate([[e] for e in examples[:4]], 0)).backward()
    whole = grads()
    loss, tokens = accumulate_gradients(model, params, iter([first, second]), 1, lambda b: b)
    accumulated = grads()
    ((batch_loss(model, first) + batch_loss(model, second)) / 2).backward()
    averaged = grads()
    # Measured (float32): 8.5e-7 apart against a largest gradient of 1.04; the plain average of the
    # micro-batch losses is off by 2.6e-1.
    assert (accumulated - whole).abs().max() < 1e-5 * whole.abs().max()
    assert (averaged - whole).abs().max() > 1e-2 * whole.abs().max()
    assert math.isfinite(loss) and tokens == first["real_tokens"] + second["real_tokens"]


# --- learning-rate schedules ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rates_per_step_follow_the_schedule_after_warm_up(tmp_path, schedule):
    progress = Recorder()
    metrics, _ = run(
        tmp_path, schedule, steps=8, batch_size=1, seq_len=32, learning_rate=1e-2,
        lr_schedule=schedule, warmup_steps=3, eval_fraction=0.0, progress=progress,
    )  # fmt: skip
    rates = metrics["learning_rates"]
    assert rates[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2])  # warm-up: 1/3, 2/3, 3/3
    expected = {
        "constant": [1e-2] * 5,
        # after warm-up, 5 steps decay towards 10% at step 8 (reached after the last step)
        "linear": [1e-2 * (1 - 0.9 * k / 5) for k in range(5)],
        "cosine": [1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 5))) for k in range(5)],
    }[schedule]
    assert rates[3:] == pytest.approx(expected)
    assert [p["learning_rate"] for p in progress.training] == pytest.approx(rates)
    if schedule != "constant":
        assert rates[3:] == sorted(rates[3:], reverse=True) and rates[-1] < 0.5e-2


def test_lr_factor_ends_at_ten_percent():
    assert lr_factor(10, "linear", 0, 10) == pytest.approx(0.1)
    assert lr_factor(10, "cosine", 0, 10) == pytest.approx(0.1)
    assert lr_factor(0, "linear", 2, 10) == pytest.approx(0.5)


# --- evaluation, early stopping, the best weights -------------------------------------------------


def test_eval_losses_are_recorded_every_n_steps_and_at_the_last(tmp_path):
    progress = Recorder()
    metrics, _ = run(tmp_path, "every3", steps=7, eval_every=3, learning_rate=1e-3, progress=progress)
    steps = [e["step"] for e in metrics["eval_losses"]]
    assert steps == [3, 6, 7]
    assert all(math.isfinite(e["loss"]) for e in metrics["eval_losses"])
    # A small learning rate: the eval loss falls (measured 2.466 -> 2.422 over 6 steps at 1e-3), so the
    # last evaluation is the best and the run is not stopped.
    assert metrics["best_step"] == 7 and metrics["stopped_early"] is False and metrics["steps"] == 7
    assert metrics["eval_loss"] == min(e["loss"] for e in metrics["eval_losses"])
    reported = {p["step"]: p.get("eval_loss") for p in progress.training}
    assert reported[3] == metrics["eval_losses"][0]["loss"] and reported[7] == metrics["eval_loss"]
    assert "eval_loss" not in progress.training[0]  # nothing evaluated before step 3


@pytest.mark.parametrize(("patience", "stop_at"), [(1, 2), (2, 3)])
def test_early_stopping_publishes_the_best_steps_weights(tmp_path, patience, stop_at):
    """At learning rate 0.05 the eval loss worsens after the first step (measured 4.65, 6.27, 7.10, ...):
    the run stops after `patience` evaluations without improvement, and the adapter it publishes is
    the one of step 1, byte for byte what a 1-step run publishes."""
    hot = {"learning_rate": 0.05, "steps": 6}
    metrics, adapter = run(tmp_path, "stopped", eval_every=1, early_stopping_patience=patience, **hot)
    losses = [e["loss"] for e in metrics["eval_losses"]]
    assert [e["step"] for e in metrics["eval_losses"]] == list(range(1, stop_at + 1))
    assert losses[0] < min(losses[1:])
    assert metrics["stopped_early"] is True and metrics["steps"] == stop_at and metrics["max_steps"] == 6
    assert metrics["best_step"] == 1 and metrics["eval_loss"] == losses[0]
    assert len(metrics["loss_curve"]) == stop_at

    one_step, one_step_adapter = run(tmp_path, "one-step", **{**hot, "steps": 1})
    assert sha256(adapter / "adapter_model.safetensors") == sha256(
        one_step_adapter / "adapter_model.safetensors"
    )
    # ... and not the last step's weights.
    last, last_adapter = run(tmp_path, "last", **{**hot, "steps": stop_at})
    assert sha256(adapter / "adapter_model.safetensors") != sha256(last_adapter / "adapter_model.safetensors")


def test_eval_every_without_held_out_text_is_refused(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(TRAIN.read_text()[:3000])  # 1% of it is fewer tokens than one window
    with pytest.raises(InvalidArgument, match="eval_every needs held-out data"):
        run(tmp_path, "tiny", tiny, steps=2, eval_every=1, eval_fraction=0.01)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"eval_every": -1}, "eval_every"),
        ({"early_stopping_patience": -2}, "early_stopping_patience"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"early_stopping_patience": 2}, "early_stopping_patience needs evaluations"),
        ({"eval_every": 5, "eval_fraction": 0.0}, "eval_every needs held-out data"),
        ({"warmup_steps": 30, "steps": 30}, "warmup_steps (30) must be less than steps (30)"),
    ],
)
def test_bad_values_are_refused_with_the_field_name(config, field):
    with pytest.raises(ValidationError):
        LoraTrainConfig(**config)
    with pytest.raises(InvalidArgument) as err:
        validate_config(LoraTrainConfig, config, "lora")
    assert field in err.value.message


class FolderCheckpointer:
    """Checkpoints in a folder (the store-backed one keeps them as artifacts), saved on cancel."""

    def __init__(self, folder: Path, every: int = 0):
        self.folder, self.every, self.saved = folder, every, []

    def draining(self) -> bool:
        return False

    def restore(self, model, optimizer, scheduler):
        from tailor_trainer import checkpoint

        return checkpoint.load(self.folder, model, optimizer, scheduler) if self.saved else None

    def save(self, step, model, optimizer, scheduler, losses, evaluations=None):
        from tailor_trainer import checkpoint

        checkpoint.save(self.folder, model, optimizer, scheduler, step, losses, evaluations)
        self.saved.append(step)


def test_a_resumed_run_keeps_its_evaluations_and_the_best_weights(tmp_path):
    """Cancelled at step 4 (the best evaluation was step 1's), resumed: the same evaluations, the same
    best step and step 1's adapter, byte for byte what the uninterrupted run publishes."""
    from tailor_runtime.errors import Cancelled

    config = {"learning_rate": 0.05, "steps": 6, "eval_every": 1}
    whole, whole_adapter = run(tmp_path, "whole", **config)
    assert whole["best_step"] == 1

    def cancel_at_4(percent, phase="", message="", **metrics):
        if message == "step 4/6":
            raise Cancelled("cancelled by test")

    cfg = LoraTrainConfig(merge=False, batch_size=4, seq_len=64, **config)
    ckpt = FolderCheckpointer(tmp_path / "ckpt")
    out = tmp_path / "resumed"
    with pytest.raises(Cancelled):
        finetune_lora(MODEL, TRAIN, out / "m", out / "adapter", cfg, cancel_at_4, ckpt)
    assert ckpt.saved == [4]
    resumed = finetune_lora(MODEL, TRAIN, out / "m", out / "adapter", cfg, Recorder(), ckpt)
    assert resumed["resumed_from_step"] == 4
    assert [e["step"] for e in resumed["eval_losses"]] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in resumed["eval_losses"]] == pytest.approx(
        [e["loss"] for e in whole["eval_losses"]]
    )
    assert resumed["best_step"] == 1 and resumed["learning_rates"] == whole["learning_rates"]
    assert sha256(out / "adapter" / "adapter_model.safetensors") == sha256(
        whole_adapter / "adapter_model.safetensors"
    )


def test_finetune_operation_reports_evaluations_and_publishes_the_best_step(tmp_path):
    """Through the servicer: the operation's progress carries loss, learning rate, tokens/s and the eval
    loss while it trains; the adapter's manifest says which step's weights it holds."""
    import asyncio
    import shutil

    from google.protobuf import json_format

    from tailor.common.v1 import common_pb2 as common
    from tailor.trainer.v1 import trainer_service_pb2 as pb
    from tailor_runtime.operations import TERMINAL, OperationRunner, to_struct
    from tailor_runtime.server import ServiceContext
    from tailor_runtime.settings import ServiceSettings
    from tailor_runtime.store import open_store
    from tailor_trainer.servicer import TrainerServicer

    settings = ServiceSettings(
        service="trainer", store_url=str(tmp_path / "store"), cache_dir=tmp_path / "cache"
    )
    store = open_store(settings.store_url)
    model = store.publish_directory(MODEL, kind="model", format="hf-safetensors", name="stories260K")
    (tmp_path / "data").mkdir()
    shutil.copy(TRAIN, tmp_path / "data" / "train.txt")
    dataset = store.publish_directory(tmp_path / "data", kind="dataset", format="text", name="train")
    servicer = TrainerServicer(ServiceContext(settings, store, OperationRunner("trainer", store)))
    config = {
        "steps": 6,
        "batch_size": 4,
        "seq_len": 64,
        "learning_rate": 0.05,
        "eval_every": 1,
        "early_stopping_patience": 1,
        "gradient_accumulation_steps": 2,
        "lr_schedule": "linear",
        "merge": False,
        "checkpoint_every": 0,
    }

    async def finetune(config: dict) -> tuple[list, object]:
        request = pb.FineTuneRequest(
            base_model=common.ArtifactRef(id=model.id),
            dataset=common.ArtifactRef(id=dataset.id),
            method="lora",
            config=to_struct(config),
        )
        started = await servicer.FineTune(request, None)
        seen = []
        async for op in servicer.ctx.runner.watch(started.id):
            seen.append(json_format.MessageToDict(op.progress.metrics))
            if op.state in TERMINAL:
                return seen, op

    seen, op = asyncio.run(finetune(config))
    assert op.state == common.OPERATION_STATE_SUCCEEDED, op.error.message
    training = [m for m in seen if "step" in m]
    assert training and all(
        {"loss", "learning_rate", "tokens_per_s", "eta_s", "eval_loss"} <= m.keys() for m in training
    )
    (ref,) = op.results
    manifest = store.get_manifest(ref.id)
    assert manifest.metrics["best_step"] == 1 and manifest.metrics["stopped_early"] is True
    assert [e["step"] for e in manifest.metrics["eval_losses"]] == [1, 2]
    assert manifest.metrics["eval_loss"] == manifest.metrics["eval_losses"][0]["loss"]
    metrics = json_format.MessageToDict(op.metrics)
    assert metrics["steps"] == 2 and metrics["max_steps"] == 6 and len(metrics["learning_rates"]) == 2

    with pytest.raises(InvalidArgument, match="gradient_accumulation_steps"):
        asyncio.run(finetune({**config, "gradient_accumulation_steps": 0}))


def test_a_run_checkpointed_at_its_early_stop_stays_stopped_when_run_again(tmp_path):
    """The worker dies after the stop step's checkpoint, before publishing: the request run again
    resumes there, trains no further step and publishes the same best weights."""
    cfg = LoraTrainConfig(
        merge=False,
        batch_size=4,
        seq_len=64,
        learning_rate=0.05,
        steps=6,
        eval_every=1,
        early_stopping_patience=1,
    )
    ckpt = FolderCheckpointer(tmp_path / "ckpt", every=1)
    first = finetune_lora(MODEL, TRAIN, tmp_path / "m", tmp_path / "a1", cfg, Recorder(), ckpt)
    assert first["stopped_early"] and ckpt.saved == [1, 2]
    progress = Recorder()
    again = finetune_lora(MODEL, TRAIN, tmp_path / "m", tmp_path / "a2", cfg, progress, ckpt)
    assert progress.training == [] and again["resumed_from_step"] == 2
    assert (again["steps"], again["best_step"], again["stopped_early"]) == (2, 1, True)
    assert again["eval_losses"] == first["eval_losses"]
    assert sha256(tmp_path / "a1" / "adapter_model.safetensors") == sha256(
        tmp_path / "a2" / "adapter_model.safetensors"
    )


# --- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_runs_losses_rates_and_evaluations(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, adapter = run(
        tmp_path, "tb", steps=5, eval_every=2, tensorboard=True, lr_schedule="cosine", warmup_steps=2
    )
    events = EventAccumulator(str(adapter / "runs"))
    events.Reload()  # TensorBoard's own reader
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5]
    assert [e.value for e in losses] == pytest.approx(metrics["loss_curve"], rel=1e-6)
    rates = [e.value for e in events.Scalars("train/learning_rate")]
    assert rates == pytest.approx(metrics["learning_rates"], rel=1e-6) and rates[0] < rates[1]
    evaluated = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    assert evaluated == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in metrics["eval_losses"]]
    assert events.Scalars("train/tokens_per_s")[0].value == pytest.approx(metrics["tokens_per_s"], rel=1e-6)
    # The adapter itself is unchanged by the extra folder: peft still loads it.
    assert adapter_weights(adapter)


def test_no_event_files_unless_asked(tmp_path):
    _metrics, adapter = run(tmp_path, "plain", steps=1)
    assert not (adapter / "runs").exists()


def test_tensorboard_without_the_package_is_refused_before_training(tmp_path, monkeypatch):
    import importlib.util

    from tailor_runtime.errors import FailedPrecondition

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    progress = Recorder()
    with pytest.raises(FailedPrecondition, match="needs the tensorboard package"):
        run(tmp_path, "missing", steps=1, tensorboard=True, progress=progress)
    assert progress.training == []  # refused before the first step
