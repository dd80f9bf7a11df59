"""What a person sees in the terminal: live stage progress and the final candidates table."""

from __future__ import annotations

from google.protobuf import json_format
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tailor.common.v1 import common_pb2 as common
from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor_runtime.benchmark_report import Environment

# Ids are shown as their first 12 characters everywhere (any unique prefix of 8+ works in every command,
# as in git); --json output carries whole ids.
SHORT_ID = 12


def short_id(full: str) -> str:
    return full[:SHORT_ID]


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


STATE_STYLE = {
    "PENDING": "dim",
    "RUNNING": "cyan",
    "SUCCEEDED": "green",
    "FAILED": "bold red",
    "CANCELLED": "yellow",
}


def stage_state(value: int) -> str:
    return common.OperationState.Name(value).removeprefix("OPERATION_STATE_")


def pipeline_state(value: int) -> str:
    return pb.PipelineState.Name(value).removeprefix("PIPELINE_STATE_")


def stages_table(p: pb.Pipeline) -> Table:
    table = Table(title=f"pipeline {p.name} ({short_id(p.id)}): {pipeline_state(p.state)}", expand=False)
    table.add_column("stage", no_wrap=True)
    table.add_column("state")
    table.add_column("progress", width=24)
    table.add_column("%", justify="right")
    table.add_column("detail", overflow="fold", max_width=60)
    for s in p.stages:
        state = stage_state(s.state)
        percent = s.progress.percent if state != "SUCCEEDED" else 100.0
        if s.error.message:
            detail = s.error.message
        elif s.cached:
            detail = "cached: output already in the store"
        elif state == "SUCCEEDED":
            detail = f"done: {s.results[0].kind} {short_id(s.results[0].id)}" if s.results else "done"
        else:
            detail = " ".join(
                x for x in (s.progress.phase, s.progress.message, live_numbers(s.progress)) if x
            )
        table.add_row(
            s.name,
            Text(state.lower(), style=STATE_STYLE.get(state, "")),
            ProgressBar(total=100, completed=percent, width=24),
            f"{percent:.0f}",
            detail,
        )
    return table


def live_numbers(progress) -> str:
    """A running stage's own measurements (the trainer's loss, learning rate, tokens/s and time left)."""
    if not progress.metrics.fields:
        return ""
    m = json_format.MessageToDict(progress.metrics)
    parts = []
    if isinstance(m.get("loss"), int | float):
        parts.append(f"loss {m['loss']:.4f}")
    if isinstance(m.get("eval_loss"), int | float):
        parts.append(f"eval {m['eval_loss']:.4f}")
    if isinstance(m.get("learning_rate"), int | float):
        parts.append(f"lr {m['learning_rate']:.2e}")
    if isinstance(m.get("tokens_per_s"), int | float):
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if isinstance(m.get("eta_s"), int | float) and m["eta_s"] > 0:
        minutes, seconds = divmod(int(m["eta_s"]), 60)
        parts.append(f"ETA {minutes}:{seconds:02d}")
    return ", ".join(parts)


def _num(metrics: dict, key: str, fmt: str) -> str:
    value = metrics.get(key)
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _memory_header(candidates: list[dict]) -> str:
    """Named by what was measured: the GPU allocator's peak on a GPU, the process's RSS on a CPU (the
    catalogue's memory_label, shortened for a terminal column)."""
    devices = {c.get("device") for c in candidates if c.get("device")}
    only = devices.pop() if len(devices) == 1 else None
    return {"cuda": "peak GPU MB", "cpu": "peak RSS MB"}.get(only, "peak mem MB")


def candidates_table(summary: dict) -> Table:
    table = Table(title="candidates")
    candidates = summary.get("candidates", [])
    for name, justify in (
        ("candidate", "left"),
        ("method", "left"),
        ("size MB", "right"),
        ("perplexity", "right"),
        ("vs baseline", "right"),
        ("ms/token (median)", "right"),  # the catalogue's aggregation (tailor_runtime.metrics_catalogue)
        (_memory_header(candidates), "right"),
        ("pareto", "center"),
        ("constraints", "left"),
    ):
        # Numbers never wrap; only the verdict column folds when the terminal is narrow.
        table.add_column(name, justify=justify, no_wrap=name != "constraints")
    recommended = summary.get("recommended")
    for c in candidates:
        m = c.get("metrics", {})
        delta = m.get("perplexity_increase_pct")
        verdict = (
            Text("pass", style="green")
            if c.get("feasible")
            else Text(
                ("rejected by the " + c["rejected_by"] + ", " if c.get("rejected_by") else "")
                + "fail: "
                + "; ".join(
                    f"{v['metric']} {v['actual']:.3g} > {v['limit']:.3g}" for v in c.get("violations", [])
                ),
                style="red",
            )
        )
        name = Text(
            ("* " if c["name"] == recommended else "  ") + c["name"],
            style="bold green" if c["name"] == recommended else "",
        )
        table.add_row(
            name,
            c.get("method", ""),
            _num(m, "size_mb", ".3f"),
            _num(m, "perplexity", ".4f"),
            f"{delta:+.2f}%" if isinstance(delta, int | float) else "-",
            _num(m, "latency_ms_per_token", ".3f"),
            _num(m, "peak_memory_mb", ".0f"),
            "yes" if c.get("pareto_optimal") else "",
            verdict,
        )
    base = summary.get("base_model")
    if base:  # the model before fine-tuning, measured the same way: a reference, never a candidate
        m = base.get("metrics", {})
        delta = m.get("perplexity_increase_pct")
        table.add_row(
            Text("  base", style="dim"),
            Text("not fine-tuned", style="dim"),
            _num(m, "size_mb", ".3f"),
            _num(m, "perplexity", ".4f"),
            f"{delta:+.2f}%" if isinstance(delta, int | float) else "-",
            _num(m, "latency_ms_per_token", ".3f"),
            _num(m, "peak_memory_mb", ".0f"),
            "",
            Text("reference (before fine-tuning)", style="dim"),
        )
    return table


def summary_view(summary: dict, report_path: str | None) -> Group:
    parts = [candidates_table(summary)]
    recommended = summary.get("recommended") or "none"
    parts.append(Text.assemble(("recommended: ", "bold"), (recommended, "bold green")))
    parts.append(Text(summary.get("rationale", "")))
    export = summary.get("export")
    if export and export.get("artifact_id"):
        parts.append(Text(export_check_line(export)))
    if summary.get("environment"):
        env = Environment.parse(summary["environment"], "the summary's environment")
        on = f"{env.gpu.name or 'a CUDA GPU'}, " if env.gpu is not None else ""
        parts.append(Text(f"measured on: {on}{env.describe()}", style="dim"))
    if report_path:
        parts.append(Text.assemble(("report: ", "bold"), report_path))
    return Group(*parts)


# (summary key, what it measures, the key of the floor its check enforced)
_EXPORT_AGREEMENTS = (
    ("top1_agreement", "top-1 agreement", "min_top1_agreement"),
    ("llama_cpp_top1_agreement", "top-1 in llama.cpp", "llama_cpp_min_top1_agreement"),
    ("llama_cpp_greedy_agreement", "greedy tokens", "llama_cpp_min_greedy_agreement"),
    ("greedy_agreement", "greedy tokens", "min_greedy_agreement"),
)


def export_check_line(export: dict) -> str:
    """The export's check against its source: each agreement beside the floor it had to reach."""
    parts = []
    diff = export.get("max_abs_diff")
    if isinstance(diff, int | float):
        atol = export.get("atol")
        parts.append(
            f"max |logit diff| {diff:.2e}" + (f" (<= {atol:g})" if isinstance(atol, int | float) else "")
        )
    for key, what, floor_key in _EXPORT_AGREEMENTS:
        value, floor = export.get(key), export.get(floor_key)
        if isinstance(value, int | float):
            parts.append(
                f"{what} {value:.1%}" + (f" (floor {floor:.0%})" if isinstance(floor, int | float) else "")
            )
    verdict = "passed" if export.get("passed", True) else "FAILED"
    return (
        f"export: {export.get('format')} {short_id(export.get('artifact_id', ''))} checked against its "
        f"source, {verdict}: " + (", ".join(parts) or "no figures reported")
    )


def render_gate(metrics: dict) -> Text:
    """One line: the accuracy gate's measurements of a quantized model against its parent."""
    verdict = metrics.get("gate", "")
    style = "green" if verdict == "passed" else "red"
    return Text(
        f"accuracy gate {verdict}: perplexity {metrics.get('perplexity', float('nan')):.4f} vs parent "
        f"{metrics.get('parent_perplexity', float('nan')):.4f} ({metrics.get('perplexity_increase_pct', 0):+.2f}%, "
        f"allowed +{metrics.get('gate_max_perplexity_increase_pct', 0):g}%), top-1 agreement "
        f"{metrics.get('top1_agreement', float('nan')):.3f}",
        style=style,
    )


def plan_table(stages) -> Table:
    """`tailor plan`: one row per stage and machine of its pool (tailor.Stage.plans)."""
    table = Table(title="plan (predicted, not measured)")
    for col in ("stage", "machine", "device", "GPU peak", "host peak", "disk", "time", "fits"):
        table.add_column(col, justify="right" if col in ("GPU peak", "host peak", "disk", "time") else "left")
    for stage in stages:
        for p in stage.plans:
            fits = (
                "unknown (pool reports no hardware)"
                if p.fits is None
                else "yes"
                if p.fits
                else f"no: {p.reason}"
            )
            if p.alternatives:
                fits += "; would fit: " + "; ".join(p.alternatives[:2])
            table.add_row(
                stage.name,
                p.machine or "-",
                p.device,
                f"{p.gpu_peak_gb:.2f}" if p.device == "cuda" else "-",
                f"{p.host_peak_gb:.2f}",
                f"{p.disk_gb:.2f}",
                _duration(p.seconds),
                fits,
            )
    return table


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"~{seconds:.0f} s"
    if seconds < 3600:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
