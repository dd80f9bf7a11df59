"""Reading and writing Tailor model folders.

A model folder is a Hugging Face folder (config.json, tokenizer files, safetensors weights). Tailor's
own outputs add `tailor_format.json`, which says how the weights are stored:

    {"format": "hf-safetensors" | "int8-dynamic" | "bnb-nf4", "dtype": "float32", ...}

A folder without it, exactly as `save_pretrained` writes it (one safetensors file or shards with
`model.safetensors.index.json`), is read from its config.json (`infer_format`): plain weights in their
saved dtype, or the compressed-tensors or bitsandbytes checkpoint its `quantization_config` names.

This module only reads that marker and dispatches; everything specific to a format lives in
`tailor_runtime.ml.formats.<format>`. Weights are only ever read from safetensors: nothing here unpickles.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tailor_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tailor_runtime.ml import formats

FORMAT_FILE = "tailor_format.json"


def read_format(folder: Path) -> dict[str, Any]:
    """The parsed `tailor_format.json` of `folder`; InvalidArgument if it is missing, unreadable or unknown."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound(f"model folder {folder} does not exist")
    path = folder / FORMAT_FILE
    valid = sorted(formats.KNOWN_FORMATS)
    if not path.is_file():
        return infer_format(folder)
    try:
        fmt = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(fmt, dict) or fmt.get("format") not in formats.KNOWN_FORMATS:
        got = fmt.get("format") if isinstance(fmt, dict) else fmt
        raise InvalidArgument(f"{path} declares format {got!r}", choices=valid)
    return fmt


# config.json `dtype` (transformers 5) or `torch_dtype` (4.x) -> the dtype name hf-safetensors loads in.
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CONVERT_HINT = (
    "tailor models import FOLDER converts pytorch_model.bin to safetensors (torch.load weights_only)"
)


def infer_format(folder: Path) -> dict[str, Any]:
    """The format of a plain Hugging Face folder (no tailor_format.json), from its config.json and files.

    InvalidArgument says what is missing: config.json, safetensors weights (a pickled pytorch_model.bin is
    named with the command that converts it), or a quantization_config Tailor cannot load.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidArgument(
            f"{folder.name} is not a model folder: it has neither {FORMAT_FILE} nor config.json "
            "(a Hugging Face folder as save_pretrained writes it)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{folder.name}/config.json is not valid JSON ({exc})") from None
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        if any((folder / name).is_file() for name in PICKLED_WEIGHTS):
            raise InvalidArgument(
                f"{folder.name} holds pickled weights (pytorch_model.bin), which Tailor never unpickles; "
                f"convert them first: {CONVERT_HINT}"
            )
        raise InvalidArgument(
            f"{folder.name} has config.json but no weights: expected {' or '.join(WEIGHT_FILES)}"
        )
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        return _quantized_format(folder, quant)
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype not in _HF_DTYPES:
        raise InvalidArgument(
            f"{folder.name}/config.json: dtype {dtype!r} is not one Tailor loads", choices=_HF_DTYPES
        )
    return {"format": formats.HF_SAFETENSORS, "dtype": _HF_DTYPES[dtype], "inferred": True}


def _quantized_format(folder: Path, quant: dict[str, Any]) -> dict[str, Any]:
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        return {"format": formats.COMPRESSED_TENSORS, "inferred": True}
    if method == "bitsandbytes":
        if quant.get("load_in_8bit"):
            return {"format": formats.BNB_INT8, "inferred": True}
        kind = quant.get("bnb_4bit_quant_type", "fp4")
        return {"format": formats.BNB_NF4 if kind == "nf4" else formats.BNB_FP4, "inferred": True}
    raise InvalidArgument(
        f"{folder.name}/config.json names quantization method {method!r}, which Tailor does not load; "
        "bring the unquantized model (Tailor quantizes it), or a compressed-tensors or bitsandbytes checkpoint",
    )


def write_format(folder: Path, fmt: str, **fields: Any) -> dict[str, Any]:
    """Write `tailor_format.json` (sorted keys, so identical inputs give identical bytes)."""
    if fmt not in formats.KNOWN_FORMATS:
        raise InvalidArgument(f"cannot write unknown format {fmt!r}", choices=formats.KNOWN_FORMATS)
    data = {"format": fmt, **fields}
    (Path(folder) / FORMAT_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


# tokenizer_config.json classes that mean "exactly what tokenizer.json says".
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: Path):
    """The folder's tokenizer. A folder that declares the generic class gets its tokenizer.json exactly:
    transformers 5's AutoTokenizer would otherwise rebuild some families' own tokenizer class around its
    vocabulary (a Qwen2 folder gets Qwen2Tokenizer's pre-tokenizer), which splits text differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    try:
        declared = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        declared = None
    if declared in _GENERIC_TOKENIZERS and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


MAX_POSITIONS = 1 << 22  # 4M positions: past this a config is not a model this platform can run


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors headers only (8-byte length + JSON; no weights read)."""
    files = sorted(folder.glob("*.safetensors"))
    shapes: dict[str, list[int]] = {}
    for path in files:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or length > 100 << 20:
                raise InvalidArgument(f"{folder.name}/{path.name} is not a safetensors file (header size)")
            header = json.loads(f.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def check_config_against_weights(folder: Path, fmt: dict[str, Any]) -> None:
    """config.json's sizes agree with the tensors actually present, before anything is allocated: a config
    that says 60,000 layers over a 2-layer checkpoint would otherwise build 60,000 layers until memory ran
    out. InvalidArgument names the mismatch."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    config = {**config.get("text_config", {}), **config}
    shapes = safetensors_shapes(folder)
    if not shapes:
        return
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(positions, int) and positions > MAX_POSITIONS:
        raise InvalidArgument(
            f"{folder.name}/config.json: max_position_embeddings {positions} is more than {MAX_POSITIONS}"
        )
    layer_ids = {int(m.group(1)) for name in shapes if (m := re.search(r"\.(?:layers|h)\.(\d+)\.", name))}
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    if layer_ids and isinstance(layers, int) and layers != max(layer_ids) + 1:
        raise InvalidArgument(
            f"{folder.name}/config.json: num_hidden_layers is {layers} but the weights hold "
            f"{max(layer_ids) + 1} layers; fix config.json or upload the matching weights"
        )
    if fmt.get("format") != "hf-safetensors":
        return  # quantized formats store packed shapes
    embedding = next((shapes[n] for n in shapes if n.endswith(("embed_tokens.weight", "wte.weight"))), None)
    if embedding is None or len(embedding) != 2:
        return
    for key, actual in (("vocab_size", embedding[0]), ("hidden_size", embedding[1])):
        declared = config.get(key) if key in config else config.get({"hidden_size": "n_embd"}.get(key, key))
        if isinstance(declared, int) and declared != actual:
            raise InvalidArgument(
                f"{folder.name}/config.json: {key} is {declared} but the embedding weights say {actual}; "
                "fix config.json or upload the matching weights"
            )


def load_causal_lm(folder: Path, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) from a model folder of any loadable format; the model is in eval mode on
    `device` ("cpu", or "cuda" for the formats in formats.GPU_FORMATS)."""
    folder = Path(folder)
    fmt = read_format(folder)
    check_config_against_weights(folder, fmt)
    loader = formats.get_loader(fmt["format"])
    if device != "cpu" and fmt["format"] not in formats.GPU_FORMATS:
        raise FailedPrecondition(
            f"a {fmt['format']!r} model runs on CPU only in Tailor (formats that run on a GPU: "
            f"{', '.join(sorted(formats.GPU_FORMATS))}); measure it with device 'cpu' or 'auto'"
        )
    from safetensors import SafetensorError

    try:
        model = loader(folder, fmt) if device == "cpu" else loader(folder, fmt, device=device)
    except SafetensorError as exc:
        # The store checks headers at upload and fetch; a file that still lies is the model's fault, not
        # the worker's: say so (without the worker's path) instead of an internal error.
        raise InvalidArgument(
            f"the model's safetensors weights cannot be read ({str(exc).replace(str(folder), '<model>')}); "
            "re-save them with "
            "save_pretrained(safe_serialization=True) and upload again"
        ) from None
    model.eval()
    return model, load_tokenizer(folder)


def save_hf_model(model: Any, tokenizer: Any, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Save a full-precision model as an `hf-safetensors` folder in `dtype` (float32, bfloat16, float16).

    The model is cast in place (no copy: models can be large), so it is in `dtype` afterwards.
    """
    from tailor_runtime.ml.formats.hf_safetensors import torch_dtype

    target = torch_dtype(dtype)  # validate before creating anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(target)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return write_format(out_dir, formats.HF_SAFETENSORS, dtype=dtype)


def folder_size_bytes(folder: Path) -> int:
    """Total size of the regular files under `folder` (recursively)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())
