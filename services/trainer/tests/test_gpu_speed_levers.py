"""The speed options on a CUDA GPU (FlexAttention's backward exists only there): a tiny random Llama
(heads of 16, FlexAttention's narrowest) trained on packed Alpaca records with each option gives the
plain path's losses within bf16's tolerance; same seed, same batches.

    python -m pytest -m gpu services/trainer/tests/test_gpu_speed_levers.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.families import tiny_model

REPO = Path(__file__).resolve().parents[3]
# The device machine has no ../shared: the bench's carried copy (.whl/data) is named by TAILOR_ALPACA.
ALPACA = Path(os.environ.get("TAILOR_ALPACA", REPO.parent / "shared/data/sft/alpaca/alpaca_100.json"))
# bf16 base on a GPU: another attention kernel or fused layer sums in another order, and the updates
# carry that on over the steps; losses of about 7 agree to a few 1e-3.
LOSS_TOLERANCE = 2e-2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=1)


def prepared(folder: Path, tmp: Path, **options):
    """(model, params, batch_at, to_device) for a LoRA run of the tiny Llama on packed Alpaca rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tailor_trainer.datasets import ExampleBatches, build_examples
    from tailor_trainer.lora import LoraTrainConfig, build_peft_model, resolve_target_modules
    from tailor_trainer.speed import FLEX_ATTR, pad_to_width

    # The first 300 usable records (the 5000-record file has a few with an empty output, refused).
    records = [r for r in json.loads(ALPACA.read_text()) if r["instruction"].strip() and r["output"].strip()]
    data = tmp / "alpaca_300.json"
    data.write_text(json.dumps(records[:300]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples, _ = build_examples(data, tokenizer, "alpaca", 512, "truncate")
    batches = ExampleBatches(examples, 4, 512, True, 0, 0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    cfg = LoraTrainConfig(r=8, gradient_checkpointing=True, **options)
    model = build_peft_model(base, cfg, resolve_target_modules(base, None))
    assert getattr(base, FLEX_ATTR, False) == (options.get("attention") == "flex")  # what is measured
    params = [p for p in model.parameters() if p.requires_grad]
    batch_at = (lambda s: pad_to_width(batches.batch(s), 512, 0)) if cfg.compile_layers else batches.batch
    to_device = lambda b: {k: v.to("cuda") if hasattr(v, "to") else v for k, v in b.items()}  # noqa: E731
    return model, params, batch_at, to_device


def losses(folder: Path, tmp: Path, **options) -> list[float]:
    from tailor_trainer.loop import train

    model, params, batch_at, to_device = prepared(folder, tmp, **options)
    return train(model, params, batch_at, 6, 1e-3, lambda *a, **k: None, to_device=to_device).losses


@pytest.mark.parametrize(
    "options",
    [{"fused_kernels": False}, {"fused_kernels": False, "compile_layers": True}],
    ids=["eager", "compile"],
)
def test_forward_and_backward_are_queued_without_a_host_synchronisation(folder, tmp_path, options):
    """A wait for the GPU between forward and backward idles it while the host launches the backward:
    under torch's sync debug mode "error" a step's loss and backward raise at any such wait. Without
    Liger's fused linear cross-entropy, whose forward reads its count of labelled positions with
    .item() (liger_kernel/ops/fused_linear_cross_entropy.py, with a TODO of Liger's own on it): that
    is the one wait a step with fused_kernels keeps."""
    import torch

    from tailor_trainer.loop import LABEL_POSITIONS, batch_loss, with_label_positions

    model, _params, batch_at, to_device = prepared(folder, tmp_path, **options)
    batch = to_device(with_label_positions(batch_at(1)))
    batch_loss(model, batch).backward()  # the first step compiles (which waits): not the one checked
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch_loss(model, batch).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Without the host's label positions, the loss finds them on the GPU, which waits: the check can fail.
    del batch[LABEL_POSITIONS]
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            batch_loss(model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "options",
    [{"attention": "flex"}, {"compile_layers": True}, {"attention": "flex", "compile_layers": True}],
    ids=["flex", "compile", "flex+compile"],
)
def test_speed_options_keep_the_losses(folder, tmp_path, options):
    plain = losses(folder, tmp_path)
    fast = losses(folder, tmp_path, **options)
    gap = max(abs(a - b) for a, b in zip(plain, fast, strict=True))
    print(f"{options}: losses {[round(x, 4) for x in fast]} vs {[round(x, 4) for x in plain]}, gap {gap:.2e}")
    assert gap < LOSS_TOLERANCE
