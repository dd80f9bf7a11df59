"""The trainer's speed options (speed.py) change no numbers beyond a stated tolerance: stories260K on real
Alpaca records (packed rows), on CPU in float32, the same seed and data order with the option on and off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.threads import torch_threads

from tailor_trainer.datasets import ExampleBatches, build_examples
from tailor_trainer.loop import batch_loss
from tailor_trainer.lora import LoraTrainConfig, finetune_lora
from tailor_trainer.speed import document_block_mask, pad_to_width

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
ALPACA = REPO.parent / "shared" / "data" / "sft" / "alpaca" / "alpaca_100.json"
# float32 on CPU: another attention kernel (or the compiler's fused one) sums in another order; the first
# steps' losses agree to rounding, the later ones after the same updates to a few 1e-6 (measured ~1e-6).
LOSS_TOLERANCE = 1e-4

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):  # see support.threads
        yield


def losses(tmp_path: Path, name: str, **options) -> list[float]:
    cfg = LoraTrainConfig(
        merge=False, steps=4, batch_size=4, seq_len=256, eval_fraction=0.0, checkpoint_every=0, **options
    )
    out = tmp_path / name
    metrics = finetune_lora(MODEL, ALPACA, out / "merged", out / "adapter", cfg, lambda *a, **k: None)
    return metrics["loss_curve"]


def test_flex_document_attention_gives_the_dense_masks_losses():
    """Forward only: FlexAttention has no backward on CPU (the GPU test trains with it)."""
    from transformers import AutoModelForCausalLM

    from tailor_trainer.speed import use_flex_document_attention

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    batches = [packed_batch(step) for step in (1, 2, 3)]
    with torch.no_grad():
        plain = [batch_loss(model, b).item() for b in batches]
        use_flex_document_attention(model)
        flex = [batch_loss(model, b).item() for b in batches]
    gap = max(abs(a - b) for a, b in zip(plain, flex, strict=True))
    print(f"flex vs sdpa + dense mask: losses {flex} vs {plain}, largest gap {gap:.2e}")
    assert gap < 1e-5


@pytest.mark.slow
def test_compiled_layers_keep_the_losses(tmp_path):
    plain = losses(tmp_path, "eager")
    compiled = losses(tmp_path, "compiled", compile_layers=True)
    gap = max(abs(a - b) for a, b in zip(plain, compiled, strict=True))
    print(f"compiled layers vs eager: losses {compiled} vs {plain}, largest gap {gap:.2e}")
    assert gap < LOSS_TOLERANCE


def packed_batch(step: int = 1):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    examples, _ = build_examples(ALPACA, tokenizer, "alpaca", 256, "truncate")
    return ExampleBatches(examples, 3, 256, True, 0, 0).batch(step)


def test_padding_to_the_width_changes_no_loss():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    batch = packed_batch()
    assert batch["input_ids"].shape[1] < 300
    padded = pad_to_width(batch, 300, 0)
    assert padded["input_ids"].shape == (3, 300) and padded["attention_mask"].shape == (3, 1, 300, 300)
    with torch.no_grad():
        assert abs(batch_loss(model, batch).item() - batch_loss(model, padded).item()) < 1e-6


def test_the_document_block_mask_is_the_dense_block_diagonal_mask():
    from torch.nn.attention.flex_attention import create_mask

    batch = packed_batch()
    block = document_block_mask(batch["position_ids"])
    rows, width = batch["input_ids"].shape
    dense = create_mask(block.mask_mod, rows, None, width, width, device="cpu")
    # Where the dense mask differs it is only inside the row's trailing padding: there the old collate
    # treats padding as one segment, the BlockMask as a document that starts at its position 0 too.
    real = batch["labels"] != -100
    keep = real[:, None, :, None] & real[:, None, None, :]
    assert torch.equal(dense[:, :1] & keep, batch["attention_mask"] & keep)
    # Blocks that cross documents are skipped: fewer than all the causal blocks are computed.
    assert block.sparsity() > 0
