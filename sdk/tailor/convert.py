"""pytorch_model.bin -> safetensors, on the client, before an upload (the gateway never receives pickles).

Each shard is read with `torch.load(weights_only=True, map_location="cpu", mmap=True)`: PyTorch's
restricted unpickler, which builds tensors and plain containers only and refuses any other object (a
plain unpickle of an untrusted checkpoint runs arbitrary code). Every shard becomes one safetensors file
(`pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`), so the index keeps its
layout (`pytorch_model.bin.index.json` -> `model.safetensors.index.json`). Tensors that share storage
(tied embeddings: lm_head.weight is embed_tokens.weight) are written once each, as copies: safetensors
holds no aliases, and transformers ties them again at load when the config says so. Memory: one shard at
a time (safetensors serializes a shard in memory), so a 10 GB shard needs about 10 GB.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tailor_runtime.ml.model_io import PICKLED_WEIGHTS, WEIGHT_FILES

BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_INDEX = "model.safetensors.index.json"


class ConversionError(Exception):
    pass


def needs_conversion(folder: Path) -> bool:
    """A Hugging Face folder whose weights are only pickled (pytorch_model.bin, single or sharded)."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    has_safe = any((folder / name).is_file() for name in WEIGHT_FILES)
    return not has_safe and any((folder / name).is_file() for name in PICKLED_WEIGHTS)


def safetensors_name(bin_name: str) -> str:
    if not bin_name.endswith(".bin") or "/" in bin_name or bin_name.startswith("."):
        raise ConversionError(f"{bin_name!r} is not a weight shard name (expected pytorch_model*.bin)")
    stem = bin_name.removesuffix(".bin")
    stem = "model" + stem.removeprefix("pytorch_model") if stem.startswith("pytorch_model") else stem
    return stem + ".safetensors"


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
    # The legacy (pre-1.6, non-zip) format cannot be memory-mapped; still the restricted unpickler.
    return torch.load(path, weights_only=True, map_location="cpu")


def _load_shard(path: Path) -> dict:
    import torch

    try:
        state = _torch_load(path)
    except Exception as exc:  # noqa: BLE001 - weights_only refusals are UnpicklingError, and others
        reason = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler" in ln), str(exc))
        raise ConversionError(
            f"{path.name}: torch.load(weights_only=True) refused it ({type(exc).__name__}: {reason[:300]}); "
            "only tensors and plain containers are read, never arbitrary pickled objects"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConversionError(f"{path.name} does not hold a state dict (names -> tensors)")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))[:5]
        raise ConversionError(f"{path.name}: these entries are not tensors: {bad}")
    return state


def _write_shard(state: dict, target: Path) -> None:
    from safetensors.torch import save_file

    owners: set[int] = set()
    tensors = {}
    for name in sorted(state):
        tensor = state[name]
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            if storage in owners:
                # Another name already uses this storage (tied weights, slices of one buffer):
                # safetensors holds no aliases, so this one gets its own copy.
                tensor = tensor.clone()
            owners.add(storage)
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(target), metadata={"format": "pt"})


def convert_folder(src: Path, dest: Path) -> Path:
    """Write a safetensors copy of the Hugging Face folder `src` (pickled weights) into `dest`."""
    src, dest = Path(src), Path(dest)
    if not needs_conversion(src):
        raise ConversionError(f"{src} has no pytorch_model.bin to convert (or already has safetensors)")
    dest.mkdir(parents=True, exist_ok=True)
    if (src / BIN_INDEX).is_file():
        index = json.loads((src / BIN_INDEX).read_text())
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{BIN_INDEX} has no weight_map")
        shards = sorted(set(weight_map.values()))
        renamed = {shard: safetensors_name(shard) for shard in shards}
        for shard in shards:
            if not (src / shard).is_file():
                raise ConversionError(f"{BIN_INDEX} names {shard}, which is not in {src}")
            state = _load_shard(src / shard)
            missing = sorted(k for k, v in weight_map.items() if v == shard and k not in state)
            if missing:
                raise ConversionError(f"{shard} lacks tensors the index puts there: {missing[:5]}")
            _write_shard(state, dest / renamed[shard])
            del state
        new_index = {
            "metadata": index.get("metadata") or {},
            "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())},
        }
        (dest / SAFE_INDEX).write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
        skip = {BIN_INDEX, *shards}
    else:
        _write_shard(_load_shard(src / "pytorch_model.bin"), dest / "model.safetensors")
        skip = {"pytorch_model.bin"}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink():
            raise ConversionError(f"{rel} is a symbolic link; a model folder holds regular files")
        if not path.is_file() or rel in skip or rel.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest
