"""GGUF, llama.cpp's model file: write one from a Hugging Face folder, and read one back into PyTorch.

Writing (`write_gguf`): llama.cpp's own converter (`tailor_runtime.ml.llama_cpp_convert`) writes F32, F16,
BF16 and Q8_0 for every family it knows; the other types (Q4_0, Q4_K_M) are made by llama.cpp's own
quantizer (llama-cpp-python's `llama_model_quantize`) from the converter's F32 file, as `llama-quantize`
makes them. Both follow llama.cpp's rules for the tensor types: 1-D tensors (norms) stay F32; a row length
that is not a multiple of the block size (32; 256 for K-quants) falls back to a type that fits (see
`tensor_types` for what a file really holds).

Reading (`load_gguf_model`): the GGUF's tensors dequantized with gguf-py into the PyTorch model of the
folder's own config.json (copied beside the GGUF), through transformers' GGUF tensor name maps and its
per-architecture fixes (Llama's Q/K row order, GPT-2's transposed Conv1D weights, Gemma's norm offset),
so Tailor measures a GGUF's quality with its own PyTorch code (perplexity, logits). Mistral and Mixtral are
`llama` GGUFs; Mixtral's experts are regrouped into transformers' fused expert tensors here.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from tailor_runtime.errors import FailedPrecondition, InvalidArgument

GGUF_FILE = "model.gguf"
# Written by llama.cpp's converter itself; the others by llama.cpp's quantizer (llama-cpp-python).
CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")
LLAMA_CPP_TYPES = ("Q4_0", "Q4_K_M")
GGUF_TYPES = CONVERTER_TYPES + LLAMA_CPP_TYPES
# The types a file of each quantized type uses where rows allow it (anything else is a fallback).
_NOMINAL = {"F16": ("F16",), "BF16": ("BF16",), "Q8_0": ("Q8_0",), "Q4_0": ("Q4_0", "Q8_0"), "Q4_K_M": ("Q4_K", "Q6_K")}  # fmt: skip


def write_gguf(model_dir: Path, out_path: Path, gguf_type: str = "F16", name: str | None = None) -> dict:
    """Write `model_dir` (an hf-safetensors folder of a family llama.cpp knows) to `out_path` as `gguf_type`.

    Returns {"gguf_type", "tensor_types": {type: count}, "fallbacks": {tensor: type}, "bytes"}.
    Same folder, type and name -> the same bytes (no timestamps or paths go into the file).
    """
    from tailor_runtime.ml.llama_cpp_convert import convert

    model_dir, out_path = Path(model_dir), Path(out_path)
    if gguf_type not in GGUF_TYPES:
        raise InvalidArgument(f"unknown GGUF type {gguf_type!r}", choices=GGUF_TYPES)
    if gguf_type in LLAMA_CPP_TYPES:
        _quantize_with_llama_cpp(model_dir, out_path, gguf_type, name)
    else:
        convert(model_dir, out_path, gguf_type, name)
    types = tensor_types(out_path)
    nominal = _NOMINAL.get(gguf_type, ())
    return {
        "gguf_type": gguf_type,
        "tensor_types": dict(sorted(Counter(types.values()).items())),
        # Tensors stored in another type than the file type's own because their rows do not fit its blocks
        # (llama.cpp keeps norms, biases, routers and positions in F32 by rule: those are not counted).
        "fallbacks": {n: t for n, t in types.items() if nominal and t not in nominal and t != "F32"},
        "bytes": out_path.stat().st_size,
    }


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


def _quantize_with_llama_cpp(model_dir: Path, out_path: Path, gguf_type: str, name: str | None) -> None:
    """The converter's F32 GGUF, quantized by llama.cpp itself (the only K-quant writer available)."""
    from tailor_runtime.ml.llama_cpp_convert import convert

    ok, why = llama_cpp_availability()
    if not ok:
        raise FailedPrecondition(
            f"GGUF {gguf_type} needs llama.cpp's quantizer: {why}; install requirements-llamacpp.txt, "
            f"or choose one of {', '.join(CONVERTER_TYPES)}"
        )
    import llama_cpp

    work = Path(tempfile.mkdtemp(prefix=".gguf-f32-", dir=out_path.parent))
    # llama.cpp logs a line per tensor; the types are returned instead. CRITICAL, not ERROR: llama-cpp-python
    # 0.3.36 maps llama.cpp's log levels with an outdated table, which turns its warnings into errors.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        source = work / "f32.gguf"  # quantized from float32 weights, not from a rounded F16
        convert(model_dir, source, "F32", name or model_dir.name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(out_path).encode(), ctypes.byref(params)
        )
        if rc != 0:
            out_path.unlink(missing_ok=True)
            raise FailedPrecondition(f"llama.cpp's llama_model_quantize failed ({rc}) making {gguf_type}")
    finally:
        logger.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------------------------


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> its GGML type name (F32, F16, Q8_0, Q4_K, ...), in file order."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def gguf_architecture(path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(str(path)).get_field("general.architecture")
    return "" if field is None else str(field.contents())


# Tensors llama.cpp's converter computes from the config (Llama 3's RoPE scaling factors), which
# transformers computes from the same config.
_COMPUTED = ("rope_freqs.weight",)


def dequantized_state_dict(reader: Any, model: Any) -> dict[str, Any]:
    """HF parameter name of `model` -> float32 torch tensor, every GGUF tensor dequantized and un-permuted."""
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    arch = str(reader.get_field("general.architecture").contents())
    config = model.config.to_dict()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    # The GGUF's architecture names the tensors (Mistral and Mixtral are `llama` GGUFs).
    mapping = get_gguf_hf_weights_map(model, processor, model_type=arch)
    state: dict[str, Any] = {}
    experts: dict[tuple[int, str], Any] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name in _COMPUTED:
            continue
        if "_exps." in t.name:  # Mixtral: per-expert stacks, regrouped below
            layer, kind = t.name.split(".")[1], t.name.split(".")[2]
            experts[(int(layer), kind)] = data
            continue
        result = processor.process(
            weights=data, name=t.name, tensor_key_mapping=mapping, parsed_parameters={}
        )
        if result.name not in mapping:
            raise InvalidArgument(f"GGUF tensor {t.name!r} has no place in a {type(model).__name__}")
        # A copy: F32 tensors would otherwise be read-only views of the memory-mapped file.
        state[mapping[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float32, order="C"))
    for (layer, kind), data in experts.items():
        prefix = f"model.layers.{layer}.mlp.experts"
        if kind == "ffn_gate_exps":
            up = experts[(layer, "ffn_up_exps")]
            state[f"{prefix}.gate_up_proj"] = torch.from_numpy(np.concatenate([data, up], axis=1))
        elif kind == "ffn_down_exps":
            state[f"{prefix}.down_proj"] = torch.from_numpy(np.ascontiguousarray(data))
    return state


def load_gguf_model(path: Path, config_dir: Path | None = None) -> Any:
    """A float32 causal LM on CPU (eval mode) holding the GGUF's weights, dequantized; its architecture and
    hyperparameters are those of config.json in `config_dir` (default: the GGUF's folder)."""
    import gguf
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config_dir = Path(config_dir or path.parent)
    if not (config_dir / "config.json").is_file():
        raise InvalidArgument(f"{path.name} has no config.json beside it: a gguf folder carries its source's")
    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    reader = gguf.GGUFReader(str(path))
    # Weights on the meta device (the GGUF's replace them), computed buffers (RoPE's inverse frequencies,
    # Gemma's embedding scale) built for real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dequantized_state_dict(reader, model)
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    # assign=True adopts the dequantized tensors instead of copying into unallocated meta ones.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if "lm_head.weight" in missing and "model.embed_tokens.weight" in state:
        # llama.cpp stores no output matrix when it equals the embedding (the converter drops duplicates).
        model.lm_head.weight = torch.nn.Parameter(state["model.embed_tokens.weight"].clone())
        missing.remove("lm_head.weight")
    if missing or unexpected:
        raise InvalidArgument(f"{path.name}: GGUF lacks {missing[:3]} / has unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    return model.eval()
