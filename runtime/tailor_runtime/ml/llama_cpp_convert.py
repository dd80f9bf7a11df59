"""A Hugging Face model folder -> GGUF, written by llama.cpp's own converter (convert_hf_to_gguf.py).

The converter knows every family llama.cpp runs (tensor names, Q/K layouts, metadata keys), so Tailor
does not keep a writer of its own. It comes from the llama-cpp-python sdist pinned in
requirements-llamacpp.txt (`make converter` extracts it, with the gguf-py it was written with, into
.tools/llama.cpp; TAILOR_LLAMA_CPP_CONVERTER points elsewhere), so the files are the ones the llama.cpp
that loads them expects. It runs as a subprocess of this venv's python (`python -m
tailor_runtime.ml.llama_cpp_convert`, which runs the script under `runpy`), on a staging folder beside the
output: the weights linked, not copied, and the small files adjusted for what the converter reads
differently from transformers:

* vocabulary: a SentencePiece-style tokenizer.json without tokenizer.model gets one written from it
  (`tailor_runtime.ml.gguf_vocab`: real merge scores, so llama.cpp tokenizes as the source does). Where a
  family's converter would read a byte-level BPE vocabulary (GPT-2 always does) it reads that
  SentencePiece model instead, and the GGUF's add_space_prefix is what tokenizer.json does (Gemma's
  converter writes False unconditionally).
* config.json: GPT-2's `n_ctx`, which the converter reads and transformers 5 no longer writes
  (`n_positions` is the same number).

The converter writes F32, F16, BF16 and Q8_0 itself; other types are made from its F32 file by llama.cpp's
quantizer (tailor_runtime.ml.gguf_io).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tailor_runtime.errors import FailedPrecondition, InvalidArgument

CONVERTER_ENV = "TAILOR_LLAMA_CPP_CONVERTER"
DEFAULT_CONVERTER = Path(__file__).resolve().parents[3] / ".tools" / "llama.cpp"
SCRIPT = "convert_hf_to_gguf.py"
# Tailor's type name -> the converter's --outtype.
CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
# The small files the converter reads; weights are linked into the staging folder instead.
_SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")


def converter_dir() -> Path:
    return Path(os.environ.get(CONVERTER_ENV) or DEFAULT_CONVERTER)


def converter_availability() -> tuple[bool, str]:
    """Whether llama.cpp's converter is where Tailor looks for it."""
    if (converter_dir() / SCRIPT).is_file():
        return True, ""
    return False, (
        f"llama.cpp's converter ({SCRIPT}) is not installed; run `make converter` (it extracts it from the "
        f"llama-cpp-python sdist) or set {CONVERTER_ENV} to a llama.cpp checkout"
    )


def require_converter() -> Path:
    ok, why = converter_availability()
    if not ok:
        raise FailedPrecondition(f"writing GGUF needs llama.cpp's converter: {why}")
    return converter_dir()


def convert(model_dir: Path, out_path: Path, gguf_type: str, name: str | None = None) -> None:
    """Write `model_dir` (hf-safetensors) to `out_path` as GGUF `gguf_type` (a CONVERTER_TYPES key)."""
    if gguf_type not in CONVERTER_TYPES:
        raise InvalidArgument(f"llama.cpp's converter does not write {gguf_type!r}", choices=CONVERTER_TYPES)
    converter = require_converter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    name = name or model_dir.name
    with tempfile.TemporaryDirectory(prefix=".gguf-convert-", dir=out_path.parent) as tmp:
        staging = Path(tmp) / "model"
        vocab = stage(model_dir, staging)
        name = gguf_name(name, staging)
        command = [
            sys.executable, "-m", __name__, str(converter), json.dumps(vocab),
            str(staging), "--outfile", str(out_path), "--outtype", CONVERTER_TYPES[gguf_type],
            "--model-name", name, "--use-temp-file",
        ]  # fmt: skip
        # cwd: the staging folder, so that nothing of the caller's directory shadows a package.
        run = subprocess.run(command, cwd=tmp, capture_output=True, text=True, env=_environment())
    if run.returncode != 0 or not out_path.is_file():
        out_path.unlink(missing_ok=True)
        raise FailedPrecondition(
            f"llama.cpp's converter could not convert {name} to GGUF {gguf_type}: {_last_error(run.stderr, tmp)}"
        )


def stage(model_dir: Path, staging: Path) -> dict[str, Any]:
    """Fill `staging` with what the converter reads of `model_dir`; returns the vocabulary options."""
    from tailor_runtime.ml.gguf_vocab import adds_space_prefix, extra_stop_id, read_json, sentencepiece_model

    staging.mkdir(parents=True)
    weights = [p for pattern in _WEIGHTS for p in sorted(model_dir.glob(pattern))]
    if not any(p.suffix == ".safetensors" for p in weights):
        raise InvalidArgument(f"{model_dir.name} has no *.safetensors weights to convert to GGUF")
    for path in weights:
        (staging / path.name).symlink_to(path.resolve())
    for file_name in _SMALL_FILES:
        if (model_dir / file_name).is_file():
            (staging / file_name).write_bytes((model_dir / file_name).read_bytes())

    config = read_json(staging / "config.json")
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config.get("n_positions", 1024)
        (staging / "config.json").write_text(json.dumps(config, indent=2))

    tokenizer = read_json(staging / "tokenizer.json")
    vocab: dict[str, Any] = {"sentencepiece": False}
    from tailor_runtime.ml.gguf_vocab import is_sentencepiece_style

    if not (staging / "tokenizer.model").is_file() and is_sentencepiece_style(tokenizer):
        (staging / "tokenizer.model").write_bytes(sentencepiece_model(tokenizer, _vocab_size(config)))
        vocab = {
            "sentencepiece": True,
            "add_space_prefix": adds_space_prefix(tokenizer),
            "eot": extra_stop_id(model_dir),
        }
    return vocab


def gguf_name(name: str, staging: Path) -> str:
    """`general.name` for the file. llama.cpp 0.3.36 sets Phi-3's special-token attributes by model name
    and fails to load ("unordered_map::at") a model named phi3/phi-3 whose vocabulary has no
    <|endoftext|>: such a name is written with a space ("phi 3"), which leaves the tokens alone."""
    from tailor_runtime.ml.gguf_vocab import read_json

    lowered = name.lower()
    if "phi3" not in lowered and "phi-3" not in lowered:
        return name
    tokenizer = read_json(staging / "tokenizer.json")
    pieces = set((tokenizer.get("model") or {}).get("vocab") or {})
    pieces |= {t.get("content") for t in tokenizer.get("added_tokens", [])}
    if "<|endoftext|>" in pieces:
        return name
    return re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:3] + " 3", name)


def _vocab_size(config: dict[str, Any]) -> int:
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(size, int):
        raise InvalidArgument("config.json has no vocab_size; GGUF needs the tokenizer's size")
    return size


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it ships with
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _last_error(stderr: str, staging_root: str) -> str:
    """The converter's own last error line, without Tailor's staging paths."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("ERROR")]
    text = (errors or lines or ["no output"])[-1].strip()
    return text.replace(staging_root + os.sep, "").replace(staging_root, "")


# --- the subprocess ------------------------------------------------------------------------------------


def _run_converter(converter: str, vocab_json: str, args: list[str]) -> None:
    """Run convert_hf_to_gguf.py with `args`, its model classes adjusted to `vocab` (see the module doc)."""
    sys.path[:0] = [converter, str(Path(converter) / "gguf-py")]  # before anything imports gguf
    import conversion
    from conversion.base import TextModel

    vocab = json.loads(vocab_json)
    if vocab["sentencepiece"]:
        find = conversion.get_model_class

        def get_model_class(name: str, mmproj: bool = False) -> Any:
            cls = find(name, mmproj=mmproj)
            if mmproj or getattr(cls, "_tailor_vocab", False):
                return cls
            own = cls.set_vocab

            def set_vocab(self: Any) -> None:
                if own is TextModel.set_vocab:
                    self._set_vocab_sentencepiece()  # the default reads a byte-level BPE
                else:
                    own(self)
                self.gguf_writer.add_add_space_prefix(vocab["add_space_prefix"])
                if vocab.get("eot") is not None:
                    self.gguf_writer.add_eot_token_id(vocab["eot"])

            # This process converts one model: the class is patched in place (a subclass would fail the
            # converter's registration checks).
            cls.set_vocab, cls._tailor_vocab = set_vocab, True
            return cls

        conversion.get_model_class = get_model_class
    script = str(Path(converter) / SCRIPT)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _run_converter(sys.argv[1], sys.argv[2], sys.argv[3:])
