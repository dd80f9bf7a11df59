"""`tailor select` on report files: constraints, a target profile's estimates, and no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.roofline import get_profile
from tailor_selector.reports import Limits, constraints_for, load_candidates, parse_objective
from tailor_selector.selection import select


def _report(ppl: float, size_mb: float, ms: float, p95: float, rss: float) -> dict:
    """The fields of a benchmarker report.json that selection reads (numbers chosen for the test)."""
    return {
        "model": "x" * 64,
        "perplexity": {"perplexity": ppl, "tokens_scored": 8000},
        "latency": {
            "ms_per_token": ms,
            "tokens_per_s": 1000 / ms,
            "ttft_ms": {"median": 2 * ms},
            "per_token_ms": {"p95": p95, "p99": p95 * 1.1},
            "throughput": {"1": {"tokens_per_s": 1000 / ms}, "4": {"tokens_per_s": 3000 / ms}},
        },
        "memory": {"peak_rss_mb": rss},
        "model_memory_mb": size_mb,
        "size_on_disk_mb": size_mb,
        "agreement": {"top1_agreement": 0.95, "kl_divergence": 0.01},
    }


@pytest.fixture()
def reports(tmp_path: Path) -> list[Path]:
    rows = {
        "fp32": _report(3.65, 1000.0, 40.0, 45.0, 1400.0),
        "int8": _report(3.72, 260.0, 20.0, 24.0, 700.0),
        "nf4": _report(4.12, 150.0, 30.0, 60.0, 600.0),
    }
    paths = []
    for name, report in rows.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / "report.json"
        path.write_text(json.dumps(report))
        paths.append(path)
    return paths


def test_quality_loss_threshold_rejects_with_the_excess(reports):
    candidates = load_candidates(reports)
    assert [c.name for c in candidates] == ["fp32", "int8", "nf4"] and candidates[0].is_baseline
    assert (
        candidates[1].metrics["top1_agreement"] == 0.95
        and candidates[1].metrics["tokens_per_s_batch_4"] == 150
    )
    result = select(candidates, constraints_for(candidates, Limits(max_quality_loss_pct=5.0)))
    assert result.recommended.name == "int8"
    nf4 = next(v for v in result.verdicts if v.candidate.name == "nf4")
    assert not nf4.feasible and nf4.violations[0].metric == "perplexity_increase_pct"
    assert nf4.violations[0].excess == pytest.approx(100 * (4.12 - 3.65) / 3.65 - 5.0)
    assert "Rejected nf4" in result.rationale


def test_a_target_profile_constrains_estimates_and_memory(reports):
    candidates = load_candidates(reports)
    pi = get_profile("raspberry-pi-5")
    limits = Limits(max_memory_mb=1024, min_tokens_per_s=30, target=pi)
    constraints = constraints_for(candidates, limits)
    assert {k.metric for k in constraints} == {"est_memory_mb", "est_tokens_per_s"}
    result = select(candidates, constraints)
    fp32 = next(v for v in result.verdicts if v.candidate.name == "fp32")
    assert {x.metric for x in fp32.violations} == {"est_memory_mb", "est_tokens_per_s"}
    # 260 MiB of weights at 17.1 GB/s: about 63 tokens/s, an estimate.
    int8 = next(c for c in candidates if c.name == "int8")
    assert int8.metrics["est_tokens_per_s"] == pytest.approx(17.1e9 / (260 * 2**20))
    assert "estimates" in limits.notes[0]


def test_objectives_parse_and_bad_inputs_say_why(tmp_path, reports):
    assert parse_objective("tokens_per_s:2:max").maximize and parse_objective("size_mb").weight == 1.0
    with pytest.raises(InvalidArgument):
        parse_objective("size_mb:heavy")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="not a benchmark report"):
        load_candidates([tmp_path / "other.json"])
    with pytest.raises(InvalidArgument, match="baseline"):
        load_candidates(reports, baseline="bf16")


def test_cli_select_prints_the_verdicts_and_imports_no_torch(reports):
    code = (
        "import sys, json; from tailor_cli.main import main; "
        f"rc = main(['select', *{[str(p) for p in reports]!r}, '--max-quality-loss-pct', '5', "
        "'--target', 'raspberry-pi-5', '--objective', 'perplexity:2', '--objective', 'tokens_per_s:1:max', '--json']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["recommended"].endswith("int8/report.json")
    assert "roofline estimates for Raspberry Pi 5" in result["rationale"]
