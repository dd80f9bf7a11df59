"""QuantizerService: proto in, a registered method run as an operation, proto out. No ML here."""

from __future__ import annotations

from tailor.common.v1 import common_pb2 as common
from tailor.quantizer.v1 import quantizer_service_pb2 as pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as pb_grpc
from tailor_quantizer.methods import get_method, list_methods
from tailor_runtime.errors import FailedPrecondition
from tailor_runtime.hardware import hardware_profile
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

MODEL_KINDS = ("model",)


def method_info(method) -> common.MethodInfo:
    ok, reason = method.availability()
    caps = method.caps
    return common.MethodInfo(
        name=method.name,
        description=caps.description,
        available=ok,
        unavailable_reason="" if ok else reason,
        bits=[caps.bits],
        needs_calibration=caps.needs_calibration,
        devices=list(caps.devices),
        output_format=caps.output_format,
        libraries=list(caps.libraries),
        parameters=config_parameters(method.Config),
    )


class QuantizerServicer(pb_grpc.QuantizerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def ListMethods(self, request, context):
        return pb.ListMethodsResponse(
            methods=[method_info(m) for m in list_methods()], hardware=hardware_profile()
        )

    async def Quantize(self, request: pb.QuantizeRequest, context):
        method = get_method(request.method)
        cfg = config_from_struct(method.Config, request.config, f"quantization method {method.name!r}")
        ok, reason = method.availability()
        if not ok:
            raise FailedPrecondition(f"method {method.name!r} cannot run on this worker: {reason}")
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        require_artifact(store, request.model, "model", MODEL_KINDS)
        model_id = request.model.id
        the_recipe = recipe("quantize", method.name, cfg, [model_id], request.seed, method.caps.libraries)

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "model from the store")
            model_dir = store.materialize(model_id, cache_dir)
            with workspace(cache_dir) as out:
                metrics = method.run(model_dir, out, cfg, progress)
                progress(99.0, "publishing", "")
                manifest = store.publish_directory(
                    out,
                    kind="model",
                    format=read_format_name(out),
                    name=f"{method.name}",
                    parents=[model_id],
                    recipe=the_recipe,
                    metrics=metrics,
                )
            return WorkResult(results=[manifest], metrics=metrics)

        return self.ctx.runner.start(
            "quantize", work, labels={**request.labels, "method": method.name}, recipe=the_recipe
        )


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_QuantizerServiceServicer_to_server(QuantizerServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["QuantizerService"].full_name]
