"""Speed options of the trainer (issue 15), each off by default and each with a CPU test that bounds how
much it changes the losses (tests/test_speed_levers.py).

- Document-masked FlexAttention (`attention="flex"`): packed rows carry a dense block-diagonal
  [B, 1, T, T] mask for SDPA, which computes every cross-document block and then throws it away.
  FlexAttention takes a BlockMask built from where the position ids restart, and skips the blocks that
  are all masked (most of a long row packed with short documents).
- Regional compilation (`compile_layers`): `torch.compile` of each decoder layer module (not of the whole
  model), so the loss, the data and peft's wrapper stay eager. The layers share one code object, so
  one compilation serves all of them. Shapes are kept fixed (every batch padded to seq_len) so that no
  step after the first recompiles.
"""

from __future__ import annotations

from typing import Any

from tailor_trainer.datasets import IGNORE

FLEX_ATTR = "_tailor_flex_document_attention"
COMPILED_ATTR = "_tailor_compiled_layers"


FLEX_MIN_HEAD_DIM = 16  # torch's FlexAttention kernels: "embedding dimension ... must be at least 16"


def flex_supports(model: Any) -> bool:
    """Whether FlexAttention's kernels take this model's attention heads."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim >= FLEX_MIN_HEAD_DIM


def use_flex_document_attention(model: Any) -> None:
    """Switch this model instance to transformers' flex_attention; `loop.batch_loss` then passes it a
    document BlockMask instead of the dense mask (transformers returns a 4-D BlockMask as it is)."""
    model.set_attn_implementation("flex_attention")
    setattr(model, FLEX_ATTR, True)


def document_block_mask(position_ids: Any) -> Any:
    """A causal BlockMask that keeps each token within its own document of the packed row: a document
    starts wherever the position ids restart at 0 (datasets.collate restarts them per example and for
    the padding at the end of a row, so padding is a document of its own and never attended to)."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = (position_ids == 0).cumsum(-1)
    rows, width = position_ids.shape

    def same_document_causal(b, h, q, kv):
        return (documents[b, q] == documents[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, rows, None, width, width, device=position_ids.device)


def compile_decoder_layers(model: Any) -> int:
    """`torch.compile` each decoder layer of this model in place (nn.Module.compile: the module object,
    its parameters and gradient checkpointing's wrapper stay as they are); returns how many."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        # Fixed shapes (see pad_to_width): no dynamic-shape graphs, no recompilation after the first step.
        layer.compile(dynamic=False)
    setattr(base, COMPILED_ATTR, True)
    return len(layers)


def pad_to_width(batch: dict[str, Any], width: int, pad_id: int) -> dict[str, Any]:
    """`batch` (datasets.collate's layout) padded on the right to `width` tokens: the padding carries no
    label, its positions restart at 0 and its mask block is causal within itself (a document of its own),
    so no real token sees it and the losses are unchanged."""
    import torch

    rows, current = batch["input_ids"].shape
    extra = width - current
    if extra <= 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_full((rows, extra), pad_id)], 1)
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((rows, extra), IGNORE)], 1)
    tail_positions = torch.arange(extra, dtype=batch["position_ids"].dtype).expand(rows, extra)
    # The old padding (if any) and the new one would share positions restarting twice: harmless, both
    # are unlabelled documents of their own.
    out["position_ids"] = torch.cat([batch["position_ids"], tail_positions], 1)
    if "attention_mask" in batch and batch["attention_mask"].dim() == 4:
        mask = torch.zeros((rows, 1, width, width), dtype=torch.bool)
        mask[:, :, :current, :current] = batch["attention_mask"]
        mask[:, :, current:, current:] = torch.tril(torch.ones(extra, extra, dtype=torch.bool))
        out["attention_mask"] = mask
    return out
