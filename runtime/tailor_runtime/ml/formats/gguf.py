"""The `gguf` folder format: a llama.cpp GGUF file plus the Hugging Face files Tailor needs beside it.

On disk:
  * `model.gguf`: weights, hyperparameters and tokenizer, readable by llama.cpp / Ollama on its own
    (written by `tailor_runtime.ml.gguf_io`).
  * config.json, generation_config.json and the tokenizer files, copied byte for byte from the source, so
    `load_tokenizer(folder)` works and the folder is measured with the source's exact tokenizer.
  * tailor_format.json: {"format": "gguf", "gguf_type": "Q8_0", "file": "model.gguf",
    "tensor_types": {"Q8_0": 31, ...}, "fallback_tensors": N, "quantized_layers": N, "dtype": "float32"}.

Loading dequantizes every tensor into a float32 LlamaForCausalLM: the numbers are the GGUF's (quantization
error included), the compute is PyTorch's, which is what quality measurements need. Fast GGUF inference is
llama.cpp's job.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# Copied from the source folder: what AutoTokenizer and generation need, nothing with weights.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


def save_gguf_folder(
    model_dir: Path, out_dir: Path, gguf_type: str, name: str | None = None, extra_files: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Write `model_dir` (hf-safetensors Llama) as a gguf folder in `out_dir`; returns the writer's summary
    plus `quantized_layers` (Linear weights stored in less than float32, as the other formats count them)."""
    from tailor_runtime.ml.formats import GGUF
    from tailor_runtime.ml.gguf_io import GGUF_FILE, tensor_types, write_gguf
    from tailor_runtime.ml.model_io import write_format

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = write_gguf(model_dir, out_dir / GGUF_FILE, gguf_type, name)
    for pattern in COMPANION_FILES + extra_files:
        for path in sorted(model_dir.glob(pattern)):
            if path.is_file():
                shutil.copyfile(path, out_dir / path.name)
    # Linear weights: every 2-D tensor of the blocks, plus an untied output matrix (the embedding is not one).
    linears = {
        n: t
        for n, t in tensor_types(out_dir / GGUF_FILE).items()
        if n.startswith("blk.") or n == "output.weight"
    }
    info["quantized_layers"] = sum(t != "F32" for n, t in linears.items() if not n.endswith("_norm.weight"))
    info["fallback_tensors"] = len(info["fallbacks"])
    write_format(
        out_dir,
        GGUF,
        gguf_type=gguf_type,
        file=GGUF_FILE,
        dtype="float32",  # what the loader dequantizes to
        **{k: info[k] for k in ("tensor_types", "fallback_tensors", "quantized_layers")},
    )
    return info


def copy_gguf_folder(model_dir: Path, out_dir: Path, extra_files: tuple[str, ...] = ()) -> dict[str, Any]:
    """Copy a gguf folder as it is (its GGUF byte for byte); returns the summary `save_gguf_folder` gives."""
    from tailor_runtime.ml.model_io import FORMAT_FILE, read_format

    fmt = read_format(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in (fmt.get("file", "model.gguf"), FORMAT_FILE) + COMPANION_FILES + extra_files:
        for path in sorted(Path(model_dir).glob(pattern)):
            if path.is_file():
                shutil.copyfile(path, out_dir / path.name)
    keys = ("gguf_type", "tensor_types", "fallback_tensors", "quantized_layers")
    return {k: fmt.get(k) for k in keys} | {"bytes": (out_dir / fmt.get("file", "model.gguf")).stat().st_size}


def load(folder: Path, fmt: dict[str, Any]) -> Any:
    from tailor_runtime.errors import FailedPrecondition
    from tailor_runtime.ml.gguf_io import GGUF_FILE, load_gguf_model

    path = Path(folder) / fmt.get("file", GGUF_FILE)
    if not path.is_file():
        raise FailedPrecondition(f"{folder} declares format 'gguf' but has no {path.name}")
    return load_gguf_model(path)
