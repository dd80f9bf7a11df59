"""Pure selection logic: constraints, the Pareto front, a weighted recommendation and its rationale.

No torch, no I/O: the servicer, the gateway and the CLI call `select()` on plain data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tailor_runtime import metrics_catalogue as mc
from tailor_runtime.errors import InvalidArgument

AT_MOST, AT_LEAST = "at_most", "at_least"
# Derived from the baseline's perplexity when the baseline is among the candidates.
QUALITY_LOSS = "perplexity_increase_pct"


@dataclass(frozen=True)
class Constraint:
    metric: str
    comparison: str
    value: float


@dataclass(frozen=True)
class Objective:
    metric: str
    maximize: bool = False
    weight: float = 1.0

    @classmethod
    def of(cls, metric: str, weight: float = 1.0) -> Objective:
        """An objective in the catalogue's direction for `metric` (tokens/s up, latency down)."""
        return cls(metric, maximize=mc.higher_is_better(metric), weight=weight)


@dataclass
class Candidate:
    id: str
    name: str
    metrics: dict[str, float]
    is_baseline: bool = False


@dataclass
class Violation:
    metric: str
    limit: float
    actual: float
    excess: float


@dataclass
class Verdict:
    candidate: Candidate
    feasible: bool = True
    pareto_optimal: bool = False
    violations: list[Violation] = field(default_factory=list)
    score: float = math.inf


@dataclass
class Selection:
    recommended: Candidate | None
    pareto_front: list[Candidate]
    verdicts: list[Verdict]
    rationale: str


DEFAULT_OBJECTIVES = (
    Objective.of("perplexity"),
    Objective.of("size_mb"),
    Objective.of("latency_ms_per_token"),
)


def fmt(metric: str, value: float) -> str:
    unit = mc.unit(metric)
    return f"{value:.4g}{'' if not unit else unit if unit == '%' else ' ' + unit}"


def _validate(candidates, constraints, objectives) -> None:
    if not candidates:
        raise InvalidArgument("no candidates to select from: pass at least one candidate with metrics")
    ids = [c.id for c in candidates]
    if len(set(ids)) != len(ids):
        raise InvalidArgument("candidate ids must be unique")
    if sum(c.is_baseline for c in candidates) > 1:
        raise InvalidArgument("at most one candidate can be the baseline")
    for c in constraints:
        if c.comparison not in (AT_MOST, AT_LEAST):
            raise InvalidArgument(
                f"constraint on {c.metric!r}: unknown comparison {c.comparison!r}",
                choices=(AT_MOST, AT_LEAST),
            )
        if not math.isfinite(c.value):
            raise InvalidArgument(f"constraint on {c.metric!r}: the limit must be a finite number")
    if not objectives:
        raise InvalidArgument("at least one objective is needed")
    for o in objectives:
        if o.weight < 0 or not math.isfinite(o.weight):
            raise InvalidArgument(f"objective {o.metric!r}: weight must be a finite number >= 0")
        missing = [c.name for c in candidates if o.metric not in c.metrics]
        if missing:
            raise InvalidArgument(
                f"objective {o.metric!r} is not measured for {', '.join(missing[:5])}",
                choices=sorted({m for c in candidates for m in c.metrics}),
            )


def add_quality_loss(candidates: list[Candidate]) -> None:
    """perplexity_increase_pct of each candidate against the baseline's perplexity."""
    baseline = next((c for c in candidates if c.is_baseline), None)
    if baseline is None or "perplexity" not in baseline.metrics:
        return
    reference = baseline.metrics["perplexity"]
    for c in candidates:
        if "perplexity" in c.metrics and QUALITY_LOSS not in c.metrics:
            c.metrics[QUALITY_LOSS] = 100.0 * (c.metrics["perplexity"] - reference) / reference


def _violations(c: Candidate, constraints: list[Constraint]) -> list[Violation]:
    found = []
    for k in constraints:
        actual = c.metrics.get(k.metric)
        if actual is None or not math.isfinite(actual):
            found.append(Violation(k.metric, k.value, math.nan, math.nan))
            continue
        excess = actual - k.value if k.comparison == AT_MOST else k.value - actual
        if excess > 0:
            found.append(Violation(k.metric, k.value, actual, excess))
    return found


def pareto_front(vectors: list[tuple[float, ...]]) -> list[int]:
    """Indices of the non-dominated vectors (all objectives minimized).

    Sorting lexicographically means only earlier vectors can dominate a later one, and it is enough to
    compare with the front found so far (dominance is transitive): O(n log n + n * front).
    """
    order = sorted(range(len(vectors)), key=lambda i: vectors[i])
    front: list[int] = []
    for i in order:
        v = vectors[i]
        dominated = False
        for j in front:
            w = vectors[j]
            if w != v and all(a <= b for a, b in zip(w, v, strict=True)):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front)


def _scores(rows: list[list[float]], objectives: list[Objective]) -> list[float]:
    """Weighted sum of how far each row is from the best value of each objective (lower is better).

    Rows hold signed values (every objective minimized). Where an objective's values share one sign,
    the distance is the log of the ratio to the best, so small differences stay small (0.1% worse
    perplexity costs 0.001, 4x the size costs 1.39); otherwise a min-max scale stands in.
    """
    totals = [0.0] * len(rows)
    if not rows:
        return totals
    for k, o in enumerate(objectives):
        column = [r[k] for r in rows]
        lo, hi = min(column), max(column)
        for i, x in enumerate(column):
            if lo > 0 or hi < 0:
                # Positive: best is the smallest. Negative (a maximized metric): best has the largest size.
                ratio = x / lo if lo > 0 else hi / x
                totals[i] += o.weight * math.log(ratio)
            else:
                totals[i] += o.weight * (x - lo) / ((hi - lo) or 1.0)
    return totals


def select(
    candidates: list[Candidate],
    constraints: list[Constraint],
    objectives: list[Objective] | tuple[Objective, ...] = DEFAULT_OBJECTIVES,
) -> Selection:
    add_quality_loss(candidates)
    objectives = list(objectives)
    _validate(candidates, constraints, objectives)
    verdicts = [Verdict(candidate=c, violations=_violations(c, constraints)) for c in candidates]
    for v in verdicts:
        v.feasible = not v.violations

    signed = [[(-1.0 if o.maximize else 1.0) * c.metrics[o.metric] for o in objectives] for c in candidates]
    for i in pareto_front([tuple(s) for s in signed]):
        verdicts[i].pareto_optimal = True

    feasible = [i for i, v in enumerate(verdicts) if v.feasible]
    for i, score in zip(feasible, _scores([signed[i] for i in feasible], objectives), strict=True):
        verdicts[i].score = score
    eligible = [i for i in feasible if verdicts[i].pareto_optimal] or feasible
    best = min(
        eligible, key=lambda i: (verdicts[i].score, candidates[i].metrics.get("size_mb", 0.0)), default=None
    )
    recommended = candidates[best] if best is not None else None
    front = [candidates[i] for i, v in enumerate(verdicts) if v.pareto_optimal]
    return Selection(recommended, front, verdicts, _rationale(recommended, verdicts, constraints, objectives))


def _rationale(best: Candidate | None, verdicts: list[Verdict], constraints, objectives) -> str:
    rejected = [v for v in verdicts if not v.feasible]
    lines = []
    if best is None:
        lines.append("No candidate meets every constraint, so none is recommended.")
    else:
        v = next(v for v in verdicts if v.candidate is best)
        met = "; ".join(
            f"{k.metric} {fmt(k.metric, best.metrics[k.metric])} "
            f"{'<=' if k.comparison == AT_MOST else '>='} {fmt(k.metric, k.value)}"
            for k in constraints
        )
        lines.append(
            f"{best.name} is recommended: it meets every constraint ({met or 'none given'})"
            + (", is on the Pareto front" if v.pareto_optimal else "")
            + f" and has the best weighted score ({v.score:.3f}) over "
            + ", ".join(f"{o.metric} (weight {o.weight:g})" for o in objectives)
            + "."
        )
        baseline = next((x.candidate for x in verdicts if x.candidate.is_baseline), None)
        if baseline is not None and baseline is not best:
            parts = [
                words
                for metric in ("size_mb", "latency_ms_per_token")
                if (words := mc.ratio_text(metric, best.metrics.get(metric), baseline.metrics.get(metric)))
            ]
            if QUALITY_LOSS in best.metrics:
                parts.append(f"perplexity {best.metrics[QUALITY_LOSS]:+.2f}%")
            if parts:
                lines.append(f"Against the baseline {baseline.name}: " + ", ".join(parts) + ".")
    for v in rejected:
        reasons = "; ".join(
            f"{x.metric} not measured"
            if math.isnan(x.actual)
            else f"{x.metric} {fmt(x.metric, x.actual)} exceeds the limit {fmt(x.metric, x.limit)} "
            f"by {fmt(x.metric, x.excess)}"
            for x in v.violations
        )
        lines.append(f"Rejected {v.candidate.name}: {reasons}.")
    return " ".join(lines)
