"""ExporterService: proto in, an export verified against its source as an operation, proto out.

A source the format does not take as it is (`ExportFormat.source_formats`) is decoded first into a
dense float32 hf-safetensors folder (`tailor_runtime.ml.dense`: every quantized format Tailor writes),
checked against the candidate as its own format loads it, and the format exports that; the metrics say
so (`source_format`, `decoded_from`, `decode_*`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format

from tailor.common.v1 import common_pb2 as common
from tailor.exporter.v1 import exporter_service_pb2 as pb
from tailor.exporter.v1 import exporter_service_pb2_grpc as pb_grpc
from tailor_exporter.registry import ExportJob, get_format, list_formats
from tailor_exporter.targets import TARGETS, resolve
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml import dense
from tailor_runtime.ml.architectures import supported_families
from tailor_runtime.operations import WorkResult, to_struct
from tailor_runtime.server import ServiceContext
from tailor_runtime.stage import (
    config_parameters,
    config_schema_json,
    dataset_file,
    read_format_name,
    recipe,
    require_architecture,
    require_artifact,
    validate_config,
    workspace,
)
from tailor_runtime.targets import Target

CALIBRATION_SUFFIXES = (".txt", ".text", ".jsonl", ".json")


def verification_metrics(checks: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers from the verification block for the pipeline summary (the full block is in the artifact)."""
    flat = {k: v for k, v in checks.items() if isinstance(v, int | float | str | bool)}
    return flat


def source_metrics(source_format: str, decoding: dict[str, Any] | None) -> dict[str, Any]:
    """What the export was made from: the candidate's format and, when it was decoded to dense float
    first, from what, how many layers, and how closely the decoded model agrees with the candidate."""
    if decoding is None:
        return {"source_format": source_format, "decoded_from": ""}
    check = decoding["check"]
    return {
        "source_format": source_format,
        "decoded_from": decoding["decoded_from"],
        "decoded_layers": decoding["decoded_layers"],
        "decode_max_abs_diff": check["max_abs_diff"],
        "decode_top1_agreement": check["top1_agreement"],
        "decode_positions": check["positions"],
        "decode_activations_quantized": check["activations_quantized"],
    }


def format_info(fmt) -> common.MethodInfo:
    tolerance = f"max |logit diff| <= {fmt.tolerance.atol:g}, top-1 >= {fmt.tolerance.min_top1_agreement:g}"
    return common.MethodInfo(
        name=fmt.name,
        available=True,
        description=f"{fmt.description}; verified against its source before publishing ({tolerance})",
        output_format=fmt.output_format,
        libraries=list(fmt.libraries),
        devices=list(fmt.devices),
        parameters=config_parameters(fmt.Config),
        config_schema_json=config_schema_json(fmt.Config),
        needs_calibration=fmt.needs_calibration,
        deterministic=fmt.deterministic,
        architectures=supported_families(f"export/{fmt.name}"),
    )


def target_info(name: str, target: Target) -> pb.TargetInfo:
    """One entry per name a request may use: a name kept from an earlier version is listed too, so a
    stored spec that uses it passes the gateway's check."""
    alias = f" (an earlier name of {target.name})" if name != target.name else ""
    return pb.TargetInfo(
        name=name,
        description=target.export_description + alias,
        default_format=target.default_format,
        formats=list(target.formats),
        settings={fmt: to_struct(values) for fmt, values in target.settings.items()},
    )


class ExporterServicer(pb_grpc.ExporterServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def ListFormats(self, request, context):
        return pb.ListFormatsResponse(
            formats=[format_info(fmt) for fmt in list_formats()],
            targets=[target_info(name, TARGETS[name]) for name in sorted(TARGETS)],
        )

    async def Export(self, request: pb.ExportRequest, context):
        requested = json_format.MessageToDict(request.config) if request.HasField("config") else {}
        format_name, config = resolve(request.format, request.target, requested)
        fmt = get_format(format_name)
        if request.model_name and "model_name" in fmt.Config.model_fields and "model_name" not in config:
            config = {**config, "model_name": request.model_name}  # the pipeline's name, where one is shown
        cfg = validate_config(fmt.Config, config, f"{format_name} export")
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        source_manifest = require_artifact(store, request.model, "model", ("model",))
        # The gateway checks this at submit; a direct call (or a spec accepted while no exporter listed
        # its formats) gets the same refusal here, before any work, not a converter's traceback.
        require_architecture(store, request.model.id, f"export/{format_name}")
        source_format = source_manifest.format
        # A test-mode marker (TAILOR_FAKE_WORK: format fake-*) is no model: the runner fakes this export too.
        decodable = source_format in dense.DECODABLE or source_format.startswith("fake-")
        if not fmt.takes_natively(source_format) and not decodable:
            raise InvalidArgument(
                f"a {source_format!r} model cannot be exported as {format_name}: the format takes "
                f"{', '.join(fmt.source_formats)} as they are, and Tailor decodes "
                f"{', '.join(dense.DECODABLE)} to hf-safetensors first",
                choices=sorted({*fmt.source_formats, *dense.DECODABLE}),
            )
        inputs, calibration = [request.model.id], None
        if fmt.needs_calibration:
            if not cfg.calibration_data:
                raise InvalidArgument(
                    f"{fmt.name} needs config.calibration_data: the id of a text or JSONL dataset artifact"
                )
            ref = common.ArtifactRef(id=cfg.calibration_data)
            manifest = require_artifact(store, ref, "config.calibration_data", ("dataset",))
            calibration = (ref.id, dataset_file(manifest, CALIBRATION_SUFFIXES))
            inputs.append(ref.id)
        the_recipe = recipe("export", format_name, cfg, inputs, 0, fmt.libraries)

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "model from the store")
            model_dir = store.materialize(request.model.id, cache_dir)
            job = ExportJob(progress=progress)
            if calibration is not None:
                job.calibration_file = Path(store.materialize(calibration[0], cache_dir)) / calibration[1]
            with workspace(cache_dir) as scratch:
                out = scratch / "export"
                source_dir, decoding = model_dir, None
                if not fmt.takes_natively(source_format):
                    progress(1.5, "decoding", f"{source_format} to dense float32 hf-safetensors")
                    source_dir = scratch / "dense"
                    decoding = dense.decode_to_dense(model_dir, source_dir, progress)
                    progress(5.0, "decoded", f"{decoding['decoded_layers']} layers from {source_format}")
                result = fmt.run(source_dir, out, cfg, job)
                metrics = verification_metrics(result.get("verification", {}))
                metrics.update(source_metrics(source_format, decoding))
                metrics["size_on_disk_mb"] = result.get("size_on_disk_mb", 0.0)
                metrics["export_format"] = format_name
                progress(99.0, "publishing", "")
                manifest = store.publish_directory(
                    out,
                    kind="export",
                    format=read_format_name(out),
                    name=f"{format_name}-export",
                    parents=[request.model.id],
                    recipe=the_recipe,
                    metrics=metrics,
                )
            run_facts = {"export_s": result.get("export_s", 0.0)}
            if request.target:
                run_facts["target"] = request.target
            return WorkResult(results=[manifest], metrics={**metrics, **run_facts})

        labels = {**request.labels, "method": format_name}
        if request.target:
            labels["target"] = request.target
        return await self.ctx.runner.start_async("export", work, labels=labels, recipe=the_recipe)


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_ExporterServiceServicer_to_server(ExporterServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["ExporterService"].full_name]
