"""GGUF, llama.cpp's model file: write one from a Tailor Llama folder, and read one back into PyTorch.

Writing (`write_gguf`) reads the safetensors tensor by tensor and writes them with gguf-py's GGUFWriter
under llama.cpp's names and metadata keys for the `llama` architecture, with the tokenizer as llama.cpp's
SentencePiece ("llama") vocabulary (see `tailor_runtime.ml.gguf_vocab`). Three things are translated, not
copied:

* RoPE layout. llama.cpp's `llama` architecture rotates interleaved pairs (x0, x1), (x2, x3), ... of each
  head (Meta's original layout); Hugging Face's `rotate_half` rotates (x_i, x_{i + d/2}). So the output rows
  of q_proj and k_proj are permuted per head (k_proj with the number of KV heads), exactly as llama.cpp's
  convert_hf_to_gguf.py does for LlamaForCausalLM; the reader applies the inverse permutation.
* Tensor types. gguf-py quantizes F16, Q8_0 and Q4_0 itself (blocks of 32 along each row). Following
  llama.cpp's own converter and quantizer: 1-D tensors (norms) stay F32; a row length that is not a multiple
  of the block size falls back to F16 (stories260K's ffn_down rows are 172 wide); in Q4_0 files the output
  matrix (the token embedding when tied) gets Q8_0, as llama-quantize keeps it at higher precision.
* K-quants. gguf-py 0.19 can dequantize Q4_K but not quantize it, so Q4_K_M is made by llama.cpp's own
  quantizer (llama-cpp-python's `llama_model_quantize`) from an F32 GGUF written here first. K-quants use
  super-blocks of 256 along each row: llama.cpp picks fallback types per tensor for narrower rows (see
  `tensor_types` for what a file really holds).

Reading (`load_gguf_model`) builds a LlamaForCausalLM from the GGUF metadata alone and dequantizes every
tensor with gguf-py, so Tailor can measure a GGUF's quality with its own PyTorch code (perplexity, logits).
"""

from __future__ import annotations

import ctypes
import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tailor_runtime.errors import FailedPrecondition, InvalidArgument

GGUF_FILE = "model.gguf"
ARCH = "llama"
# Written by gguf-py here; Q4_K_M needs llama.cpp's quantizer (llama-cpp-python).
GGUFPY_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
LLAMA_CPP_TYPES = ("Q4_K_M",)
GGUF_TYPES = GGUFPY_TYPES + LLAMA_CPP_TYPES
SUPPORTED = "LlamaForCausalLM (model_type 'llama', SiLU MLP, default RoPE, no attention/MLP biases)"

# Hugging Face Llama parameter name (after "model.layers.N.") -> llama.cpp tensor name (after "blk.N.").
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters llama.cpp needs from an HF config.json; InvalidArgument naming what is supported."""
    arch = (config.get("architectures") or ["?"])[0]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    problems = []
    if arch != "LlamaForCausalLM" or config.get("model_type") != "llama":
        problems.append(f"architecture {arch} (model_type {config.get('model_type')!r})")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention or MLP biases")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {config['hidden_act']!r}")
    if problems:
        raise InvalidArgument(f"cannot write GGUF for {', '.join(problems)}; supported: {SUPPORTED}")
    heads = config["num_attention_heads"]
    return {
        "hidden": config["hidden_size"],
        "intermediate": config["intermediate_size"],
        "layers": config["num_hidden_layers"],
        "heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "context": config.get("max_position_embeddings", 2048),
        "rms_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        "vocab": config["vocab_size"],
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def to_interleaved_rope(w: Any, n_heads: int) -> Any:
    """Per head, rows in HF half-split order -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_half_split_rope(w: Any, n_heads: int) -> Any:
    """The inverse of `to_interleaved_rope`: llama.cpp's row order back to Hugging Face's."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(gguf_type: str, gguf_name: str, shape: tuple[int, ...], tied: bool) -> str:
    """The GGML type of one tensor in a file of `gguf_type` (F32, F16, Q8_0 or Q4_0)."""
    if len(shape) == 1 or gguf_type == "F32":
        return "F32"
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    wanted = "Q8_0" if gguf_type == "Q4_0" and is_output else gguf_type
    if wanted != "F16" and shape[-1] % 32:  # Q8_0 / Q4_0 blocks are 32 values along a row
        return "F16"
    return wanted


def _source_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file (one, or shards) that holds it."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidArgument(f"{model_dir} has no *.safetensors weights")
    index = {}
    for path in files:
        with safe_open(path, "pt") as f:
            index |= dict.fromkeys(f.keys(), path)
    return index


def _read_tensor(path: Path, name: str) -> Any:
    """One tensor as float32 numpy (bf16/f16 checkpoints are widened before quantizing)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name).float().numpy()


def write_gguf(model_dir: Path, out_path: Path, gguf_type: str = "F16", name: str | None = None) -> dict:
    """Write `model_dir` (an hf-safetensors Llama folder) to `out_path` as GGUF of `gguf_type`.

    Returns {"gguf_type", "tensor_types": {type: count}, "fallbacks": {tensor: type}, "bytes"}.
    Same folder, type and name -> the same bytes (no timestamps or paths go into the file).
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if gguf_type not in GGUF_TYPES:
        raise InvalidArgument(f"unknown GGUF type {gguf_type!r}", choices=GGUF_TYPES)
    if gguf_type in LLAMA_CPP_TYPES:
        return _write_with_llama_cpp(model_dir, out_path, gguf_type, name)
    import gguf

    from tailor_runtime.ml.gguf_vocab import add_vocab

    config = json.loads((model_dir / "config.json").read_text())
    hp = llama_hparams(config)
    index = _source_index(model_dir)
    # use_temp_file: each tensor goes to a spooled file as it is added, so memory holds one tensor at a time.
    writer = gguf.GGUFWriter(str(out_path), ARCH, use_temp_file=True)
    ftype = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}[gguf_type]
    _add_metadata(writer, hp, name or model_dir.name, gguf.LlamaFileType[ftype])
    add_vocab(writer, model_dir, hp["vocab"])

    fallbacks: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for hf_name in _llama_cpp_order(index, hp):
        gguf_name, data = _gguf_name(hf_name), _read_tensor(index[hf_name], hf_name)
        if gguf_name.endswith(".attn_q.weight"):
            data = to_interleaved_rope(data, hp["heads"])
        elif gguf_name.endswith(".attn_k.weight"):
            data = to_interleaved_rope(data, hp["kv_heads"])
        qtype = _tensor_type(gguf_type, gguf_name, data.shape, hp["tied"])
        if len(data.shape) > 1 and qtype == "F16" and gguf_type not in ("F16", "F32"):
            fallbacks[gguf_name] = "F16"
        raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
        writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
        counts[qtype] += 1
    _finish(writer)
    return {
        "gguf_type": gguf_type,
        "tensor_types": dict(sorted(counts.items())),
        "fallbacks": fallbacks,
        "bytes": out_path.stat().st_size,
    }


def _add_metadata(writer: Any, hp: dict[str, Any], name: str, ftype: Any) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["intermediate"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(float(hp["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hp["rms_eps"]))
    writer.add_vocab_size(hp["vocab"])
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # the block layouts written


def _llama_cpp_order(index: dict[str, Path], hp: dict[str, Any]) -> list[str]:
    """The HF tensor names in llama.cpp's usual order; rejects tensors a llama GGUF has no place for."""
    names = {k for k in index if not k.endswith("rotary_emb.inv_freq")}
    if hp["tied"]:
        names.discard("lm_head.weight")  # the same matrix as the embedding: llama.cpp reuses token_embd
    order = ["model.embed_tokens.weight"]
    for i in range(hp["layers"]):
        order += [f"model.layers.{i}.{suffix}" for suffix in _LAYER_TENSORS]
    order += ["model.norm.weight"] + ([] if hp["tied"] else ["lm_head.weight"])
    missing = [k for k in order if k not in names]
    extra = sorted(names - set(order))
    if missing or extra:
        raise InvalidArgument(
            f"the weights do not match a {SUPPORTED} checkpoint: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    return order


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    _, _, layer, suffix = hf_name.split(".", 3)  # model.layers.N.<suffix>
    return f"blk.{layer}.{_LAYER_TENSORS[suffix]}"


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- llama.cpp's quantizer -----------------------------------------------------------------------------


def llama_cpp_availability() -> tuple[bool, str]:
    """Whether llama-cpp-python (llama.cpp's library, native code included) loads here."""
    from tailor_runtime.libraries import importable

    return importable("llama_cpp")


def require_llama_cpp(purpose: str) -> None:
    """FailedPrecondition naming the package to install unless llama-cpp-python loads here."""
    ok, why = llama_cpp_availability()
    if not ok:
        raise FailedPrecondition(
            f"{purpose} needs llama.cpp (llama-cpp-python), and {why}; install it: "
            "pip install -r requirements-llamacpp.txt"
        )


def _write_with_llama_cpp(model_dir: Path, out_path: Path, gguf_type: str, name: str | None) -> dict:
    """F32 GGUF written here, then quantized by llama.cpp itself (the only K-quant writer available)."""
    ok, why = llama_cpp_availability()
    if not ok:
        raise FailedPrecondition(
            f"GGUF {gguf_type} needs llama.cpp's quantizer: {why}; install requirements-llamacpp.txt, "
            f"or choose one of {', '.join(GGUFPY_TYPES)}"
        )
    import llama_cpp

    # llama.cpp logs a line per tensor; the types are returned instead. CRITICAL, not ERROR: llama-cpp-python
    # 0.3.36 maps llama.cpp's log levels with an outdated table, which turns its warnings into errors.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    work = Path(tempfile.mkdtemp(prefix=".gguf-f32-", dir=out_path.parent))
    try:
        source = work / "f32.gguf"  # K-quants are computed from float32 weights, not from a rounded F16
        write_gguf(model_dir, source, "F32", name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(out_path).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise FailedPrecondition(f"llama.cpp's llama_model_quantize failed ({rc}) making {gguf_type}")
    finally:
        logger.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)
    types = tensor_types(out_path)
    counts = Counter(types.values())
    nominal = {"Q4_K_M": ("Q4_K", "Q6_K")}[gguf_type]  # the types Q4_K_M uses when rows allow it
    return {
        "gguf_type": gguf_type,
        "tensor_types": dict(sorted(counts.items())),
        # 2-D tensors llama.cpp stored in a type other than the file type's own K-quants.
        "fallbacks": {n: t for n, t in types.items() if t not in nominal and not _is_norm(n)},
        "bytes": out_path.stat().st_size,
    }


def _is_norm(gguf_name: str) -> bool:
    return gguf_name.endswith("_norm.weight")


# --- reading ---------------------------------------------------------------------------------------------


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> its GGML type name (F32, F16, Q8_0, Q4_K, ...), in file order."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def llama_config_from_gguf(reader: Any) -> Any:
    """A transformers LlamaConfig equivalent to a `llama` GGUF's metadata."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise InvalidArgument(f"GGUF architecture {arch!r} cannot be read; supported: {ARCH!r}")
    p = f"{ARCH}."
    heads = _field(reader, p + "attention.head_count")
    hidden = _field(reader, p + "embedding_length")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=_field(reader, p + "vocab_size", len(tokens) if tokens else 32000),
        hidden_size=hidden,
        intermediate_size=_field(reader, p + "feed_forward_length"),
        num_hidden_layers=_field(reader, p + "block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_field(reader, p + "attention.head_count_kv", heads),
        head_dim=_field(reader, p + "attention.key_length", hidden // heads),
        max_position_embeddings=_field(reader, p + "context_length", 2048),
        rms_norm_eps=_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": _field(reader, p + "rope.freq_base", 10000.0)},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", 1),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", 2),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def dequantized_state_dict(reader: Any, config: Any) -> dict[str, Any]:
    """HF parameter name -> float32 torch tensor, every GGUF tensor dequantized and un-permuted."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    to_hf = {v: k for k, v in _GLOBAL_TENSORS.items()}
    for i in range(config.num_hidden_layers):
        to_hf |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for h, g in _LAYER_TENSORS.items()}
    state = {}
    for t in reader.tensors:
        if t.name not in to_hf:
            raise InvalidArgument(f"GGUF tensor {t.name!r} has no place in a {SUPPORTED} model")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name.endswith(".attn_q.weight"):
            data = to_half_split_rope(data, config.num_attention_heads)
        elif t.name.endswith(".attn_k.weight"):
            data = to_half_split_rope(data, config.num_key_value_heads)
        # A copy: F32 tensors would otherwise be read-only views of the memory-mapped file.
        state[to_hf[t.name]] = torch.from_numpy(np.array(data, dtype=np.float32, order="C", copy=True))
    return state


def load_gguf_model(path: Path) -> Any:
    """A float32 LlamaForCausalLM on CPU (eval mode) holding the GGUF's weights, dequantized."""
    import gguf
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    reader = gguf.GGUFReader(str(path))
    config = llama_config_from_gguf(reader)
    state = dequantized_state_dict(reader, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # assign=True adopts the dequantized tensors instead of copying into unallocated meta ones.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise InvalidArgument(f"{path}: GGUF lacks {missing[:3]} / has unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # RoPE's inverse frequencies are a computed buffer, not a weight: rebuild it off the meta device.
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model.eval()
