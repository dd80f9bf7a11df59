"""TrainerService: proto in, fine-tuning (LoRA, DoRA, QLoRA, QAT) run as an operation, proto out.

Runs survive their worker: checkpoints go to the artifact store every `checkpoint_every` steps, when the
operation is cancelled and when the worker starts shutting down; the same request dispatched again (on
a restarted worker or another one) finds the latest checkpoint of its recipe and continues from it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from tailor.common.v1 import common_pb2 as common
from tailor.trainer.v1 import trainer_service_pb2 as pb
from tailor.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.hardware import hardware_profile
from tailor_runtime.ml.architectures import supported_families
from tailor_runtime.operations import WorkResult
from tailor_runtime.server import CachedListing, ServiceContext
from tailor_runtime.stage import (
    config_parameters,
    config_schema_json,
    dataset_file,
    recipe,
    require_architecture,
    require_artifact,
    validate_config,
    workspace,
)
from tailor_runtime.store.manifest import recipe_key

PEFT = ("torch", "transformers", "peft")
# name -> (description, libraries, preset applied over the user's config)
METHODS = {
    "lora": ("LoRA adapters on every linear projection (peft); merged model on request", PEFT, {}),
    "dora": ("DoRA: weight-decomposed LoRA (peft use_dora)", PEFT, {"dora": True}),
    "qlora": (
        "QLoRA: LoRA over a 4-bit NF4 base with double quantization (bitsandbytes); merged into the float base",
        (*PEFT, "bitsandbytes"),
        {"quantize_base": "nf4"},
    ),
    "qat": (
        "Quantization-aware full fine-tuning (torchao fake int4/int8 weights, optional int8 activations); "
        "quantize the result with rtn or gptq at the same bits and group size",
        ("torch", "transformers", "torchao"),
        {},
    ),
}
DATA_SUFFIXES = (".txt", ".text", ".json", ".jsonl")


def config_class(method: str):
    """The pydantic config a fine-tuning method takes (what ListMethods publishes and FineTune validates)."""
    from tailor_trainer.lora import LoraTrainConfig
    from tailor_trainer.qat import QatTrainConfig

    return QatTrainConfig if method == "qat" else LoraTrainConfig


def _availability(method: str) -> tuple[bool, str]:
    if method == "qat":
        from tailor_trainer.qat import _availability as qat_availability

        return qat_availability()
    if method == "qlora":
        from tailor_runtime.ml.formats.bnb import availability

        return availability()
    return True, ""


class StoreCheckpointer:
    """Checkpoints of one run (identified by its recipe) in the artifact store."""

    def __init__(self, store, cache_dir: Path, the_recipe: dict, every: int, parents: list[str], draining):
        self.store, self.cache_dir, self.every, self.parents = store, cache_dir, every, parents
        self.the_recipe = the_recipe
        self.pointer = {"checkpoint_of": recipe_key(the_recipe)}
        self._draining, self._saved_for_drain = draining, False
        self.saved_steps: list[int] = []

    def draining(self) -> bool:
        # One checkpoint when shutdown starts; training goes on until the grace period runs out.
        if self._draining() and not self._saved_for_drain:
            self._saved_for_drain = True
            return True
        return False

    def restore(self, model, optimizer, scheduler):
        from tailor_trainer import checkpoint

        manifest = self.store.lookup_recipe(self.pointer)
        if manifest is None:
            return None
        folder = self.store.materialize(manifest.id, self.cache_dir)
        return checkpoint.load(folder, model, optimizer, scheduler)

    def save(self, step, model, optimizer, scheduler, losses, evaluations=None) -> None:
        from tailor_trainer import checkpoint

        with tempfile.TemporaryDirectory(prefix="tailor-ckpt-", dir=self.cache_dir.parent) as tmp:
            checkpoint.save(Path(tmp), model, optimizer, scheduler, step, losses, evaluations)
            manifest = self.store.publish_directory(
                Path(tmp),
                kind="checkpoint",
                format=checkpoint.FORMAT,
                name=f"checkpoint-step{step}",
                parents=self.parents,
                metrics={"step": step, "loss": losses[-1]},
            )
        self.store.remember_recipe(self.pointer, manifest.id)
        self.saved_steps.append(step)

    def latest_folder(self) -> Path | None:
        """A local copy of this run's latest checkpoint (None: there is none yet)."""
        manifest = self.store.lookup_recipe(self.pointer)
        return None if manifest is None else self.store.materialize(manifest.id, self.cache_dir)


@dataclass
class RankCheckpointer:
    """The checkpointer of one data-parallel rank, made of parts that survive pickling into a spawned
    rank process (a store object and the runner's draining callable do not).

    Every rank restores from `folder`, the run's latest checkpoint, fetched once by the parent before the
    ranks start (so N ranks neither race on the cache nor ask the store N times). Only rank 0 saves
    (loop.train calls save/draining on rank 0 alone): it opens the store from its URL in its own process
    on the first save, and learns that the worker is draining through `drain`, a multiprocessing Event
    the parent sets from the runner's flag while it forwards rank 0's progress."""

    folder: Path | None
    every: int
    store_url: str
    store_options: dict[str, Any]
    cache_dir: Path
    the_recipe: dict
    parents: list[str]
    drain: Any  # multiprocessing.Event (spawn context)
    writer: bool = True
    _writer: Any = None

    def for_rank(self, rank: int) -> RankCheckpointer:
        return self if rank == 0 else RankCheckpointer(**{**self.__dict__, "writer": False, "_writer": None})

    def _checkpointer(self) -> StoreCheckpointer:
        if not self.writer:
            raise RuntimeError("only rank 0 saves checkpoints")
        if self._writer is None:
            from tailor_runtime.store import open_store

            self._writer = StoreCheckpointer(
                open_store(self.store_url, **self.store_options),
                self.cache_dir,
                self.the_recipe,
                self.every,
                self.parents,
                self.drain.is_set,
            )
        return self._writer

    @property
    def saved_steps(self) -> list[int]:
        return self._writer.saved_steps if self._writer is not None else []

    def restore(self, model, optimizer, scheduler):
        from tailor_trainer import checkpoint

        return None if self.folder is None else checkpoint.load(self.folder, model, optimizer, scheduler)

    def draining(self) -> bool:
        return self.writer and self._checkpointer().draining()  # a reader never saves

    def save(self, step, model, optimizer, scheduler, losses, evaluations=None) -> None:
        self._checkpointer().save(step, model, optimizer, scheduler, losses, evaluations)


def lora_rank_with_store(parallel, checkpointer: RankCheckpointer, *args, progress):
    """What each rank of a data-parallel FineTune runs (module level: the spawned ranks import it)."""
    from tailor_trainer.lora import lora_rank

    mine = checkpointer.for_rank(parallel.rank)
    metrics = lora_rank(parallel, *args, mine, progress=progress)
    if parallel.is_main:
        metrics["checkpoints_saved"] = mine.saved_steps
    return metrics


def method_infos() -> list[common.MethodInfo]:
    """What ListMethods publishes: availability imports the methods' libraries (peft, bitsandbytes)."""
    infos = []
    for name, (description, libraries, _preset) in METHODS.items():
        ok, why = _availability(name)
        infos.append(
            common.MethodInfo(
                name=name,
                description=description,
                available=ok,
                unavailable_reason=why,
                devices=["cpu", "cuda"],
                output_format="hf-safetensors",
                libraries=list(libraries),
                parameters=config_parameters(config_class(name)),
                config_schema_json=config_schema_json(config_class(name)),
                architectures=supported_families(f"finetune/{name}"),
            )
        )
    return infos


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self._methods = CachedListing(ctx, "method listing", method_infos)

    async def ListMethods(self, request, context):
        return pb.ListMethodsResponse(methods=await self._methods.get(), hardware=hardware_profile())

    async def FineTune(self, request: pb.FineTuneRequest, context):
        if request.method not in METHODS:
            raise InvalidArgument(f"unknown fine-tuning method {request.method!r}", choices=METHODS)
        method = request.method
        _description, libraries, preset = METHODS[method]
        raw = json_format.MessageToDict(request.config)
        if method == "qat" and "data_parallel" in raw:
            if raw["data_parallel"] != 1:
                raise InvalidArgument(
                    "data_parallel > 1 is LoRA-family only for now (lora, dora, qlora); qat trains in "
                    "one process: leave data_parallel out or set it to 1"
                )
            del raw["data_parallel"]
        cfg = validate_config(config_class(method), raw, method)
        cfg = cfg.model_copy(update={"seed": int(request.seed), **preset})
        world_size = getattr(cfg, "data_parallel", 1)
        if world_size > 1:
            _check_gpus(world_size)
        ok, why = _availability(method)
        if not ok:
            from tailor_runtime.errors import FailedPrecondition

            raise FailedPrecondition(f"method {method!r} cannot run on this worker: {why}")
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        require_artifact(store, request.base_model, "base_model", ("model",))
        require_architecture(store, request.base_model.id, f"finetune/{method}")
        data_manifest = require_artifact(store, request.dataset, "dataset", ("dataset",))
        data_path = dataset_file(data_manifest, DATA_SUFFIXES)
        inputs = [request.base_model.id, request.dataset.id]
        # One process leaves the recipe (and so its checkpoints' key) as it was before data_parallel
        # existed; N ranks sum in another order, so their run is a recipe of its own.
        recipe_cfg = cfg.model_dump(mode="json", exclude={"data_parallel"} if world_size == 1 else None)
        the_recipe = recipe("finetune", method, recipe_cfg, inputs, request.seed, libraries)
        runner = self.ctx.runner

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "base model and dataset")
            model_dir = store.materialize(request.base_model.id, cache_dir)
            data_dir = store.materialize(request.dataset.id, cache_dir)
            checkpointer = StoreCheckpointer(
                store, cache_dir, the_recipe, cfg.checkpoint_every, inputs, runner.draining.is_set
            )
            with workspace(cache_dir) as out:
                if method == "qat":
                    return self._qat(
                        model_dir, data_dir / data_path, out, cfg, inputs, the_recipe, progress, checkpointer
                    )
                from tailor_trainer.lora import finetune_lora

                merged, adapter = out / "merged", out / "adapter"
                if world_size > 1:
                    metrics = self._data_parallel(
                        world_size,
                        checkpointer,
                        (model_dir, data_dir / data_path, merged, adapter, cfg),
                        progress,
                    )
                else:
                    metrics = finetune_lora(
                        model_dir, data_dir / data_path, merged, adapter, cfg, progress, checkpointer
                    )
                    metrics["checkpoints_saved"] = checkpointer.saved_steps
                progress(99.0, "publishing", "")
                stable = _stable(metrics)
                results = []
                if cfg.merge:
                    results.append(
                        store.publish_directory(
                            merged,
                            kind="model",
                            format="hf-safetensors",
                            name=f"{method}-merged",
                            parents=inputs,
                            recipe=the_recipe,
                            metrics=stable,
                        )
                    )
                results.append(
                    store.publish_directory(
                        adapter,
                        kind="adapter",
                        format="peft-lora",
                        name=f"{method}-adapter",
                        parents=inputs,
                        recipe=the_recipe,
                        metrics={**stable, "loss_curve": metrics.get("loss_curve", [])},
                    )
                )
            return WorkResult(results=results, metrics=metrics)

        return runner.start("finetune", work, labels={**request.labels, "method": method})

    def _data_parallel(self, world_size: int, checkpointer: StoreCheckpointer, args: tuple, progress) -> dict:
        """Run `lora_rank` in `world_size` rank processes (parallel.launch); rank 0 writes the outputs
        into this process's workspace folders and returns the metrics."""
        import multiprocessing

        from tailor_trainer.parallel import launch

        settings = self.ctx.settings
        drain = multiprocessing.get_context("spawn").Event()
        ranks_checkpointer = RankCheckpointer(
            folder=checkpointer.latest_folder(),
            every=checkpointer.every,
            store_url=settings.store_url,
            store_options=settings.store_options(),
            cache_dir=checkpointer.cache_dir,
            the_recipe=checkpointer.the_recipe,
            parents=checkpointer.parents,
            drain=drain,
        )
        runner = self.ctx.runner

        def forward(percent: float, phase: str = "", message: str = "", **metrics: float) -> None:
            if runner.draining.is_set():
                drain.set()
            progress(percent, phase, message, **metrics)

        return launch(world_size, lora_rank_with_store, (ranks_checkpointer, *args), forward)

    def _qat(self, model_dir, text, out, cfg, inputs, the_recipe, progress, checkpointer) -> WorkResult:
        from tailor_trainer.qat import finetune_qat

        metrics = finetune_qat(model_dir, text, out / "model", cfg, progress, checkpointer)
        metrics["checkpoints_saved"] = checkpointer.saved_steps
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


def _check_gpus(world_size: int) -> None:
    """On a GPU worker each rank needs a GPU of its own (on CPU the ranks are gloo processes)."""
    import torch

    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise InvalidArgument(
            f"data_parallel {world_size} needs {world_size} GPUs; this worker has "
            f"{torch.cuda.device_count()} (torch.cuda.device_count()): set data_parallel to at most that, "
            "or give the trainer pool more (gpu.count)"
        )


# Deterministic for a recipe (same seed, same data): these go into the content-addressed manifest. With
# eval_every, the eval losses, the step whose weights were published and whether the run stopped early
# say which model the artifact is.
STABLE_METRICS = (
    "final_loss",
    "eval_loss",
    "steps",
    "trainable_params",
    "eval_losses",
    "best_step",
    "stopped_early",
)


def _stable(metrics: dict) -> dict:
    """Timings differ run to run: they go to the operation, not into the content-addressed manifest."""
    return {k: v for k, v in metrics.items() if k in STABLE_METRICS}


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["TrainerService"].full_name]
