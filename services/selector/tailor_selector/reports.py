"""Selection over benchmark report files (the benchmarker's report.json), optionally for a target profile.

Pure: reads JSON (as `tailor_runtime.benchmark_report.BenchmarkReport`), builds candidates and constraints for `select()`, never imports torch. With a target
profile, memory, latency and throughput limits apply to roofline estimates for that hardware
(`tailor_runtime.roofline`, labelled as estimates) and the model must fit the profile's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tailor_runtime import metrics_catalogue as mc
from tailor_runtime.benchmark_report import BenchmarkReport
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.roofline import HardwareProfile, estimate_for_target
from tailor_selector.selection import AT_LEAST, AT_MOST, QUALITY_LOSS, Candidate, Constraint, Objective


@dataclass
class Limits:
    """What the user asked for; None: no limit."""

    max_memory_mb: float | None = None
    max_size_mb: float | None = None
    max_p95_latency_ms: float | None = None
    min_tokens_per_s: float | None = None
    max_quality_loss_pct: float | None = None
    target: HardwareProfile | None = None
    notes: list[str] = field(default_factory=list)


def load_candidates(paths: list[Path], baseline: str | None = None) -> list[Candidate]:
    """One candidate per report file; `baseline` names one (file path or name), else the first is it."""
    if not paths:
        raise InvalidArgument("no report files given")
    candidates = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"{path}: not a readable JSON report ({exc})") from None
        if not isinstance(data, dict) or "perplexity" not in data or "latency" not in data:
            raise InvalidArgument(f"{path}: not a benchmark report (no perplexity or latency)")
        headline = BenchmarkReport.parse(data, str(path)).headline()
        metrics = {k: float(v) for k, v in headline.items() if isinstance(v, int | float)}
        candidates.append(Candidate(str(path), _name(Path(path)), metrics))
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):  # report.json files in folders of the same name: use the paths
        for c in candidates:
            c.name = c.id
    chosen = candidates[0] if baseline is None else next(
        (c for c in candidates if baseline in (c.id, c.name)), None
    )  # fmt: skip
    if chosen is None:
        raise InvalidArgument(
            f"baseline {baseline!r} is none of the reports", choices=[c.name for c in candidates]
        )
    chosen.is_baseline = True
    return candidates


def _name(path: Path) -> str:
    return path.parent.name if path.stem == "report" and path.parent.name else path.stem


def constraints_for(candidates: list[Candidate], limits: Limits) -> list[Constraint]:
    """The limits as constraints; with a target, on estimated metrics added to each candidate."""
    memory, latency, rate = "peak_memory_mb", "latency_p95_ms", "tokens_per_s"
    found = []
    if limits.target is not None:
        for c in candidates:
            c.metrics.update(estimate_for_target(limits.target, c.metrics))
        memory, latency, rate = "est_memory_mb", "est_latency_p95_ms", "est_tokens_per_s"
        found.append(Constraint(memory, AT_MOST, limits.target.memory_gb * 1e9 / 2**20))
        limits.notes.append(
            f"Memory, latency and tokens/s are roofline estimates for {limits.target.description} "
            f"({limits.target.memory_bandwidth_gbs:g} GB/s, {limits.target.memory_gb:g} GB): estimates, "
            "not measurements."
        )
    pairs = (
        (limits.max_memory_mb, memory, AT_MOST),
        (limits.max_size_mb, "size_mb", AT_MOST),
        (limits.max_p95_latency_ms, latency, AT_MOST),
        (limits.min_tokens_per_s, rate, AT_LEAST),
        (limits.max_quality_loss_pct, QUALITY_LOSS, AT_MOST),
    )
    found += [
        Constraint(metric, comparison, float(value))
        for value, metric, comparison in pairs
        if value is not None
    ]
    return found


def parse_objective(text: str) -> Objective:
    """`metric[:weight][:min|max]`, e.g. `perplexity`, `size_mb:2`, `tokens_per_s:1:max`; without a
    direction, the metric catalogue's (tokens/s is maximized, latency minimized)."""
    parts = text.split(":")
    if not parts[0] or len(parts) > 3:
        raise InvalidArgument(f"objective {text!r}: expected metric[:weight][:max]")
    try:
        weight = float(parts[1]) if len(parts) > 1 and parts[1] else 1.0
    except ValueError:
        raise InvalidArgument(f"objective {text!r}: the weight must be a number") from None
    default = "max" if mc.higher_is_better(parts[0]) else "min"
    direction = parts[2] if len(parts) == 3 else default
    if direction not in ("min", "max"):
        raise InvalidArgument(f"objective {text!r}: the direction must be min or max", choices=("min", "max"))
    return Objective(parts[0], maximize=direction == "max", weight=weight)
