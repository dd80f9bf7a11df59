"""A decoder's shape from its config.json, and its parameter counts per part.

Pure Python (the gateway plans with it): every count is the product of the config's widths, the way the
family's modeling code builds its layers (transformers' `modeling_<family>.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tailor_runtime.errors import InvalidArgument

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Families whose MLP is two matrices (up, down) with biases and LayerNorm, not gate/up/down and RMSNorm.
_PLAIN_MLP = ("gpt2", "gpt_neox", "gptj", "opt", "phi")
# transformers' config class defaults for tie_word_embeddings when config.json leaves it out.
_TIED_BY_DEFAULT = ("gpt2", "gemma", "gemma2", "gemma3_text", "gpt_neox")


def _first(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str  # the stored weights' dtype (config.json `dtype` / `torch_dtype`)
    max_positions: int
    experts: int = 1  # routed experts per layer (Mixtral); 1 for a dense MLP
    gated: bool = True  # gate/up/down MLP (Llama, Qwen2, Mistral, Gemma) vs up/down (GPT-2, NeoX)
    learned_positions: bool = False  # GPT-2's position embedding table

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """The shape of a parsed config.json; InvalidArgument naming the missing key otherwise."""
        if isinstance(config.get("text_config"), Mapping):  # multimodal wrappers keep the decoder here
            config = {**config["text_config"], **{k: v for k, v in config.items() if k in ("dtype",)}}
        model_type = str(config.get("model_type", ""))
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first(config, "num_attention_heads", "n_head")
        vocab = config.get("vocab_size")
        for key, value in (("hidden_size", hidden), ("num_hidden_layers", layers),
                           ("num_attention_heads", heads), ("vocab_size", vocab)):  # fmt: skip
            if not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"config.json: {key} missing or not a positive integer; cannot plan")
        gated = model_type not in _PLAIN_MLP
        dtype = str(_first(config, "dtype", "torch_dtype", default="float32")).removeprefix("torch.")
        return cls(
            model_type=model_type,
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=int(_first(config, "num_key_value_heads", "n_head_kv", default=heads)),
            head_dim=int(_first(config, "head_dim", default=hidden // heads)),
            intermediate=int(_first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            vocab=vocab,
            tied=bool(config.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
            dtype=dtype if dtype in DTYPE_BYTES else "float32",
            max_positions=int(_first(config, "max_position_embeddings", "n_positions", default=2048)),
            experts=int(_first(config, "num_local_experts", "num_experts", default=1)),
            gated=gated,
            learned_positions=model_type == "gpt2",
        )

    # --- linear layers: name -> (in, out) widths per decoder layer, as LoRA and the quantizers see them
    def linears(self) -> dict[str, list[tuple[int, int]]]:
        """Each decoder layer's linear projections by leaf name (a name may occur twice: GPT-2's c_proj)."""
        q, kv, h, i = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.hidden,
            self.intermediate,
        )
        if not self.gated:  # GPT-2: fused c_attn (h -> 3h), c_proj (attention h -> h and MLP i -> h), c_fc
            return {"c_attn": [(h, q + 2 * kv)], "c_proj": [(q, h), (i, h)], "c_fc": [(h, i)]}
        found = {"q_proj": [(h, q)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(q, h)]}
        if self.model_type == "phi3":  # fused qkv_proj and gate_up_proj
            found = {"qkv_proj": [(h, q + 2 * kv)], "o_proj": [(q, h)]}
            return {**found, "gate_up_proj": [(h, 2 * i)], "down_proj": [(i, h)]}
        if self.experts > 1:  # Mixtral: experts are fused 3-D tensors, not Linear layers (architectures)
            return found
        return {**found, "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)]}

    @property
    def attention_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        biases = q + 2 * kv if self.model_type == "qwen2" else 0  # Qwen2: q/k/v bias
        biases += 0 if self.gated else q + 2 * kv + self.hidden  # GPT-2: every projection's bias
        return 2 * self.hidden * q + 2 * self.hidden * kv + biases

    @property
    def mlp_params(self) -> int:
        matrices = 3 if self.gated else 2
        router = self.hidden * self.experts if self.experts > 1 else 0
        biases = 0 if self.gated else self.intermediate + self.hidden
        return matrices * self.hidden * self.intermediate * self.experts + router + biases

    @property
    def norm_params(self) -> int:
        """Per layer: two RMSNorm weights (Gemma 2/3: four; LayerNorm: weight and bias)."""
        per = 4 if self.model_type in ("gemma2", "gemma3_text") else 2
        qk_norms = 2 * self.head_dim if self.model_type in ("qwen3", "gemma3_text") else 0  # q_norm, k_norm
        return per * self.hidden * (1 if self.gated else 2) + qk_norms

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params + self.norm_params

    @property
    def embedding_params(self) -> int:
        positions = self.max_positions * self.hidden if self.learned_positions else 0
        return self.vocab * self.hidden + positions

    @property
    def head_params(self) -> int:
        """The output projection; 0 when tied to the input embedding (one tensor, stored once)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        """What weight quantizers turn into integers: every decoder-layer projection (never the embedding
        or the head, which llm-compressor's and bitsandbytes' recipes here leave in float)."""
        per_layer = sum(i * o for shapes in self.linears().values() for i, o in shapes)
        if self.experts > 1:
            per_layer += 3 * self.hidden * self.intermediate * self.experts
        return self.layers * per_layer

    @property
    def total_params(self) -> int:
        final_norm = self.hidden * (1 if self.gated else 2)
        return self.embedding_params + self.layers * self.layer_params + final_norm + self.head_params

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def kv_cache_bytes(self, tokens: int, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Keys and values of every layer for `tokens` positions (transformers' DynamicCache)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * batch * dtype_bytes

    def parts(self) -> dict[str, int]:
        """Parameter counts by part, as `tailor plan` prints them."""
        return {
            "embedding": self.embedding_params,
            "attention (all layers)": self.layers * self.attention_params,
            "mlp (all layers)": self.layers * self.mlp_params,
            "norms": self.layers * self.norm_params + self.hidden,
            "output head": self.head_params,
            "total": self.total_params,
        }
