"""`tailor select REPORT.json...`: pick a model from benchmark report files, offline. Imports no torch."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tailor_runtime import targets
from tailor_runtime.roofline import get_profile
from tailor_selector.reports import Limits, constraints_for, load_candidates, parse_objective
from tailor_selector.selection import DEFAULT_OBJECTIVES, QUALITY_LOSS, fmt, select

_COLUMNS = (
    ("size_mb", "size MB"),
    ("perplexity", "perplexity"),
    (QUALITY_LOSS, "Δ ppl %"),
    ("top1_agreement", "top-1 agree"),
    ("latency_p95_ms", "p95 ms/token"),
    ("tokens_per_s", "tokens/s (median)"),  # 1000 / median ms/token (tailor_runtime.metrics_catalogue)
    # GPU allocator peak for a model measured on a GPU, RSS on a CPU: not always RSS.
    ("peak_memory_mb", "peak mem MB"),
)
_ESTIMATES = (("est_tokens_per_s", "est. tokens/s"), ("est_latency_p95_ms", "est. p95 ms"),
              ("est_memory_mb", "est. memory MB"))  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="choose among benchmark report files (report.json) under constraints, offline",
        description=__doc__,
    )
    p.add_argument("reports", type=Path, nargs="+", metavar="REPORT.json")
    p.add_argument(
        "--baseline",
        default=None,
        help="the report (path or name) quality loss is measured against; default: the first",
    )
    p.add_argument("--max-memory-mb", type=float, default=None)
    p.add_argument("--max-size-mb", type=float, default=None)
    p.add_argument("--max-p95-latency-ms", type=float, default=None)
    p.add_argument("--min-tokens-per-s", type=float, default=None)
    p.add_argument(
        "--max-quality-loss-pct",
        type=float,
        default=None,
        help="max perplexity increase over the baseline, %%",
    )
    p.add_argument(
        "--target",
        choices=targets.names(roofline=True),  # the catalogue's targets with vendor figures, aliases too
        default=None,
        help="estimate memory and speed for this hardware (roofline)",
    )
    p.add_argument(
        "--objective",
        action="append",
        default=[],
        metavar="METRIC[:WEIGHT][:max]",
        help="repeatable; default: perplexity, size_mb, latency_ms_per_token, weight 1 each",
    )
    p.add_argument("--json", action="store_true", help="print the selection as JSON")  # fmt: skip


def cmd_select(args: argparse.Namespace, console: Console) -> int:
    candidates = load_candidates(args.reports, args.baseline)
    limits = Limits(
        max_memory_mb=args.max_memory_mb,
        max_size_mb=args.max_size_mb,
        max_p95_latency_ms=args.max_p95_latency_ms,
        min_tokens_per_s=args.min_tokens_per_s,
        max_quality_loss_pct=args.max_quality_loss_pct,
        target=get_profile(args.target) if args.target else None,
    )
    constraints = constraints_for(candidates, limits)
    objectives = [parse_objective(o) for o in args.objective] or list(DEFAULT_OBJECTIVES)
    result = select(candidates, constraints, objectives)
    rationale = " ".join([*limits.notes, result.rationale])
    if args.json:
        print(json.dumps(_as_dict(result, rationale), indent=2))
        return 0
    table = Table(title="candidates" + (f" (estimates for {args.target})" if args.target else ""))
    columns = [*_COLUMNS, *(_ESTIMATES if args.target else ())]
    for header in ("candidate", *(h for _, h in columns), "verdict"):
        table.add_column(header)
    for v in result.verdicts:
        c = v.candidate
        cells = [_cell(c.metrics.get(m)) for m, _ in columns]
        table.add_row(c.name + (" (baseline)" if c.is_baseline else ""), *cells, _verdict(v, result))
    console.print(table)
    console.print(rationale)
    return 0 if result.recommended is not None else 1


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _verdict(v, result) -> str:
    if result.recommended is v.candidate:
        return "[green]recommended[/green]"
    if not v.feasible:
        return "[red]rejected[/red]: " + "; ".join(
            f"{x.metric} not measured"
            if math.isnan(x.actual)
            else f"{x.metric} over by {fmt(x.metric, x.excess)}"
            for x in v.violations
        )
    return "pareto-optimal" if v.pareto_optimal else "dominated"


def _as_dict(result, rationale: str) -> dict:
    return {
        "recommended": result.recommended.id if result.recommended else None,
        "pareto_front": [c.id for c in result.pareto_front],
        "verdicts": [
            {
                "candidate": v.candidate.id,
                "name": v.candidate.name,
                "feasible": v.feasible,
                "pareto_optimal": v.pareto_optimal,
                "score": v.score if math.isfinite(v.score) else None,
                "metrics": v.candidate.metrics,
                "violations": [x.__dict__ for x in v.violations],
            }
            for v in result.verdicts
        ],
        "rationale": rationale,
    }
