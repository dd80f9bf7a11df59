"""Triton Inference Server model repositories (`triton`), verified before they are published.

The graph takes the ONNX road unchanged: the chosen variant (`onnx`, `onnx-fp16` or `onnx-int8`) is
exported and verified against its source by that format's own run, in a temporary folder. Its verified
graph is then laid out as a Triton model repository, with a `config.pbtxt` written from the graph's
real inputs and outputs, parsed back as Triton's own `ModelConfig` protobuf (tritonclient ships it) and
checked against the graph before anything is published:

    tailor_format.json          {"format": "triton-repository", "model_file": "<name>/<version>/model.onnx", ...}
    verification.json           the variant's checks, the repository check, the tool versions
    config.json, tokenizer ...  the model's config and tokenizer (Triton ignores files at the root)
    <name>/config.pbtxt         backend "onnxruntime", max_batch_size 0, inputs/outputs of the graph
    <name>/<version>/model.onnx (+ model.onnx.data for graphs of 1 GiB and more)

Published, the artifact's `files/` prefix in the store is that repository: Triton reads it directly
from S3 or MinIO (`tailor_runtime.serving.triton.model_repository_url` gives the URL). Because
tailor_format.json names the graph, the same folder is also a loadable ONNX model for Tailor itself.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tailor_exporter.onnx_export import LIBRARIES as ONNX_LIBRARIES
from tailor_exporter.onnx_export import TOLERANCES, Int8Config
from tailor_exporter.registry import (
    ExportFormat,
    ExportJob,
    check_destination,
    get_format,
    move_into_place,
    register,
    staged,
)
from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.ml.onnx import MODEL_FILE
from tailor_runtime.stage import library_versions
from tailor_runtime.store.manifest import sha256_file

FORMAT = "triton-repository"
CONFIG_FILE = "config.pbtxt"
BACKEND = "onnxruntime"
VARIANTS = ("onnx", "onnx-fp16", "onnx-int8")
LIBRARIES = (*ONNX_LIBRARIES, "tritonclient", "protobuf")
# A model name is a folder name in the repository and a path segment of Triton's URLs.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Old Triton releases skip these folder names when they poll a repository.
RESERVED_NAMES = ("op_defs", "graphs", "resource")
# ONNX TensorProto element type -> Triton DataType name.
TRITON_TYPES = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}
HEADER = (
    "# Triton model configuration written by Tailor's `triton` export. Inputs and outputs are the ONNX\n"
    "# graph's own (batch is an explicit, dynamic axis: max_batch_size 0); -1 marks a dynamic axis.\n"
)


class TritonExportConfig(Int8Config):
    """Options of the `triton` export: the ONNX variant's options plus the repository's."""

    variant: Literal["onnx", "onnx-fp16", "onnx-int8"] = Field(
        "onnx", description="The ONNX export whose verified graph the repository serves."
    )
    model_name: str = Field(
        "model",
        description="The model's name in Triton (its folder): letters, digits, _ . - (at most 128).",
    )
    version: int = Field(1, ge=1, description="The model version folder.")
    device: Literal["cpu", "gpu"] = Field(
        "cpu", description="Where Triton runs the instances: KIND_CPU or KIND_GPU."
    )
    instances: int = Field(1, ge=1, le=64, description="Model instances per device (instance_group count).")
    tensorrt: bool = Field(
        False,
        description="GPU only: ask ONNX Runtime's TensorRT execution accelerator inside Triton (not run "
        "by Tailor's tests; no TensorRT plan is built).",
    )
    tensorrt_precision: Literal["FP32", "FP16"] = Field(
        "FP16", description="The TensorRT accelerator's precision_mode."
    )

    @field_validator("version", "instances", mode="before")
    @classmethod
    def _whole_floats(cls, value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("model_name")
    @classmethod
    def _triton_safe(cls, name: str) -> str:
        problem = _name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _tensorrt_needs_gpu(self) -> TritonExportConfig:
        if self.tensorrt and self.device != "gpu":
            raise ValueError("tensorrt=true needs device=gpu (TensorRT runs on NVIDIA GPUs only)")
        return self


def check_model_name(name: str) -> str:
    problem = _name_problem(name)
    if problem:
        raise InvalidArgument(problem)
    return name


def _name_problem(name: str) -> str | None:
    if MODEL_NAME.fullmatch(name or "") and name not in RESERVED_NAMES:
        return None
    return (
        f"Triton model name {name!r} is not valid: use 1 to 128 letters, digits, '_', '.' or '-', "
        f"starting with a letter, digit or '_' (and none of {', '.join(RESERVED_NAMES)})"
    )


def model_config_pb2() -> Any:
    """Triton's ModelConfig protobuf module, from tritonclient."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise FailedPrecondition(
            f"the triton export validates config.pbtxt with tritonclient's ModelConfig, which cannot be "
            f"imported here ({exc}); install requirements.txt"
        ) from None
    return model_config_pb2


# --- config.pbtxt ------------------------------------------------------------------------------------
def graph_io(graph_path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, tuple[str, list[int]]]]:
    """The graph's inputs and outputs: name -> (Triton type, dims with -1 for dynamic axes), in order."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}

    def describe(value: Any) -> tuple[str, list[int]]:
        tensor = value.type.tensor_type
        if tensor.elem_type not in TRITON_TYPES:
            raise FailedPrecondition(
                f"{graph_path.name}: {value.name!r} has ONNX element type {tensor.elem_type}, "
                "which Triton has no type for"
            )
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return TRITON_TYPES[tensor.elem_type], dims

    inputs = {v.name: describe(v) for v in graph.input if v.name not in weights}
    outputs = {v.name: describe(v) for v in graph.output}
    return inputs, outputs


def build_config(graph_path: Path, cfg: TritonExportConfig) -> str:
    """config.pbtxt for the graph at `graph_path` (deterministic text)."""
    from google.protobuf import text_format

    mc = model_config_pb2()
    inputs, outputs = graph_io(graph_path)
    config = mc.ModelConfig(
        name=cfg.model_name, backend=BACKEND, max_batch_size=0, default_model_filename=MODEL_FILE
    )
    config.version_policy.latest.num_versions = 1
    for name, (dtype, dims) in inputs.items():
        config.input.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
    for name, (dtype, dims) in outputs.items():
        config.output.add(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
    kind = mc.ModelInstanceGroup.KIND_GPU if cfg.device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=cfg.instances, kind=kind)
    if cfg.tensorrt:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accelerator.parameters["precision_mode"] = cfg.tensorrt_precision
        accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
    text = text_format.MessageToString(config)
    # proto3 text leaves out fields at their default; Triton's readers expect max_batch_size spelled out.
    first, rest = text.split("\n", 1)
    return f"{HEADER}{first}\nmax_batch_size: 0\n{rest}"


def read_config(path: Path) -> Any:
    """config.pbtxt parsed as Triton's ModelConfig; InvalidArgument naming the problem otherwise."""
    from google.protobuf import text_format

    mc = model_config_pb2()
    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise InvalidArgument(
            f"{path.parent.name}/{path.name} is not a valid Triton ModelConfig: {exc}"
        ) from None


def check_model_folder(model_folder: Path, version: int) -> dict[str, Any]:
    """Validate `<name>/config.pbtxt` against Triton's ModelConfig and against `<name>/<version>/model.onnx`.

    Every difference (a missing or extra tensor, a data type, the dims) is named in one InvalidArgument.
    """
    model_folder = Path(model_folder)
    config_path, graph_path = model_folder / CONFIG_FILE, model_folder / str(version) / MODEL_FILE
    for path in (config_path, graph_path):
        if not path.is_file():
            raise InvalidArgument(
                f"the Triton model folder {model_folder.name} has no {path.relative_to(model_folder)}"
            )
    config = read_config(config_path)
    mc = model_config_pb2()
    problems = []
    if config.name != model_folder.name:
        problems.append(f"name {config.name!r} is not the folder's name {model_folder.name!r}")
    if config.backend != BACKEND and config.platform != "onnxruntime_onnx":
        problems.append(f"backend {config.backend!r} is not {BACKEND!r}")
    if config.max_batch_size != 0:
        problems.append(
            f"max_batch_size {config.max_batch_size} is not 0 (batch is the graph's own first axis)"
        )
    inputs, outputs = graph_io(graph_path)
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        seen = set()
        for tensor in declared:
            seen.add(tensor.name)
            if tensor.name not in actual:
                problems.append(f"{kind} {tensor.name!r} is not in the graph")
                continue
            dtype, dims = mc.DataType.Name(tensor.data_type), list(tensor.dims)
            if dtype != actual[tensor.name][0]:
                problems.append(f"{kind} {tensor.name!r} is {dtype}, the graph's is {actual[tensor.name][0]}")
            if dims != actual[tensor.name][1]:
                problems.append(
                    f"{kind} {tensor.name!r} has dims {dims}, the graph's are {actual[tensor.name][1]}"
                )
        problems += [f"{kind} {name!r} of the graph is missing" for name in actual if name not in seen]
    if problems:
        raise InvalidArgument(
            f"{model_folder.name}/{CONFIG_FILE} does not match {graph_path.relative_to(model_folder)}: "
            + "; ".join(problems)
        )
    return {
        "config": f"{model_folder.name}/{CONFIG_FILE}",
        "model_config_valid": True,
        "matches_graph": True,
        "inputs": len(inputs),
        "outputs": len(outputs),
        "instance_kind": mc.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)
        if config.instance_group
        else "KIND_AUTO",
        "passed": True,
    }


# --- the export ---------------------------------------------------------------------------------------
def export_triton(model_dir: Path, out_dir: Path, cfg: TritonExportConfig, job: ExportJob) -> dict[str, Any]:
    """Export `model_dir` to `out_dir` (which must not exist yet or be empty) as a Triton repository."""
    from tailor_runtime.ml.model_io import folder_size_bytes, write_format
    from tailor_runtime.ml.onnx.folder import tool_versions

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_destination(out_dir)
    model_config_pb2()  # fail before exporting when it cannot be validated
    started = time.monotonic()
    variant = get_format(cfg.variant)
    variant_cfg = variant.Config.model_validate({k: getattr(cfg, k) for k in variant.Config.model_fields})

    def progress(percent: float, phase: str = "", message: str = "", **metrics: float) -> None:
        job.progress(percent * 0.9, phase, f"{cfg.variant}: {message}", **metrics)

    with staged(out_dir) as work:
        onnx_dir, repo = work / "onnx", work / "repository"
        result = variant.run(
            model_dir, onnx_dir, variant_cfg, ExportJob(progress, job.calibration_file, job.seed)
        )
        job.progress(90.0, "laying out", f"Triton model repository {cfg.model_name}/{cfg.version}")
        version_dir = repo / cfg.model_name / str(cfg.version)
        version_dir.mkdir(parents=True)
        graph_files = sorted(p for p in onnx_dir.iterdir() if p.name.startswith(MODEL_FILE))
        for path in graph_files:  # the verified graph (and its external data), moved unchanged
            os.rename(path, version_dir / path.name)
        for path in sorted(onnx_dir.iterdir()):
            if path.name not in ("tailor_format.json", "verification.json"):
                os.rename(path, repo / path.name)
        config_path = repo / cfg.model_name / CONFIG_FILE
        config_path.write_text(build_config(version_dir / MODEL_FILE, cfg))

        job.progress(93.0, "validating", f"{CONFIG_FILE} as Triton's ModelConfig, against the graph")
        check = check_model_folder(repo / cfg.model_name, cfg.version)
        check["graph_sha256"] = {
            f"{cfg.model_name}/{cfg.version}/{p.name}": sha256_file(version_dir / p.name) for p in graph_files
        }
        checks = {**result["verification"]["checks"], "repository": check}

        variant_format = {k: v for k, v in result["format"].items() if k != "format"}
        fmt = write_format(
            repo,
            FORMAT,
            **{
                **variant_format,
                "model_file": f"{cfg.model_name}/{cfg.version}/{MODEL_FILE}",
                "variant": cfg.variant,
                "triton": {
                    "model_name": cfg.model_name,
                    "version": cfg.version,
                    "backend": BACKEND,
                    "config_file": f"{cfg.model_name}/{CONFIG_FILE}",
                    "device": cfg.device,
                    "instances": cfg.instances,
                    "tensorrt": cfg.tensorrt,
                },
            },
        )
        verification = json.loads((onnx_dir / "verification.json").read_text())
        verification["checks"] = checks
        verification["versions"] = {**tool_versions(), **library_versions("tritonclient", "protobuf")}
        (repo / "verification.json").write_text(json.dumps(verification, indent=2, sort_keys=True) + "\n")
        files = {
            p.relative_to(repo).as_posix(): p.stat().st_size for p in sorted(repo.rglob("*")) if p.is_file()
        }
        move_into_place(repo, out_dir)

    job.progress(100.0, "done", f"exported {out_dir.name}")
    return {
        "out_dir": str(out_dir),
        "format": fmt,
        "files": files,
        "size_on_disk_mb": folder_size_bytes(out_dir) / 2**20,
        "verification": {
            **{k: v for k, v in result["verification"].items() if k in _HEADLINE},
            "checks": checks,
        },
        "export_s": time.monotonic() - started,
        **{k: v for k, v in result.items() if k in _STATISTICS},
    }


_HEADLINE = ("max_abs_diff", "top1_agreement", "positions", "passed", "atol", "min_top1_agreement")
_STATISTICS = ("fused_operators", "quantized_matmuls")  # the variant's, passed on


register(
    ExportFormat(
        name="triton",
        Config=TritonExportConfig,
        run=export_triton,
        tolerance=TOLERANCES["float32"],
        description="Triton Inference Server model repository: <name>/config.pbtxt (ONNX Runtime backend, "
        "CPU or GPU instances, optional TensorRT accelerator) and <name>/1/model.onnx from the verified "
        "onnx, onnx-fp16 or onnx-int8 graph; config.pbtxt validated as Triton's ModelConfig against the "
        "graph. Triton reads the published artifact straight from S3 or MinIO",
        output_format=FORMAT,
        libraries=LIBRARIES,
    )
)
