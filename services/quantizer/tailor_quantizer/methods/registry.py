"""The registry of quantization methods: a name -> a class with Config, availability() and run().

A method is a class decorated with `@register("name", caps=Caps(...))` that defines:

    class Config(pydantic.BaseModel)     # its options; extra="forbid", frozen, every Field described
    @staticmethod availability() -> (ok, reason)   # can it run in this process (libraries, hardware)?
    @staticmethod run(model_dir, out_dir, cfg, job: QuantizeJob) -> dict   # metrics

Method modules import torch and their library inside `run`, so listing the methods stays cheap and each
worker image needs only the libraries of the methods it runs (a missing one makes the method unavailable,
with the reason, in ListMethods).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.libraries import importable  # noqa: F401  (methods import it from here)


@dataclass(frozen=True)
class Caps:
    """What a method produces and needs, shown to users and used to pick a worker."""

    bits: tuple[int, ...]  # bits per quantized weight it can produce
    needs_calibration: bool  # needs sample data (calibration_data in the request)
    devices: tuple[str, ...]  # where it can run: "cpu", "cuda"
    output_format: str  # the tailor_format.json format it writes
    libraries: tuple[str, ...]  # Python distributions it relies on (their versions go into the manifest)
    description: str
    deterministic: bool = True  # same inputs and seed -> same bytes (tested)
    min_compute_capability: str = ""  # e.g. "8.9": needs a CUDA GPU at least this recent


@dataclass
class QuantizeJob:
    """What a method's run() gets besides its folders and config."""

    progress: Any  # ProgressFn
    seed: int = 0
    calibration: Any = None  # tailor_runtime.ml.calibration.CalibrationSet when the method needs one
    device: str = "cpu"  # where to compute: "cpu" or "cuda"
    stats: dict[str, Any] = field(default_factory=dict)  # extra manifest metrics a method wants to record


class Method(Protocol):
    name: ClassVar[str]
    caps: ClassVar[Caps]
    Config: ClassVar[type[BaseModel]]

    @staticmethod
    def availability() -> tuple[bool, str]: ...

    @staticmethod
    def run(model_dir: Any, out_dir: Any, cfg: Any, job: QuantizeJob) -> dict[str, Any]: ...


_METHODS: dict[str, type] = {}


def register(name: str, *, caps: Caps):
    """Class decorator adding a method under `name`; a second method with the same name is an error."""

    def decorate(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"quantization method {name!r} is registered twice ({_METHODS[name]} and {cls})")
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise TypeError(f"method {name!r} must define a pydantic Config class")
        if config.model_config.get("extra") != "forbid" or not config.model_config.get("frozen"):
            raise TypeError(f"method {name!r}: Config must use ConfigDict(extra='forbid', frozen=True)")
        for attr in ("availability", "run"):
            if not callable(getattr(cls, attr, None)):
                raise TypeError(f"method {name!r} must define {attr}()")
        cls.name, cls.caps = name, caps
        _METHODS[name] = cls
        return cls

    return decorate


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise InvalidArgument(f"unknown quantization method {name!r}", choices=_METHODS)
    return _METHODS[name]


def list_methods() -> list[type[Method]]:
    return [_METHODS[n] for n in sorted(_METHODS)]


def parse_config(method: type[Method], raw: dict[str, Any] | None) -> BaseModel:
    """`method.Config` from user input; InvalidArgument naming each bad field otherwise."""
    from tailor_runtime.stage import validate_config

    return validate_config(method.Config, raw, f"quantization method {method.name!r}")


def require_full_precision(model_dir: Any) -> dict[str, Any]:
    """The input folder's format, which must be a plain HF model (quantizing twice is refused)."""
    from tailor_runtime.ml.formats import HF_SAFETENSORS
    from tailor_runtime.ml.model_io import read_format

    fmt = read_format(model_dir)
    if fmt["format"] != HF_SAFETENSORS:
        raise InvalidArgument(
            # The worker's cache path is not the user's business (and is an internal detail): say the format.
            f"quantization needs a full-precision model (format {HF_SAFETENSORS!r}); the model given is "
            f"{fmt['format']!r} (already quantized): quantize its full-precision parent instead"
        )
    return fmt


def cuda_at_least(capability: str) -> tuple[bool, str]:
    """(True, "") when a CUDA GPU of compute capability >= `capability` (e.g. "8.9") is visible."""
    import torch

    if not torch.cuda.is_available():
        return (
            False,
            f"needs an NVIDIA GPU with compute capability {capability} or later; this worker has no GPU",
        )
    major, minor = torch.cuda.get_device_capability()
    want = tuple(int(x) for x in capability.split("."))
    if (major, minor) < want:
        name = torch.cuda.get_device_name()
        return False, (
            f"needs compute capability {capability} or later (Ada, Hopper); this worker's {name} is {major}.{minor}"
        )
    return True, ""
