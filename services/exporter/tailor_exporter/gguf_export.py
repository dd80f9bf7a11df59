"""Export a Hugging Face folder to GGUF for llama.cpp and Ollama, verify it against PyTorch, then publish it.

The folder gets `model.gguf` (written by llama.cpp's own converter through `tailor_runtime.ml.gguf_io`:
F16 and Q8_0 by the converter, Q4_0 and Q4_K_M by llama.cpp's quantizer from its F32 file), an Ollama
`Modelfile`, the source's tokenizer and config files (so Tailor can load the folder, format `gguf`),
verification.json and tailor_format.json. Every family llama.cpp's converter knows and the architecture
registry does not refuse for `export/gguf` is taken (tailor_runtime.ml.architectures).

Verification, before anything is published (see gguf_verify): the GGUF dequantized into PyTorch against
the source, always; and, where llama-cpp-python is installed, the file run by llama.cpp against the source
(logits, tokenizer, greedy tokens). Both are enforced with the type's tolerance; over it,
VerificationFailed carries the numbers and `out_dir` is never created. Without llama-cpp-python the
metrics say so ("llama_cpp": "not installed: ...") instead of claiming a llama.cpp check.

Sources: hf-safetensors folders, written in the requested type; and gguf folders from the quantizer
(gguf_q8_0, gguf_q4_k_m), published byte for byte in their own type and checked against their own
dequantized weights (their float parent is not at hand; its distance is the quantizer's measurement).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailor_exporter.registry import (
    ExportFormat,
    ExportJob,
    Tolerance,
    check_destination,
    move_into_place,
    register,
    staged,
)
from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.progress import ProgressFn
from tailor_runtime.stage import library_versions

MODELFILE = "Modelfile"
SOURCE_FORMATS = ("hf-safetensors", "gguf")
_CARRIED_FILES = ("LICENSE*", "README*", "NOTICE*")
VERSIONED = ("gguf", "numpy", "torch", "transformers", "llama-cpp-python")
NOT_INSTALLED = "not installed: verified by dequantization only"

# Per type, against the float32 source: max |logit difference| and min top-1 agreement of the dequantized
# file ("atol", "top1") and of llama.cpp running it ("llama_atol", "llama_top1"), and the min share of greedy
# tokens llama.cpp generates like the source ("greedy"). Measured on stories260K with Tailor's earlier
# writer (logits up to ~22; its 64-wide rows give each block scale little to average over, larger models
# lose less), then widened; llama.cpp's converter writes the same blocks (test_family_gguf.py measures it):
#          dequantized      llama.cpp        greedy
#   F16    0.016 / 100%     0.038 / 100%     100%
#   Q8_0   0.40  / 99.1%    0.59  / 99.3%    100%
#   Q4_0   6.84  / 82.0%    6.99  / 84.1%    51%
#   Q4_K_M 2.63  / 94.9%    2.61  / 94.5%    70%   (no K-quants fit 64-wide rows: Q5_0/Q8_0, see gguf_io)
# A broken file (wrong tensor layout, wrong tokenizer) agrees at about 1/vocab and fails all of them.
TOLERANCES: dict[str, dict[str, float]] = {
    "F16": {"atol": 0.05, "top1": 0.99, "llama_atol": 0.1, "llama_top1": 0.99, "greedy": 0.9},
    "Q8_0": {"atol": 0.75, "top1": 0.97, "llama_atol": 1.0, "llama_top1": 0.97, "greedy": 0.6},
    "Q4_0": {"atol": 10.0, "top1": 0.75, "llama_atol": 10.0, "llama_top1": 0.75, "greedy": 0.25},
    "Q4_K_M": {"atol": 5.0, "top1": 0.85, "llama_atol": 5.0, "llama_top1": 0.85, "greedy": 0.3},
}


class GgufExportConfig(BaseModel):
    """Options of a GGUF export (the `config` Struct of an ExportRequest)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: Literal["F16", "Q8_0", "Q4_0", "Q4_K_M"] = Field(
        "Q8_0",
        description="GGUF tensor type: F16; Q8_0 (blocks of 32, written by llama.cpp's converter); Q4_0 and "
        "Q4_K_M (llama.cpp's quantizer, needs llama-cpp-python).",
    )
    model_name: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,127}$",
        description="The name the Modelfile gives the model (`ollama create NAME`); default: the "
        "pipeline's name in a pipeline, else the source model's.",
    )
    verify_batches: int = Field(3, ge=2, description="Sample batches of real text for the dequantized check.")
    greedy_tokens: int = Field(
        24, ge=1, le=256, description="Tokens generated greedily per prompt to compare with the source."
    )
    atol: float | None = Field(
        None,
        ge=0,
        description="Max |logit difference| allowed (dequantized and llama.cpp); default: the type's.",
    )
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="Min top-1 agreement with the source; default: the type's."
    )
    min_greedy_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Min share of llama.cpp's greedy tokens equal to the source's; default: the type's.",
    )

    def tolerance(self) -> dict[str, float]:
        """The type's tolerances with this request's overrides."""
        tol = dict(TOLERANCES[self.type])
        if self.atol is not None:
            tol["atol"] = tol["llama_atol"] = self.atol
        if self.min_top1_agreement is not None:
            tol["top1"] = tol["llama_top1"] = self.min_top1_agreement
        if self.min_greedy_agreement is not None:
            tol["greedy"] = self.min_greedy_agreement
        return tol

    @field_validator("verify_batches", "greedy_tokens", mode="before")
    @classmethod
    def _whole_floats_are_ints(cls, value: Any) -> Any:
        # A protobuf Struct carries every number as a double: accept 3.0 for 3, still refuse 3.5 and "3".
        return int(value) if isinstance(value, float) and value.is_integer() else value


def export_gguf(
    model_dir: Path, out_dir: Path, cfg: GgufExportConfig, progress: ProgressFn
) -> dict[str, Any]:
    """Export `model_dir` to `out_dir` (which must not exist yet, or be empty) as a verified gguf folder."""
    from tailor_exporter.gguf_verify import compare_dequantized, compare_llama_cpp
    from tailor_exporter.onnx_verify import sample_batches
    from tailor_runtime.ml import architectures
    from tailor_runtime.ml.formats.gguf import copy_gguf_folder, save_gguf_folder
    from tailor_runtime.ml.gguf_io import GGUF_FILE, LLAMA_CPP_TYPES, llama_cpp_availability, load_gguf_model
    from tailor_runtime.ml.llama_cpp_convert import require_converter
    from tailor_runtime.ml.model_io import folder_size_bytes, load_causal_lm, read_format

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    source = read_format(model_dir)
    if source["format"] not in SOURCE_FORMATS:
        raise InvalidArgument(
            f"cannot export a model in format {source['format']!r} to GGUF", choices=SOURCE_FORMATS
        )
    has_llama_cpp, why_not = llama_cpp_availability()
    if source["format"] == "gguf":
        # A quantizer's GGUF (gguf_q8_0, gguf_q4_k_m) is published as it is: quantizing twice loses quality.
        if source.get("gguf_type") != cfg.type:
            raise InvalidArgument(
                f"{model_dir.name} is already GGUF {source.get('gguf_type')}; it can only be exported as that "
                f"type (requested {cfg.type}); export its hf-safetensors parent for another type"
            )
    else:
        # Families llama.cpp cannot take fail here, before anything is loaded.
        architectures.require(architectures.for_folder(model_dir), "export/gguf")
        require_converter()
        if cfg.type in LLAMA_CPP_TYPES and not has_llama_cpp:
            raise FailedPrecondition(f"GGUF {cfg.type} is made by llama.cpp's quantizer: {why_not}")
    check_destination(out_dir)

    started = time.monotonic()
    progress(2.0, "loading", f"loading {model_dir.name}")
    reference, tokenizer = load_causal_lm(model_dir)  # a gguf source: its own dequantized weights
    reference = reference.float()
    tol = cfg.tolerance()
    with staged(out_dir) as work:
        progress(10.0, "exporting", f"writing GGUF {cfg.type}")
        if source["format"] == "gguf":
            info = copy_gguf_folder(model_dir, work, extra_files=_CARRIED_FILES)
        else:
            info = save_gguf_folder(
                model_dir, work, cfg.type, name=model_dir.name, extra_files=_CARRIED_FILES
            )
        progress(40.0, "verifying", "dequantized GGUF against PyTorch")
        batches = sample_batches(tokenizer, cfg.verify_batches)
        checks = {"dequantized": compare_dequantized(load_gguf_model(work / GGUF_FILE), reference, batches)}
        _enforce("dequantized", checks["dequantized"], tol["atol"], tol["top1"], cfg.type)
        if has_llama_cpp:
            progress(60.0, "verifying", "llama.cpp against PyTorch")
            check = compare_llama_cpp(work / GGUF_FILE, reference, tokenizer, cfg.greedy_tokens)
            checks["llama_cpp"] = check
            _enforce("llama_cpp", check, tol["llama_atol"], tol["llama_top1"], cfg.type, tol["greedy"])
        progress(90.0, "writing", "Modelfile, verification")
        (work / MODELFILE).write_text(
            modelfile(model_dir, cfg.type, cfg.model_name or model_dir.name.lower())
        )
        versions = library_versions(*VERSIONED)
        _write_json(
            work / "verification.json",
            {"checks": checks, "reference": source["format"], "tolerances": tol, "versions": versions},
        )
        files = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
        move_into_place(work, out_dir)

    progress(100.0, "done", f"exported {out_dir.name}")
    return {
        "out_dir": str(out_dir),
        "format": read_format(out_dir),
        "files": files,
        "size_on_disk_mb": folder_size_bytes(out_dir) / 2**20,
        "gguf_bytes": info["bytes"],
        "tensor_types": info["tensor_types"],
        "fallback_tensors": info["fallback_tensors"],
        "verification": {**_headline(checks), "checks": checks},
        "versions": versions,
        "export_s": time.monotonic() - started,
    }


def _headline(checks: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers for the pipeline summary: the dequantized check, then llama.cpp's or why it is absent."""
    # Each agreement beside the floor it was enforced against (set by _enforce), for the summary.
    keys = ("max_abs_diff", "top1_agreement", "positions", "atol", "min_top1_agreement")
    flat = {k: checks["dequantized"][k] for k in keys if k in checks["dequantized"]}
    flat["passed"] = all(c["passed"] for c in checks.values())
    run = checks.get("llama_cpp")
    if run is None:
        flat["llama_cpp"] = NOT_INSTALLED
        return flat
    flat["llama_cpp"] = (
        f"verified with llama-cpp-python {library_versions('llama-cpp-python')['llama-cpp-python']}"
    )
    for key in ("max_abs_diff", "top1_agreement", "tokenizer_agreement", "greedy_agreement"):
        flat[f"llama_cpp_{key}"] = run[key]
    for key in ("min_top1_agreement", "min_greedy_agreement"):
        if key in run:
            flat[f"llama_cpp_{key}"] = run[key]
    return flat


def _enforce(
    name: str, check: dict, atol: float, min_top1: float, gguf_type: str, min_greedy: float = 0
) -> None:
    from tailor_runtime.ml.onnx.verify import enforce

    more = []
    if "greedy_agreement" in check:
        if not check["greedy_agreement"] >= min_greedy:
            more.append(f"greedy token agreement {check['greedy_agreement']:.3f} < {min_greedy:g}")
        if check["tokenizer_agreement"] != 1.0:  # llama.cpp / Ollama would see other tokens than training did
            more.append(
                f"llama.cpp tokenizes {1 - check['tokenizer_agreement']:.0%} of the samples differently"
            )
        check["min_greedy_agreement"] = min_greedy
    enforce(name, check, atol, min_top1, what=f"GGUF {gguf_type} export", scope="", more_failures=tuple(more))


def modelfile(model_dir: Path, gguf_type: str, name: str) -> str:
    """An Ollama Modelfile: a chat model's TEMPLATE from its own chat_template (ollama_template), a
    plain-text (completion) model such as a story model passes the prompt through."""
    from tailor_exporter.ollama_template import ollama_template

    config = json.loads((model_dir / "config.json").read_text())
    generation = _read_json(model_dir / "generation_config.json")
    vocab = json.loads((model_dir / "tokenizer.json").read_text())
    pieces = {i: p for p, i in vocab["model"]["vocab"].items()} | {
        t["id"]: t["content"] for t in vocab["added_tokens"]
    }
    stops = generation.get("eos_token_id", config.get("eos_token_id"))
    stops = [s for s in (stops if isinstance(stops, list) else [stops]) if s is not None]
    lines = [
        f"# Ollama Modelfile for {name} (GGUF {gguf_type}), written by Tailor.",
        f"#   ollama create {name} -f Modelfile && ollama run {name} 'Once upon a time'",
        "FROM ./model.gguf",
        *_template_lines(ollama_template(model_dir)),
        "# Stop where transformers' generate stops (generation_config eos ids; a llama2.c story model ends a",
        "# story with <s>). The GGUF marks the same ids as end-of-generation tokens for llama.cpp itself.",
        *[f'PARAMETER stop "{pieces[s]}"' for s in stops if s in pieces],
        "# The context the model was trained with: beyond it the model was never trained to predict.",
        f"PARAMETER num_ctx {config.get('max_position_embeddings') or config.get('n_positions') or 2048}",
    ]
    return "\n".join(lines) + "\n"


def _template_lines(chat: str | None) -> list[str]:
    if chat is not None and '"""' in chat:  # a Modelfile string cannot hold its own delimiter
        return [
            '# The chat template contains """, which a Modelfile TEMPLATE cannot hold: set TEMPLATE by hand.'
        ]
    if chat is None:
        return [
            "# No chat format: the model continues plain text, so the prompt is passed through unchanged.",
            'TEMPLATE """{{ .Prompt }}"""',
        ]
    return [
        "# One turn of the tokenizer's own chat_template, rendered by transformers (earlier turns: Ollama",
        "# repeats this per turn).",
        f'TEMPLATE """{chat}"""',
    ]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _run(model_dir: Path, out_dir: Path, cfg: GgufExportConfig, job: ExportJob) -> dict[str, Any]:
    return export_gguf(model_dir, out_dir, cfg, job.progress)


register(
    ExportFormat(
        name="gguf",
        Config=GgufExportConfig,
        run=_run,
        tolerance=Tolerance(atol=TOLERANCES["Q8_0"]["atol"], min_top1_agreement=TOLERANCES["Q8_0"]["top1"]),
        description="GGUF (F16, Q8_0, Q4_0, Q4_K_M) for llama.cpp and Ollama with a Modelfile, run in llama.cpp "
        "when installed (tolerance shown: Q8_0's; each type has its own)",
        output_format="gguf",
        libraries=("gguf", "numpy", "torch", "transformers", "llama-cpp-python"),
    )
)
