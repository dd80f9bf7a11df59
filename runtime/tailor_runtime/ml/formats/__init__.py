"""Registry of model folder formats: the name stored in `tailor_format.json` -> the module that loads it.

Each loader module exposes `load(folder: Path, fmt: dict) -> torch.nn.Module` returning a CPU model in
eval mode; the loaders of GPU_FORMATS also take `device=` ("cuda", "cuda:1") and return the model there.
Modules are imported only when a folder of that format is loaded, so importing this package never pulls
torch or bitsandbytes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument

HF_SAFETENSORS = "hf-safetensors"
INT8_DYNAMIC = "int8-dynamic"
BNB_NF4 = "bnb-nf4"
BNB_FP4 = "bnb-fp4"
BNB_INT8 = "bnb-int8"
COMPRESSED_TENSORS = "compressed-tensors"
PEFT_LORA = "peft-lora"
GGUF = "gguf"
ONNX = "onnx"  # ONNX Runtime decoder graph with a KV cache (tailor_runtime.ml.onnx)
ORT = "ort"  # the same in ONNX Runtime Mobile's ORT format
# A Triton model repository (<name>/config.pbtxt, <name>/<version>/model.onnx) whose tailor_format.json
# names the graph: Tailor runs it as an `onnx` folder.
TRITON_REPOSITORY = "triton-repository"

# Full models that `load_causal_lm` can load.
_LOADERS: dict[str, str] = {
    HF_SAFETENSORS: "tailor_runtime.ml.formats.hf_safetensors",
    INT8_DYNAMIC: "tailor_runtime.ml.formats.int8_dynamic",
    BNB_NF4: "tailor_runtime.ml.formats.bnb",
    BNB_FP4: "tailor_runtime.ml.formats.bnb",
    BNB_INT8: "tailor_runtime.ml.formats.bnb",
    COMPRESSED_TENSORS: "tailor_runtime.ml.formats.compressed_tensors",
    GGUF: "tailor_runtime.ml.formats.gguf",
    ONNX: "tailor_runtime.ml.formats.onnx",
    ORT: "tailor_runtime.ml.formats.onnx",
    TRITON_REPOSITORY: "tailor_runtime.ml.formats.onnx",
}

# Formats PyTorch runs on a CUDA GPU here. The others run on CPU only: int8-dynamic's torch.ao kernels
# are CPU kernels, and the ONNX Runtime and llama.cpp builds Tailor installs are their CPU builds.
GPU_FORMATS: frozenset[str] = frozenset({HF_SAFETENSORS, COMPRESSED_TENSORS, BNB_NF4, BNB_FP4, BNB_INT8})

# On-device programs (tailor_exporter.mobile_export): published and verified, but run by their own
# runtimes on phones, not loaded back into Tailor.
EXECUTORCH = "executorch"  # an ExecuTorch .pte (XNNPACK) with a static KV cache
COREML = "coreml"  # a Core ML .mlpackage ML program with its KV cache as model states

# Formats a folder may declare. A LoRA adapter is a valid artifact but not a model on its own.
KNOWN_FORMATS: frozenset[str] = frozenset({*_LOADERS, PEFT_LORA, EXECUTORCH, COREML})

LoaderFn = Callable[[Path, dict[str, Any]], Any]


def loadable_formats() -> list[str]:
    return sorted(_LOADERS)


def get_loader(name: str) -> LoaderFn:
    if name == PEFT_LORA:
        raise InvalidArgument(
            "this folder is a LoRA adapter (format 'peft-lora'), not a complete model; "
            "load the merged model folder instead, or apply the adapter to its base model"
        )
    if name in (EXECUTORCH, COREML):
        raise InvalidArgument(
            f"a {name!r} folder is a program for its on-device runtime (see docs/export-mobile.md), which "
            "Tailor does not load back; load the model it was exported from instead"
        )
    if name not in _LOADERS:
        raise InvalidArgument(f"unknown model format {name!r}", choices=loadable_formats())
    return importlib.import_module(_LOADERS[name]).load
