"""QuantizerService: proto in, a registered method run as an operation behind the accuracy gate, proto out.

The operation: fetch the model (and calibration / evaluation text), run the method into a scratch
folder, measure the result against its parent (gate.py), and only then publish. A refusal by the gate,
a bad calibration set or running out of memory (reported by the operation runner) fails the operation
with the reason; nothing is published and the worker keeps serving.
"""

from __future__ import annotations

from pathlib import Path

from tailor.common.v1 import common_pb2 as common
from tailor.quantizer.v1 import quantizer_service_pb2 as pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as pb_grpc
from tailor_quantizer.gate import GateSettings, enforce, measure
from tailor_quantizer.methods import get_method, list_methods
from tailor_quantizer.methods.registry import QuantizeJob
from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.hardware import hardware_profile
from tailor_runtime.ml.architectures import supported_families
from tailor_runtime.ml.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from tailor_runtime.operations import WorkResult
from tailor_runtime.server import CachedListing, ServiceContext
from tailor_runtime.stage import (
    config_from_struct,
    config_parameters,
    config_schema_json,
    dataset_file,
    read_format_name,
    recipe,
    require_architecture,
    require_artifact,
    workspace,
)

MODEL_KINDS = ("model",)
DATA_KINDS = ("dataset",)
CALIBRATION_SUFFIXES = (".txt", ".text", ".jsonl", ".json")
# Held-out text the gate reads when it borrows from the calibration file: about 6 characters a token.
CHARS_PER_TOKEN = 6


def method_info(method) -> common.MethodInfo:
    ok, reason = method.availability()
    caps = method.caps
    return common.MethodInfo(
        name=method.name,
        description=caps.description,
        available=ok,
        unavailable_reason="" if ok else reason,
        bits=list(caps.bits),
        needs_calibration=caps.needs_calibration,
        devices=list(caps.devices),
        output_format=caps.output_format,
        libraries=list(caps.libraries),
        parameters=config_parameters(method.Config),
        config_schema_json=config_schema_json(method.Config),
        deterministic=caps.deterministic,
        min_compute_capability=caps.min_compute_capability,
        architectures=supported_families(f"quantize/{method.name}"),
    )


def worker_device(method) -> str:
    """CUDA when the method can use it and this worker has a GPU; else CPU."""
    if "cuda" not in method.caps.devices:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class QuantizerServicer(pb_grpc.QuantizerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self._methods = CachedListing(ctx, "method listing", lambda: [method_info(m) for m in list_methods()])

    async def ListMethods(self, request, context):
        return pb.ListMethodsResponse(methods=await self._methods.get(), hardware=hardware_profile())

    async def Quantize(self, request: pb.QuantizeRequest, context):
        method = get_method(request.method)
        cfg = config_from_struct(method.Config, request.config, f"quantization method {method.name!r}")
        ok, reason = method.availability()
        if not ok:
            raise FailedPrecondition(f"method {method.name!r} cannot run on this worker: {reason}")
        gate = GateSettings.from_proto(request.gate)
        samples = request.calibration.samples or DEFAULT_SAMPLES
        seq_len = request.calibration.seq_len or DEFAULT_SEQ_LEN
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        require_artifact(store, request.model, "model", MODEL_KINDS)
        calibration_path = eval_path = ""
        if request.calibration_data.id:
            calibration_manifest = require_artifact(
                store, request.calibration_data, "calibration_data", DATA_KINDS
            )
            calibration_path = dataset_file(calibration_manifest, CALIBRATION_SUFFIXES)
        elif method.caps.needs_calibration:
            raise InvalidArgument(
                f"method {method.name!r} needs calibration_data: a text or JSONL dataset artifact "
                f"(calibration.samples sequences of calibration.seq_len tokens; defaults {DEFAULT_SAMPLES} x "
                f"{DEFAULT_SEQ_LEN})"
            )
        if request.eval_data.id:
            eval_path = dataset_file(require_artifact(store, request.eval_data, "eval_data", DATA_KINDS))
        elif not gate.disabled and not calibration_path:
            raise InvalidArgument(
                "the accuracy gate needs held-out text: pass eval_data (a text dataset artifact) or "
                "calibration_data (part of it is held out), or set gate.disabled"
            )
        model_id = request.model.id
        require_architecture(store, model_id, f"quantize/{method.name}")
        inputs = [model_id, request.calibration_data.id, request.eval_data.id]
        the_recipe = recipe(
            "quantize", method.name, cfg, [i for i in inputs if i], request.seed, method.caps.libraries
        )
        the_recipe["calibration"] = (
            {"samples": samples, "seq_len": seq_len}
            if calibration_path and method.caps.needs_calibration
            else None
        )
        the_recipe["gate"] = gate.as_recipe()
        device = worker_device(method)
        # Lineage: the model, and the calibration text when the method learned from it (the gate's text
        # only measured the result; it is in the recipe, which keys the cache).
        parents = [model_id] + ([request.calibration_data.id] if the_recipe["calibration"] else [])

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "model from the store")
            model_dir = store.materialize(model_id, cache_dir)
            eval_text, calibration = self._inputs(
                model_dir, method, request, calibration_path, eval_path, samples, seq_len, gate
            )
            job = QuantizeJob(progress=progress, seed=request.seed, calibration=calibration, device=device)
            with workspace(cache_dir) as out:
                # Out of memory is the runner's to report (RESOURCE_EXHAUSTED, GPU cache emptied).
                metrics = method.run(model_dir, out, cfg, job)
                if not gate.disabled:
                    progress(90.0, "gate", "measuring against the parent")
                    measured = measure(
                        model_dir,
                        out,
                        eval_text,
                        gate.eval_tokens,
                        device,
                        context_length=gate.context_length,
                        stride=gate.stride,
                        split_documents=gate.split_documents,
                    )
                    metrics.update(enforce(gate, measured, method.name))
                else:
                    metrics["gate"] = "disabled"
                if calibration is not None:
                    metrics.update(calibration.manifest_stats())
                metrics.update(job.stats)
                metrics["device"] = device
                progress(99.0, "publishing", "")
                manifest = store.publish_directory(
                    out,
                    kind="model",
                    format=read_format_name(out),
                    name=f"{method.name}",
                    parents=parents,
                    recipe=the_recipe,
                    metrics=metrics,
                )
            return WorkResult(results=[manifest], metrics=metrics)

        return await self.ctx.runner.start_async(
            "quantize", work, labels={**request.labels, "method": method.name}, recipe=the_recipe
        )

    def _inputs(self, model_dir, method, request, calibration_path, eval_path, samples, seq_len, gate):
        """(held-out text for the gate, the CalibrationSet or None), both read from the store."""
        from tailor_runtime.ml.calibration import (
            build_calibration_set,
            read_documents,
            split_holdout,
        )
        from tailor_runtime.ml.model_io import load_tokenizer
        from tailor_runtime.store.manifest import sha256_file

        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        eval_text, calibration = "", None
        if eval_path:
            folder = store.materialize(request.eval_data.id, cache_dir)
            eval_text = (Path(folder) / eval_path).read_text(encoding="utf-8")
        if calibration_path:
            folder = store.materialize(request.calibration_data.id, cache_dir)
            path = Path(folder) / calibration_path
            documents = read_documents(path)
            if not eval_text and not gate.disabled:
                documents, held = split_holdout(documents, gate.eval_tokens * CHARS_PER_TOKEN)
                eval_text = "\n\n".join(held)
            if method.caps.needs_calibration:
                tokenizer = load_tokenizer(model_dir)
                limit = _context_of(model_dir)
                # The default length follows a short-context model down; an explicit one is checked.
                length = seq_len if request.calibration.seq_len else min(seq_len, limit)
                calibration = build_calibration_set(
                    tokenizer, documents, samples, length, request.seed, sha256_file(path), max_seq_len=limit
                )
        return eval_text, calibration


def _context_of(model_dir) -> int:
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_QuantizerServiceServicer_to_server(QuantizerServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["QuantizerService"].full_name]
