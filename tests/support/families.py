"""Tiny models of every registered architecture family, built from transformers' own config classes.

Random weights, stories260K's tokenizer (512 tokens, so every stage can read the bundled text): for
plumbing, parity and export checks only, never for quality claims. Each folder is written exactly as
`save_pretrained` writes it, with no `tailor_format.json`, because that is what users bring.

`reexpress_stories260k(family, folder)` is the other kind: stories260K's trained weights written,
exactly, into another family's layout (Mistral, Qwen2 with zero q/k/v biases, Phi-3 with fused q/k/v and
gate/up). Same function, so the same perplexity: real quality checks for those families.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STORIES = EXAMPLES / "models" / "stories260K"

_COMMON = {"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
_DECODER = {
    **_COMMON,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def _configs() -> dict[str, Any]:
    import transformers as tf

    llama3_rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 500000.0,
    }
    return {
        # Llama 1/2: multi-head attention, tied embeddings (as stories260K).
        "llama": tf.LlamaConfig(**{**_DECODER, "num_key_value_heads": 4}, tie_word_embeddings=True),
        # Llama 3: grouped-query attention, llama3 rope scaling, untied embeddings.
        "llama3": tf.LlamaConfig(**_DECODER, rope_parameters=llama3_rope, tie_word_embeddings=False),
        "mistral": tf.MistralConfig(**_DECODER, sliding_window=None, tie_word_embeddings=False),
        # q/k/v biases.
        "qwen2": tf.Qwen2Config(**_DECODER, tie_word_embeddings=True),
        # q/k norms, explicit head_dim.
        "qwen3": tf.Qwen3Config(**_DECODER, head_dim=16, tie_word_embeddings=True),
        # fused qkv_proj and gate_up_proj.
        "phi3": tf.Phi3Config(**_DECODER, tie_word_embeddings=False),
        # soft-capping, scaled embeddings, (1+w) norms.
        "gemma2": tf.Gemma2Config(
            **_DECODER, head_dim=16, query_pre_attn_scalar=16, sliding_window=256, tie_word_embeddings=True
        ),
        "gemma3": tf.Gemma3TextConfig(
            **_DECODER, head_dim=16, query_pre_attn_scalar=16, sliding_window=256, tie_word_embeddings=True
        ),
        # Conv1D layers, LayerNorm, learned positions.
        "gpt2": tf.GPT2Config(**_COMMON, n_embd=64, n_layer=2, n_head=4, n_positions=512),
        # mixture of experts.
        "mixtral": tf.MixtralConfig(
            **_DECODER, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
        ),
    }


TINY_FAMILIES = (
    "llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2", "mixtral"
)  # fmt: skip


def tiny_config(name: str):
    return _configs()[name]


def tiny_model(name: str, folder: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Save a random-weight tiny `name` model (a TINY_FAMILIES entry) with stories260K's tokenizer as a
    plain Hugging Face folder (safetensors, no tailor_format.json); returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name)).to(getattr(torch, dtype))
    folder = Path(folder)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES, local_files_only=True).save_pretrained(folder)
    return folder


# --- stories260K's trained weights in other families' layouts ------------------------------------------

REEXPRESSED = ("mistral", "qwen2", "phi3")


def reexpress_stories260k(family: str, folder: Path) -> Path:
    """stories260K (Llama) written exactly as a `family` model (a REEXPRESSED entry): same function."""
    import json

    import torch
    import transformers as tf
    from safetensors.torch import load_file

    config = json.loads((STORIES / "config.json").read_text())
    weights = load_file(STORIES / "model.safetensors")
    shape = {
        k: config[k]
        for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
            "tie_word_embeddings", "rope_parameters",
        )
    }  # fmt: skip
    if family == "mistral":
        new_config = tf.MistralConfig(**shape, head_dim=config["head_dim"], sliding_window=None)
        new_weights = dict(weights)
    elif family == "qwen2":
        new_config = tf.Qwen2Config(**shape)
        new_weights = dict(weights)
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.self_attn"
            for proj in ("q_proj", "k_proj", "v_proj"):
                rows = weights[f"{prefix}.{proj}.weight"].shape[0]
                new_weights[f"{prefix}.{proj}.bias"] = torch.zeros(rows)
    elif family == "phi3":
        new_config = tf.Phi3Config(**shape, pad_token_id=None)
        new_weights = {}
        for key, tensor in weights.items():
            if any(p in key for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                continue
            new_weights[key] = tensor
        for layer in range(config["num_hidden_layers"]):
            attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
            new_weights[f"{attn}.qkv_proj.weight"] = torch.cat(
                [weights[f"{attn}.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
            )
            new_weights[f"{mlp}.gate_up_proj.weight"] = torch.cat(
                [weights[f"{mlp}.{p}.weight"] for p in ("gate_proj", "up_proj")]
            )
    else:
        raise ValueError(
            f"stories260K cannot be re-expressed exactly as {family!r}; choose from {REEXPRESSED}"
        )
    model = tf.AutoModelForCausalLM.from_config(new_config)
    missing, unexpected = model.load_state_dict(new_weights, strict=False)
    # A tied head has no weight of its own; everything else must be accounted for.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if new_config.tie_word_embeddings:
        model.tie_weights()
    folder = Path(folder)
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(STORIES, local_files_only=True).save_pretrained(folder)
    return folder
