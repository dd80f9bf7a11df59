"""The selector's logic: constraints, the Pareto front, the recommendation and its rationale."""

import random

import pytest

from tailor_runtime.errors import InvalidArgument
from tailor_selector.selection import Candidate, Constraint, Objective, pareto_front, select


def _candidates():
    return [
        Candidate("a", "fp32", {"perplexity": 4.0, "size_mb": 1.0, "latency_ms_per_token": 1.0}, True),
        Candidate("b", "int8", {"perplexity": 4.04, "size_mb": 0.3, "latency_ms_per_token": 1.2}),
        Candidate("c", "nf4", {"perplexity": 5.0, "size_mb": 0.2, "latency_ms_per_token": 2.0}),
        Candidate("d", "worse", {"perplexity": 4.1, "size_mb": 0.35, "latency_ms_per_token": 1.3}),
    ]


def test_quality_loss_threshold_is_never_recommended():
    result = select(_candidates(), [Constraint("perplexity_increase_pct", "at_most", 5)])
    assert result.recommended.name == "int8"
    nf4 = next(v for v in result.verdicts if v.candidate.name == "nf4")
    assert not nf4.feasible
    assert nf4.violations[0].actual == pytest.approx(25.0)
    assert nf4.violations[0].excess == pytest.approx(20.0)
    assert "Rejected nf4" in result.rationale and "exceeds the limit" in result.rationale


def test_pareto_front_excludes_dominated():
    result = select(_candidates(), [])
    front = {c.name for c in result.pareto_front}
    assert front == {"fp32", "int8", "nf4"}  # "worse" is dominated by int8 on every objective


def test_no_feasible_candidate_recommends_none():
    result = select(_candidates(), [Constraint("size_mb", "at_most", 0.01)])
    assert result.recommended is None
    assert "none is recommended" in result.rationale


def test_at_least_constraints_and_maximized_objectives():
    cands = [
        Candidate(str(i), str(i), {"tokens_per_s": float(t), "size_mb": 1.0})
        for i, t in enumerate([5, 50, 500])
    ]
    result = select(
        cands, [Constraint("tokens_per_s", "at_least", 40)], [Objective("tokens_per_s", maximize=True)]
    )
    assert result.recommended.name == "2"
    assert not result.verdicts[0].feasible


def test_bad_input_is_named():
    with pytest.raises(InvalidArgument, match="no candidates"):
        select([], [])
    with pytest.raises(InvalidArgument, match="not measured"):
        select(_candidates(), [], [Objective("joules")])
    with pytest.raises(InvalidArgument, match="comparison"):
        select(_candidates(), [Constraint("size_mb", "below", 1)])


def test_pareto_front_matches_brute_force():
    rng = random.Random(1)
    vectors = [tuple(rng.randint(0, 6) for _ in range(3)) for _ in range(300)]

    def dominated(i):
        return any(
            all(a <= b for a, b in zip(w, vectors[i], strict=True)) and w != vectors[i] for w in vectors
        )

    assert pareto_front(vectors) == [i for i in range(len(vectors)) if not dominated(i)]


def test_ten_thousand_candidates_are_selected_among():
    """How long it takes is bench/selection_speed.py's (no wall-clock assertion in a test)."""
    rng = random.Random(0)
    cands = [
        Candidate(
            str(i),
            str(i),
            {
                "perplexity": rng.uniform(3, 6),
                "size_mb": rng.uniform(0.1, 2),
                "latency_ms_per_token": rng.uniform(0.5, 3),
            },
        )
        for i in range(10_000)
    ]
    result = select(cands, [Constraint("size_mb", "at_most", 1.5)])
    assert result.recommended is not None


def test_selector_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, tailor_selector.servicer, tailor_gateway.engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
