"""The architecture registry: what Tailor knows about each decoder family, one small module per family.

A family module registers one `Architecture`: the `model_type` values of config.json it covers, the
linear layers LoRA adapts, the fused projections it stores, llama.cpp's name for it, and the stage
names it cannot take, each with the reason and what would work instead. Stages ask it instead of
keeping their own per-model tables; the workers publish it (`MethodInfo.architectures`) and the gateway
checks a pipeline spec against it at submit, so a combination that cannot run is refused before any
work is done.

Capability keys are `<stage>/<name>`: `finetune/lora`, `quantize/awq`, `export/gguf`, `benchmark`.
Everything not refused is supported, and every supported cell is exercised by the test matrix
(tests/unit/test_architecture_matrix.py). Importing this package never imports torch.

Adding a family: docs/adding-an-architecture.md.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument

# Family modules; importing one registers its Architecture.
FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt2", "mixtral")


@dataclass(frozen=True)
class Architecture:
    family: str  # the registry name, e.g. "qwen2"
    model_types: tuple[str, ...]  # config.json `model_type` values of this family
    description: str  # what distinguishes it (shown in listings and errors)
    lora_targets: tuple[str, ...]  # the linear layers LoRA adapts by default (never the output head)
    # fused weight -> the projections it holds, in order (Phi-3 stores q/k/v in one qkv_proj).
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # llama.cpp's `general.architecture` for it (convert_hf_to_gguf.py writes it); None: no GGUF.
    llama_cpp_arch: str | None = None
    # capability pattern (fnmatch, e.g. "export/onnx*") -> why not, and what would work.
    refused: Mapping[str, str] = field(default_factory=dict)

    def refusal(self, capability: str) -> str | None:
        """Why this family cannot take `capability` ("quantize/awq"), or None when it can."""
        for pattern, reason in self.refused.items():
            if fnmatch.fnmatchcase(capability, pattern):
                return reason
        if self.llama_cpp_arch is None and capability in GGUF_CAPABILITIES:
            return NO_GGUF
        return None


# Everything written by llama.cpp's converter: a family it does not know (llama_cpp_arch None) has neither.
GGUF_CAPABILITIES = ("export/gguf", "quantize/gguf_q8_0", "quantize/gguf_q4_k_m")
NO_GGUF = (
    "llama.cpp's converter (convert_hf_to_gguf.py) has no writer for this family, so there is no GGUF of "
    "it; export to onnx, or quantize with int8_dynamic or nf4"
)

_REGISTRY: dict[str, Architecture] = {}
_BY_MODEL_TYPE: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add a family; a duplicate family name or model_type is a programming error."""
    if arch.family in _REGISTRY:
        raise ValueError(f"architecture family {arch.family!r} is registered twice")
    for model_type in arch.model_types:
        if model_type in _BY_MODEL_TYPE:
            raise ValueError(f"model_type {model_type!r} is claimed by {_BY_MODEL_TYPE[model_type].family}")
    _REGISTRY[arch.family] = arch
    for model_type in arch.model_types:
        _BY_MODEL_TYPE[model_type] = arch
    return arch


def _load() -> None:
    if not _REGISTRY:
        for module in FAMILY_MODULES:
            importlib.import_module(f"{__name__}.{module}")


def families() -> list[Architecture]:
    _load()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get(family: str) -> Architecture:
    _load()
    if family not in _REGISTRY:
        raise InvalidArgument(f"unknown architecture family {family!r}", choices=sorted(_REGISTRY))
    return _REGISTRY[family]


def supported_families(capability: str) -> list[str]:
    """The families that can take `capability` (what `MethodInfo.architectures` lists)."""
    return [a.family for a in families() if a.refusal(capability) is None]


def for_config(config: Mapping[str, Any]) -> Architecture:
    """The family of a parsed config.json; InvalidArgument naming the supported ones otherwise."""
    _load()
    model_type = config.get("model_type")
    arch = _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        classes = ", ".join(config.get("architectures") or []) or "no architectures entry"
        known = sorted(_BY_MODEL_TYPE)
        raise InvalidArgument(
            f"model_type {model_type!r} ({classes}) is not an architecture Tailor supports yet; supported "
            f"model types: {', '.join(known)} (adding one: docs/adding-an-architecture.md)",
        )
    return arch


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, parsed; InvalidArgument when it is missing or not JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InvalidArgument(
            f"{Path(folder).name} has no config.json: it is not a Hugging Face model folder"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path.name} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path.name} must hold a JSON object")
    return config


def for_folder(folder: Path) -> Architecture:
    return for_config(read_config(folder))


def require(arch: Architecture, capability: str) -> None:
    """InvalidArgument with the reason and the families that can, when `arch` cannot take `capability`."""
    reason = arch.refusal(capability)
    if reason is not None:
        others = [f for f in supported_families(capability) if f != arch.family]
        can = f" (families that can: {', '.join(others)})" if others else ""
        raise InvalidArgument(f"{capability} is not available for {arch.family} models: {reason}{can}")
