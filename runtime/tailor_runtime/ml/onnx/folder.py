"""The ONNX model folder: the graph, plus what a consumer needs beside it, written reproducibly.

    model.onnx (or model.ort)   the decoder graph (past key/values in and out; see __init__)
    config.json, tokenizer      from the source folder (config without its quantization_config: the
                                graph carries its own ONNX Runtime quantization)
    tailor_format.json          {"format": "onnx" | "ort", "model_file", "weights", "kv_cache", ...}
    verification.json           the checks against the source and the tool versions that made the file

No timings or paths are written: the folder's bytes depend only on the source, the options and the
versions, so the same input gives the same bytes.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from tailor_runtime.ml.onnx import INPUTS

# Copied from the source folder so an export keeps its model's licence and notes.
CARRIED_FILES = ("LICENSE*", "README*", "NOTICE*", "generation_config.json")
TOOLS = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")


def tool_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in TOOLS}


def write_config(work: Path, source_dir: Path, tokenizer: Any) -> None:
    """config.json (float32, no quantization_config), tokenizer files and the carried files."""
    tokenizer.save_pretrained(work)
    config = json.loads((Path(source_dir) / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    _write_json(work / "config.json", config)
    for pattern in CARRIED_FILES:
        for path in Path(source_dir).glob(pattern):
            if path.is_file():
                shutil.copyfile(path, work / path.name)


def write_format(work: Path, name: str, model_file: str, weights: str, **fields: Any) -> dict[str, Any]:
    """tailor_format.json of an ONNX model folder (`name`: "onnx" or "ort"); returns its content."""
    from tailor_runtime.ml.model_io import write_format as write

    return write(
        work,
        name,
        model_file=model_file,
        weights=weights,
        kv_cache=True,
        inputs=[*INPUTS, "past_key_values.{i}.key", "past_key_values.{i}.value"],
        outputs=["logits", "present.{i}.key", "present.{i}.value"],
        **fields,
    )


def write_verification(work: Path, checks: dict[str, Any], batches: list[Any]) -> None:
    _write_json(
        work / "verification.json",
        {"checks": checks, "batches": [list(ids.shape) for ids, _ in batches], "versions": tool_versions()},
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
