"""TrainerService: proto in, LoRA fine-tuning run as an operation, proto out. No ML here."""

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

METHODS = ("lora",)
LIBRARIES = ("torch", "transformers", "peft")


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def ListMethods(self, request, context):
        from tailor_trainer.lora import LoraTrainConfig

        info = common.MethodInfo(
            name="lora",
            description="LoRA adapters on every linear projection (peft); merged model on output",
            available=True,
            devices=["cpu", "cuda"],
            output_format="hf-safetensors",
            libraries=list(LIBRARIES),
            parameters=config_parameters(LoraTrainConfig),
        )
        return pb.ListMethodsResponse(methods=[info], hardware=hardware_profile())

    async def FineTune(self, request: pb.FineTuneRequest, context):
        from tailor_trainer.lora import LoraTrainConfig, finetune_lora

        if request.method not in METHODS:
            raise InvalidArgument(f"unknown fine-tuning method {request.method!r}", choices=METHODS)
        cfg = config_from_struct(LoraTrainConfig, request.config, "lora")
        if "seed" in LoraTrainConfig.model_fields:
            cfg = cfg.model_copy(update={"seed": int(request.seed)})
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        require_artifact(store, request.base_model, "base_model", ("model",))
        data_manifest = require_artifact(store, request.dataset, "dataset", ("dataset",))
        text_path = dataset_file(data_manifest)
        inputs = [request.base_model.id, request.dataset.id]
        the_recipe = recipe("finetune", "lora", cfg, inputs, request.seed, LIBRARIES)

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "base model and dataset")
            model_dir = store.materialize(request.base_model.id, cache_dir)
            data_dir = store.materialize(request.dataset.id, cache_dir)
            with workspace(cache_dir) as out:
                merged, adapter = out / "merged", out / "adapter"
                metrics = finetune_lora(model_dir, data_dir / text_path, merged, adapter, cfg, progress)
                progress(99.0, "publishing", "")
                # Timings differ run to run: they go to the operation, not into the content-addressed manifest.
                stable = {
                    k: v for k, v in metrics.items() if k in ("final_loss", "steps", "trainable_params")
                }
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

        return self.ctx.runner.start("finetune", work, labels={**request.labels, "method": "lora"})


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["TrainerService"].full_name]
