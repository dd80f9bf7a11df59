"""The pipeline's summary (candidates, verdicts, recommendation) and its report artifact (JSON + HTML)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from tailor_gateway import state as st
from tailor_gateway.report import METRICS, render_report_html, render_report_json
from tailor_gateway.spec import CONSTRAINT_METRICS, PipelineSpec
from tailor_gateway.stage_requests import base_model_id
from tailor_runtime.benchmark_report import Environment
from tailor_runtime.store import ArtifactStore

# The candidate metrics the summary keeps are the report's columns (top1_agreement: with the source model,
# the fine-tuned one else the spec's; not for 'original').
SUMMARY_METRICS = tuple(METRICS)


def build_summary(p, spec: PipelineSpec, stages: dict) -> dict[str, Any]:
    select = stages["select"].metrics
    verdicts = {v["candidate_id"]: v for v in select.get("verdicts", [])}
    candidates = []
    environment: dict[str, Any] = {}
    for stage in stages.values():
        if stage.kind == "benchmark" and stage.params.get("candidate") == "base":
            continue  # the model before fine-tuning: summary["base_model"], below
        if stage.kind == "quantize" and stage.state == st.REJECTED:
            candidates.append(gate_rejected_candidate(stage))
            continue
        if stage.kind == "benchmark" and stage.state == st.REJECTED:
            candidates.append(measurement_rejected_candidate(stage, stages))
            continue
        if stage.kind != "benchmark" or stage.state != st.SUCCEEDED:
            continue
        name = stage.params["candidate"]
        verdict = verdicts.get(name, {})
        if name == "original":
            method = "lora-merged" if "finetune" in stages else "original"
            model_id = (
                stages["finetune"].results[0]["id"] if "finetune" in stages else base_model_id(spec, stages)
            )
        else:
            quantize = stages[f"quantize/{name}"]
            method, model_id = quantize.params["method"], quantize.results[0]["id"]
        # The selector's copy of the metrics includes what it derived (perplexity_increase_pct).
        measured = {**stage.metrics, **verdict.get("metrics", {})}
        metrics = {k: measured[k] for k in SUMMARY_METRICS if k in measured}
        if not environment and stage.metrics.get("environment"):
            # The machine every benchmark ran on: the first benchmark's, read through its schema.
            env = Environment.parse(stage.metrics["environment"], f"stage {stage.kind}/{name}'s environment")
            environment = env.model_dump(exclude_unset=True)
        candidates.append(
            {
                "name": name,
                "method": method,
                "artifact_id": model_id,
                "report_id": stage.results[0]["id"] if stage.results else "",
                "metrics": metrics,
                # What peak_memory_mb measured: "cuda" the GPU allocator's peak, "cpu" the process's RSS.
                "device": stage.metrics.get("device", ""),
                "feasible": bool(verdict.get("feasible", False)),
                "pareto_optimal": bool(verdict.get("pareto_optimal", False)),
                "violations": verdict.get("violations", []),
            }
        )
    constraints = [
        {"metric": CONSTRAINT_METRICS[k][0], "comparison": CONSTRAINT_METRICS[k][1], "value": v}
        for k, v in spec.select.constraints.model_dump().items()
        if v is not None
    ]
    summary: dict[str, Any] = {
        "pipeline": {
            "id": p.id,
            "name": p.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.created)),
        },
        "baseline": "original",
        "constraints": constraints,
        "objectives": [o.model_dump() for o in spec.select.objectives],
        "candidates": candidates,
        "recommended": select.get("recommended_id", ""),
        "rationale": select.get("rationale", ""),
        "environment": environment,
    }
    if "finetune" in stages:
        ft = stages["finetune"]
        summary["finetune"] = {
            "model_id": ft.results[0]["id"],
            "adapter_id": ft.results[1]["id"] if len(ft.results) > 1 else "",
            **{
                k: v
                for k, v in ft.metrics.items()
                if k in ("final_loss", "steps", "tokens_per_s", "trainable_params")
            },
            # The report's loss plot: at most LOSS_POINTS points of the curve, and the held-out evaluations.
            "loss_curve": thin_curve(ft.metrics.get("loss_curve") or []),
            "eval_losses": list(ft.metrics.get("eval_losses") or []),
        }
    base = base_model_row(spec, stages, candidates)
    if base is not None:
        summary["base_model"] = base
    if "export" in stages and stages["export"].state == st.SKIPPED:
        ex = stages["export"]
        summary["export"] = {"format": ex.params.get("format") or "", "skipped": ex.error_message}
    if "export" in stages and stages["export"].results:
        ex = stages["export"]
        summary["export"] = {
            "format": ex.metrics.get("export_format") or ex.params.get("format") or "",
            "artifact_id": ex.results[0]["id"],
            **{k: v for k, v in ex.metrics.items() if isinstance(v, int | float | str)},
        }
    return summary


LOSS_POINTS = 400


def thin_curve(losses: list) -> list[list[float]]:
    """[[step, loss], ...] of a training curve, evenly thinned to at most LOSS_POINTS points (the last step
    always kept), so a long run's summary stays small."""
    points = [[i + 1, float(v)] for i, v in enumerate(losses) if isinstance(v, int | float)]
    if len(points) <= LOSS_POINTS:
        return points
    stride = len(points) / LOSS_POINTS
    kept = [points[int(k * stride)] for k in range(LOSS_POINTS - 1)]
    return [*kept, points[-1]]


def base_model_row(spec: PipelineSpec, stages: dict, candidates: list[dict]) -> dict[str, Any] | None:
    """The base model's measurements beside the fine-tuned one ('original'): a reference row, not a
    candidate. Its perplexity change is against the fine-tuned model, as every row's is."""
    stage = stages.get("benchmark/base")
    if stage is None or stage.state != st.SUCCEEDED:
        return None
    metrics = {k: stage.metrics[k] for k in SUMMARY_METRICS if k in stage.metrics}
    original = next((c for c in candidates if c["name"] == "original"), None)
    tuned_ppl = (original or {}).get("metrics", {}).get("perplexity")
    if tuned_ppl and "perplexity" in metrics:
        metrics["perplexity_increase_pct"] = (metrics["perplexity"] / tuned_ppl - 1.0) * 100.0
    metrics.pop("top1_agreement", None)
    return {
        "name": "base",
        "method": "not fine-tuned",
        "artifact_id": base_model_id(spec, stages),
        "report_id": stage.results[0]["id"] if stage.results else "",
        "metrics": metrics,
        "device": stage.metrics.get("device", ""),
    }


def gate_rejected_candidate(stage) -> dict[str, Any]:
    """A candidate the quantizer's accuracy gate refused: never published, never benchmarked; reported
    with the gate's own measurements against its parent."""
    m = stage.metrics
    limit = m.get("gate_max_perplexity_increase_pct")
    actual = m.get("perplexity_increase_pct")
    violations = []
    if isinstance(limit, int | float) and isinstance(actual, int | float) and actual > limit:
        violations.append(
            {"metric": "perplexity_increase_pct", "limit": limit, "actual": actual, "excess": actual - limit}
        )
    return {
        "name": stage.params["candidate"],
        "method": stage.params["method"],
        "artifact_id": "",
        "report_id": "",
        "metrics": {
            k: m[k]
            for k in ("perplexity", "perplexity_increase_pct", "top1_agreement", "kl_divergence")
            if k in m
        },
        # The gate's increase is against its own measurement of the parent, on these tokens and windows.
        "gate": {
            "parent_perplexity": m.get("parent_perplexity"),
            "tokens_scored": m.get("gate_tokens_scored"),
            "context_length": m.get("gate_context_length"),
            "stride": m.get("gate_stride"),
        },
        "feasible": False,
        "pareto_optimal": False,
        "violations": violations,
        "rejected_by": "accuracy gate",
        "rejection": stage.error_message,
    }


def measurement_rejected_candidate(stage, stages: dict) -> dict[str, Any]:
    """A candidate whose benchmark measured NaN or Inf (broken weights): left out of the selection, shown
    with its finite numbers and the reason."""
    name = stage.params["candidate"]
    quantize = stages.get(f"quantize/{name}")
    return {
        "name": name,
        "method": quantize.params["method"] if quantize is not None else "original",
        "artifact_id": quantize.results[0]["id"] if quantize is not None and quantize.results else "",
        "report_id": "",
        "metrics": {k: stage.metrics[k] for k in SUMMARY_METRICS if k in stage.metrics},
        "feasible": False,
        "pareto_optimal": False,
        "violations": [],
        "rejected_by": "benchmark",
        "rejection": stage.error_message,
    }


def publish_report(store: ArtifactStore, p, spec: PipelineSpec, stages: dict) -> tuple[dict, dict]:
    summary = build_summary(p, spec, stages)
    with tempfile.TemporaryDirectory(prefix="tailor-report-") as tmp:
        folder = Path(tmp)
        (folder / "report.json").write_text(render_report_json(summary))
        (folder / "report.html").write_text(render_report_html(summary))
        parents = [c["report_id"] for c in summary["candidates"] if c["report_id"]]
        manifest = store.publish_directory(
            folder,
            kind="report",
            format="tailor-report",
            name=f"{p.name}-report",
            parents=parents,
            recipe={"stage": "report", "pipeline_id": p.id},
        )
    return summary, {
        "id": manifest.id,
        "kind": "report",
        "uri": store.uri_for(manifest.id),
        "sha256": manifest.id,
    }
