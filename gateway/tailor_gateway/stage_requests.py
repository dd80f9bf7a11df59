"""What the gateway sends each stage: the request built from the spec and the results so far.

Pure functions of (pipeline, spec, stages): no I/O here; the engine dispatches what they return.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate

from tailor.benchmarker.v1 import benchmarker_service_pb2 as bench_pb
from tailor.benchmarker.v1 import benchmarker_service_pb2_grpc as bench_grpc
from tailor.common.v1 import common_pb2 as common
from tailor.exporter.v1 import exporter_service_pb2 as export_pb
from tailor.exporter.v1 import exporter_service_pb2_grpc as export_grpc
from tailor.quantizer.v1 import quantizer_service_pb2 as quant_pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as quant_grpc
from tailor.selector.v1 import selector_service_pb2 as select_pb
from tailor.trainer.v1 import trainer_service_pb2 as train_pb
from tailor.trainer.v1 import trainer_service_pb2_grpc as train_grpc
from tailor_gateway import state as st
from tailor_gateway.spec import CONSTRAINT_METRICS, PipelineSpec
from tailor_runtime.errors import FailedPrecondition
from tailor_runtime.operations import to_struct

StartCall = Callable[[grpc.aio.Channel], Awaitable[common.Operation]]


def trace_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata (W3C traceparent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def ref(artifact_id: str) -> common.ArtifactRef:
    return common.ArtifactRef(id=artifact_id, sha256=artifact_id)


def ref_dict(d: dict[str, Any]) -> common.ArtifactRef:
    return common.ArtifactRef(
        id=d["id"], kind=d.get("kind", ""), uri=d.get("uri", ""), sha256=d.get("sha256", "")
    )


def ref_to_dict(r: common.ArtifactRef) -> dict[str, str]:
    return {"id": r.id, "kind": r.kind, "uri": r.uri, "sha256": r.sha256}


def base_model_id(spec: PipelineSpec, stages) -> str:
    """The spec's model as an artifact id: its `artifact:`, or what the import stage published (`hub:`)."""
    if spec.model.artifact is not None:
        return spec.model.artifact
    if "import" in stages and stages["import"].results:
        return stages["import"].results[0]["id"]
    raise FailedPrecondition("the model is not imported yet: the import stage has no result")


def source_model(spec: PipelineSpec, stages) -> common.ArtifactRef:
    """The model quantized and benchmarked as 'original': the fine-tuned one if there is a finetune."""
    if "finetune" in stages:
        return ref_dict(stages["finetune"].results[0])
    return ref(base_model_id(spec, stages))


def gate_protocol(spec: PipelineSpec) -> dict[str, Any]:
    """The benchmark's perplexity protocol (tokens, windows, documents) for the accuracy gate, so the
    gate's increase and the report's are measured on the same tokens and agree."""
    from tailor_benchmarker.config import BenchmarkConfig

    cfg = BenchmarkConfig.model_validate(spec.benchmark.config)  # checked at submit already
    return {
        "eval_tokens": cfg.max_eval_tokens,
        "context_length": cfg.context_length,
        "stride": cfg.stride,
        "split_documents": cfg.split_documents,
    }


def start_call(p, spec: PipelineSpec, s, stages, timeout_s: float) -> StartCall:
    """The RPC that starts remote stage `s`, as a function of the channel of the worker chosen for it."""
    labels = {"pipeline_id": p.id, "stage": s.name, "method": s.params.get("method", "")}
    metadata = trace_metadata()
    if s.kind == "finetune":
        request = train_pb.FineTuneRequest(
            base_model=ref(base_model_id(spec, stages)),
            dataset=ref(spec.data.train.artifact),
            method=s.params["method"],
            config=to_struct(s.params["config"]),
            seed=s.params["seed"],
            labels=labels,
        )
        return lambda ch: train_grpc.TrainerServiceStub(ch).FineTune(
            request, metadata=metadata, timeout=timeout_s
        )
    if s.kind == "quantize":
        calibration = s.params.get("calibration") or {}
        gate = s.params.get("gate") or {}
        # The gate's default threshold is the pipeline's own quality constraint, else the quantizer's 5%.
        max_increase = gate.get("max_perplexity_increase_pct")
        if max_increase is None:
            max_increase = spec.select.constraints.max_perplexity_increase_pct
        request = quant_pb.QuantizeRequest(
            model=source_model(spec, stages),
            method=s.params["method"],
            config=to_struct(s.params["config"]),
            seed=s.params["seed"],
            labels=labels,
            eval_data=ref(spec.data.eval.artifact),
            calibration=quant_pb.CalibrationOptions(
                samples=calibration.get("samples") or 0, seq_len=calibration.get("seq_len") or 0
            ),
            gate=quant_pb.AccuracyGate(
                max_perplexity_increase_pct=max_increase,
                min_top1_agreement=gate.get("min_top1_agreement"),
                disabled=bool(gate.get("disabled")),
                **gate_protocol(spec),
            ),
        )
        # Calibration text: the candidate's own, else the training data when the pipeline has some.
        calibration_data = (calibration.get("data") or {}).get("artifact") or (
            spec.data.train.artifact if spec.data.train is not None else None
        )
        if calibration_data:
            request.calibration_data.CopyFrom(ref(calibration_data))
        return lambda ch: quant_grpc.QuantizerServiceStub(ch).Quantize(
            request, metadata=metadata, timeout=timeout_s
        )
    if s.kind == "benchmark":
        candidate = s.params["candidate"]
        reference = None
        if candidate == "base":
            # The model before fine-tuning, measured beside the finetune (whose result need not exist yet).
            measured = ref(base_model_id(spec, stages))
        elif candidate == "original":
            measured = source_model(spec, stages)
        else:
            measured = ref_dict(stages[f"quantize/{candidate}"].results[0])
            # The model it was quantized from: the report then holds top1_agreement and KL with it.
            reference = source_model(spec, stages)
        request = bench_pb.BenchmarkRequest(
            model=measured,
            eval_data=ref(spec.data.eval.artifact),
            config=to_struct(spec.benchmark.config),
            labels=labels,
        )
        if reference is not None:
            request.reference_model.CopyFrom(reference)
        return lambda ch: bench_grpc.BenchmarkerServiceStub(ch).Benchmark(
            request, metadata=metadata, timeout=timeout_s
        )
    if s.kind == "export":
        chosen = stages["select"].metrics.get("recommended_model")
        if not chosen:
            raise FailedPrecondition("nothing to export: no candidate met the constraints")
        request = export_pb.ExportRequest(
            model=ref_dict(chosen),
            format=s.params.get("format") or "",
            target=s.params.get("target") or "",
            config=to_struct(s.params["config"]),
            labels=labels,
            model_name=spec.name,  # Triton's model folder and the Modelfile's name: the pipeline's, not a hash
        )
        return lambda ch: export_grpc.ExporterServiceStub(ch).Export(
            request, metadata=metadata, timeout=timeout_s
        )
    raise AssertionError(f"not a remote stage: {s.kind}")


def select_request(spec: PipelineSpec, stages) -> tuple[select_pb.SelectRequest, dict[str, dict[str, str]]]:
    """Every benchmarked candidate with its metrics, the spec's constraints and objectives; and each
    candidate's model, so the recommendation can be exported."""
    candidates, models = [], {}
    for stage in stages.values():
        if stage.kind != "benchmark" or stage.state != st.SUCCEEDED:  # a rejected candidate's is SKIPPED
            continue
        candidate = stage.params["candidate"]
        if candidate == "base":  # a reference row in the report, never a candidate for selection
            continue
        metrics = {k: float(v) for k, v in stage.metrics.items() if isinstance(v, int | float)}
        candidates.append(
            select_pb.Candidate(
                id=candidate, name=candidate, metrics=metrics, is_baseline=candidate == "original"
            )
        )
        models[candidate] = (
            ref_to_dict(source_model(spec, stages))
            if candidate == "original"
            else stages[f"quantize/{candidate}"].results[0]
        )
    constraints = []
    for key, value in spec.select.constraints.model_dump().items():
        if value is not None:
            metric, comparison = CONSTRAINT_METRICS[key]
            at_most = comparison == "at_most"
            constraints.append(
                common.Constraint(
                    metric=metric,
                    value=value,
                    comparison=common.COMPARISON_AT_MOST if at_most else common.COMPARISON_AT_LEAST,
                )
            )
    objectives = [select_pb.Objective(**o.model_dump()) for o in spec.select.objectives]
    request = select_pb.SelectRequest(candidates=candidates, constraints=constraints, objectives=objectives)
    return request, models
