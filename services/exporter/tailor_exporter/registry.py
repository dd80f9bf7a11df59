"""The registry of export formats: a name -> its Config, its run function and its verification tolerance.

    register(ExportFormat(name="onnx", Config=..., run=..., tolerance=Tolerance(...), ...))

`run(model_dir, out_dir, cfg, job) -> dict` builds the export in `out_dir` (which must not exist yet or
be empty) only after it has been verified against its source, and returns at least `format` (the
tailor_format.json written), `files`, `size_on_disk_mb` and `verification` (flat headline numbers:
`max_abs_diff`, `top1_agreement`, `positions`, `passed`, and the detailed `checks`). `tolerance` is the
default bound of that verification, shown to users; a format's Config may let a request override it.

`source_formats` are the model formats `run` takes as they are; the servicer decodes any other
quantized source (compressed-tensors, bitsandbytes, int8-dynamic, gguf) into a dense float32
hf-safetensors folder first (`tailor_runtime.ml.dense`), so every candidate the selector can recommend
can be exported. A source already in the format's own `output_format` (a gguf to `gguf`) is passed too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.progress import ProgressFn


@dataclass(frozen=True)
class Tolerance:
    """An export passes when max |logit difference| <= atol and top-1 agreement >= min_top1_agreement."""

    atol: float
    min_top1_agreement: float


@dataclass
class ExportJob:
    """What a format's run() gets besides its folders and config."""

    progress: ProgressFn
    calibration_file: Path | None = None  # text or JSONL (formats with needs_calibration)
    seed: int = 0


@dataclass(frozen=True)
class ExportFormat:
    name: str
    Config: type[BaseModel]
    run: Callable[[Path, Path, Any, ExportJob], dict[str, Any]]
    tolerance: Tolerance
    description: str
    output_format: str  # the tailor_format.json format it writes
    libraries: tuple[str, ...]  # their versions go into the recipe of every export
    needs_calibration: bool = False  # the Config names a dataset artifact in `calibration_data`
    devices: tuple[str, ...] = ("cpu",)
    deterministic: bool = True  # the same input and config give the same bytes (tested)
    source_formats: tuple[str, ...] = ("hf-safetensors",)  # taken as they are; others are decoded first

    def takes_natively(self, source_format: str) -> bool:
        """Whether `run` takes a `source_format` folder as it is (else the servicer decodes it first)."""
        return source_format in self.source_formats or source_format == self.output_format


_FORMATS: dict[str, ExportFormat] = {}
# Modules whose import registers their formats; imported on first use of the registry.
FORMAT_MODULES = (
    "tailor_exporter.onnx_export",
    "tailor_exporter.gguf_export",
    "tailor_exporter.triton_export",
    "tailor_exporter.mobile_export",
)


def _import_formats() -> None:
    import importlib

    for module in FORMAT_MODULES:
        importlib.import_module(module)


def register(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"export format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    _import_formats()
    if name not in _FORMATS:
        raise InvalidArgument(f"unknown export format {name!r}", choices=_FORMATS)
    return _FORMATS[name]


def list_formats() -> list[ExportFormat]:
    _import_formats()
    return [_FORMATS[name] for name in sorted(_FORMATS)]


def check_destination(out_dir: Path) -> None:
    """An export's destination must not exist yet or be empty; its parent is made."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FailedPrecondition(f"export destination {out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A scratch folder beside `out_dir` (so publishing is one rename on the same filesystem), removed
    whatever happens: an export that fails leaves nothing behind."""
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def move_into_place(folder: Path, out_dir: Path) -> None:
    """Publish a verified export: `folder` becomes `out_dir` (empty if it exists: check_destination)."""
    if out_dir.exists():
        out_dir.rmdir()
    os.rename(folder, out_dir)
