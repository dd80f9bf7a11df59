"""TrainerService: proto in, fine-tuning (LoRA, or QAT) run as an operation, proto out. No ML here."""

from __future__ import annotations

from tailor.common.v1 import common_pb2 as common
from tailor.trainer.v1 import trainer_service_pb2 as pb
from tailor.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.hardware import hardware_profile
from tailor_runtime.operations import WorkResult
from tailor_runtime.server import ServiceContext
from tailor_runtime.stage import (
    config_from_struct,
    config_parameters,
    dataset_file,
    recipe,
    require_artifact,
    workspace,
)

METHODS = ("lora", "qat")
LIBRARIES = {"lora": ("torch", "transformers", "peft"), "qat": ("torch", "transformers", "torchao")}


def _config_class(method: str):
    from tailor_trainer.lora import LoraTrainConfig
    from tailor_trainer.qat import QatTrainConfig

    return {"lora": LoraTrainConfig, "qat": QatTrainConfig}[method]


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def ListMethods(self, request, context):
        from tailor_trainer.qat import _availability as qat_availability

        qat_ok, qat_why = qat_availability()
        infos = [
            common.MethodInfo(
                name="lora",
                description="LoRA adapters on every linear projection (peft); merged model on output",
                available=True,
                devices=["cpu", "cuda"],
                output_format="hf-safetensors",
                libraries=list(LIBRARIES["lora"]),
                parameters=config_parameters(_config_class("lora")),
            ),
            common.MethodInfo(
                name="qat",
                description="Quantization-aware full fine-tuning (torchao fake int4/int8 weights, optional int8 "
                "activations); quantize the result with rtn or gptq at the same bits and group size",
                available=qat_ok,
                unavailable_reason=qat_why,
                bits=[4, 8],
                devices=["cpu", "cuda"],
                output_format="hf-safetensors",
                libraries=list(LIBRARIES["qat"]),
                parameters=config_parameters(_config_class("qat")),
            ),
        ]
        return pb.ListMethodsResponse(methods=infos, hardware=hardware_profile())

    async def FineTune(self, request: pb.FineTuneRequest, context):
        if request.method not in METHODS:
            raise InvalidArgument(f"unknown fine-tuning method {request.method!r}", choices=METHODS)
        method = request.method
        cfg = config_from_struct(_config_class(method), request.config, method)
        cfg = cfg.model_copy(update={"seed": int(request.seed)})
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        require_artifact(store, request.base_model, "base_model", ("model",))
        data_manifest = require_artifact(store, request.dataset, "dataset", ("dataset",))
        text_path = dataset_file(data_manifest)
        inputs = [request.base_model.id, request.dataset.id]
        the_recipe = recipe("finetune", method, cfg, inputs, request.seed, LIBRARIES[method])

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "base model and dataset")
            model_dir = store.materialize(request.base_model.id, cache_dir)
            data_dir = store.materialize(request.dataset.id, cache_dir)
            with workspace(cache_dir) as out:
                if method == "qat":
                    return self._qat(model_dir, data_dir / text_path, out, cfg, inputs, the_recipe, progress)
                from tailor_trainer.lora import finetune_lora

                merged, adapter = out / "merged", out / "adapter"
                metrics = finetune_lora(model_dir, data_dir / text_path, merged, adapter, cfg, progress)
                progress(99.0, "publishing", "")
                stable = _stable(metrics)
                merged_manifest = store.publish_directory(
                    merged,
                    kind="model",
                    format="hf-safetensors",
                    name="lora-merged",
                    parents=inputs,
                    recipe=the_recipe,
                    metrics=stable,
                )
                adapter_manifest = store.publish_directory(
                    adapter,
                    kind="adapter",
                    format="peft-lora",
                    name="lora-adapter",
                    parents=inputs,
                    recipe=the_recipe,
                    metrics={**stable, "loss_curve": metrics.get("loss_curve", [])},
                )
            return WorkResult(results=[merged_manifest, adapter_manifest], metrics=metrics)

        return self.ctx.runner.start("finetune", work, labels={**request.labels, "method": method})

    def _qat(self, model_dir, text, out, cfg, inputs, the_recipe, progress) -> WorkResult:
        from tailor_trainer.qat import finetune_qat

        metrics = finetune_qat(model_dir, text, out / "model", cfg, progress)
        progress(99.0, "publishing", "")
        manifest = self.ctx.store.publish_directory(
            out / "model",
            kind="model",
            format="hf-safetensors",
            name="qat",
            parents=inputs,
            recipe=the_recipe,
            metrics={**_stable(metrics), "qat": metrics["qat"]},
        )
        return WorkResult(results=[manifest], metrics=metrics)


def _stable(metrics: dict) -> dict:
    """Timings differ run to run: they go to the operation, not into the content-addressed manifest."""
    return {k: v for k, v in metrics.items() if k in ("final_loss", "steps", "trainable_params")}


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["TrainerService"].full_name]
