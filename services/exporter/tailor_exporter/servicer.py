"""ExporterService: proto in, an export verified against its source as an operation, proto out."""

from __future__ import annotations

from typing import Any

from tailor.common.v1 import common_pb2 as common
from tailor.exporter.v1 import exporter_service_pb2 as pb
from tailor.exporter.v1 import exporter_service_pb2_grpc as pb_grpc
from tailor_exporter.onnx_export import OnnxExportConfig
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.operations import WorkResult
from tailor_runtime.server import ServiceContext
from tailor_runtime.stage import (
    config_from_struct,
    config_parameters,
    read_format_name,
    recipe,
    require_artifact,
    workspace,
)

FORMATS = {"onnx": OnnxExportConfig}
LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")


def verification_metrics(checks: dict[str, Any]) -> dict[str, Any]:
    """Flat numbers from the verification block for the pipeline summary (the full block is in the artifact)."""
    flat = {k: v for k, v in checks.items() if isinstance(v, int | float | str | bool)}
    return flat


class ExporterServicer(pb_grpc.ExporterServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def ListFormats(self, request, context):
        return pb.ListFormatsResponse(
            formats=[
                common.MethodInfo(
                    name=name,
                    available=True,
                    description="ONNX (opset >= 17), verified in onnxruntime",
                    output_format=name,
                    libraries=list(LIBRARIES),
                    devices=["cpu", "cuda"],
                    parameters=config_parameters(config),
                )
                for name, config in FORMATS.items()
            ]
        )

    async def Export(self, request: pb.ExportRequest, context):
        from tailor_exporter.onnx_export import export_onnx

        if request.format not in FORMATS:
            raise InvalidArgument(f"unknown export format {request.format!r}", choices=FORMATS)
        cfg = config_from_struct(FORMATS[request.format], request.config, f"{request.format} export")
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        require_artifact(store, request.model, "model", ("model",))
        the_recipe = recipe("export", request.format, cfg, [request.model.id], 0, LIBRARIES)

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "model from the store")
            model_dir = store.materialize(request.model.id, cache_dir)
            with workspace(cache_dir) as scratch:
                out = scratch / "export"
                result = export_onnx(model_dir, out, cfg, progress)
                metrics = verification_metrics(result.get("verification", {}))
                metrics["size_on_disk_mb"] = result.get("size_on_disk_mb", 0.0)
                progress(99.0, "publishing", "")
                manifest = store.publish_directory(
                    out,
                    kind="export",
                    format=read_format_name(out),
                    name=f"{request.format}-export",
                    parents=[request.model.id],
                    recipe=the_recipe,
                    metrics=metrics,
                )
            return WorkResult(
                results=[manifest], metrics={**metrics, "export_s": result.get("export_s", 0.0)}
            )

        return self.ctx.runner.start(
            "export", work, labels={**request.labels, "method": request.format}, recipe=the_recipe
        )


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_ExporterServiceServicer_to_server(ExporterServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["ExporterService"].full_name]
