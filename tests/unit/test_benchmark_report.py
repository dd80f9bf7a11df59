"""The benchmark report's typed contract: it round-trips, every reader reads the same typed sample through
it, stored shapes of earlier versions still load, and a report that does not fit names the field."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.benchmark_sample import sample_environment, sample_report
from support.report_sample import sample_summary

from tailor_runtime.benchmark_report import SCHEMA_VERSION, BenchmarkReport, Environment
from tailor_runtime.errors import InvalidArgument


def test_a_report_round_trips_through_its_stored_json():
    for report in (sample_report(), sample_report(gpu=True)):
        text = report.dump_json()
        again = BenchmarkReport.parse(text)
        assert again == report and again.dump() == report.dump()
        assert BenchmarkReport.parse(json.loads(text)) == report  # from the decoded dict too
        assert json.loads(text)["schema_version"] == SCHEMA_VERSION


def test_a_parsed_report_dumps_what_was_stored_and_nothing_it_did_not_hold():
    stored = sample_report().dump()
    del stored["generation"], stored["latency"]["total_ms"]
    stored["latency"]["kv_cache_kind"] = None  # an ONNX model's: written as null, kept as null
    assert BenchmarkReport.parse(stored).dump() == stored


def test_headline_metrics_come_from_the_typed_fields():
    cpu, gpu = sample_report().headline(), sample_report(gpu=True).headline()
    assert cpu["device"] == "cpu" and cpu["peak_memory_mb"] == cpu["peak_rss_mb"] == 420.0
    assert gpu["device"] == "cuda" and gpu["peak_memory_mb"] == 40.0 and gpu["peak_rss_mb"] == 420.0
    assert cpu["tokens_per_s"] == pytest.approx(1000 / 0.91)  # not the median run's rate
    assert cpu["latency_p95_ms"] == 1.1 and cpu["latency_p99_ms"] == pytest.approx(1.21)
    assert cpu["tokens_per_s_batch_4"] > cpu["tokens_per_s_batch_1"]
    assert (cpu["top1_agreement"], cpu["choice_accuracy"], cpu["rouge_l"]) == (0.97, 0.6, 0.3)
    assert "tokens_per_s_pipelined" not in cpu and gpu["tokens_per_s_pipelined"] > 0
    assert cpu["environment"]["hostname"] == "bench-box" and cpu["environment"]["gpu"] is None


def test_the_benchmarkers_helper_is_the_same_headline():
    from tailor_benchmarker.metrics import headline_metrics

    report = sample_report()
    assert headline_metrics(report.dump()) == headline_metrics(report) == report.headline()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r["latency"].pop("ms_per_token"), "latency.ms_per_token: missing"),
        (
            lambda r: r["perplexity"].update(perplexity="low"),
            "perplexity.perplexity: Input should be a valid number",
        ),
        (lambda r: r["memory"].update(peak_rss="1"), "memory.peak_rss: not a field of this schema"),
        (
            lambda r: r["latency"]["throughput"]["4"].pop("tokens_per_s"),
            "latency.throughput.4.tokens_per_s: missing",
        ),
        (lambda r: r["environment"].update(cpus_usable="two"), "environment.cpus_usable"),
        (lambda r: r.update(schema_version=SCHEMA_VERSION + 1), f"schema version {SCHEMA_VERSION + 1}"),
        (lambda r: r.pop("memory"), "memory: missing"),
    ],
)
def test_a_report_that_does_not_fit_names_the_field(change, field):
    data = sample_report().dump()
    change(data)
    with pytest.raises(InvalidArgument, match="not a valid benchmark report") as err:
        BenchmarkReport.parse(data, "run-7/report.json")
    assert field in err.value.message and err.value.message.startswith("run-7/report.json: ")


def test_not_json_and_not_an_object_are_refused_plainly():
    with pytest.raises(InvalidArgument, match="not JSON"):
        BenchmarkReport.parse("{nope")
    with pytest.raises(InvalidArgument, match="not a valid benchmark report"):
        BenchmarkReport.parse([1, 2])


def test_a_report_stored_by_an_earlier_version_still_loads():
    """No schema_version, the artifact id under "model", no p99, compile flags, environment, size or config:
    the shape of the first stored reports."""
    old = {
        "model": "a" * 64,
        "perplexity": {"perplexity": 4.2, "tokens_scored": 8000},
        "latency": {
            "ms_per_token": 2.0,
            "tokens_per_s": 480.0,
            "ttft_ms": {"median": 4.0},
            "per_token_ms": {"p95": 3.0},
        },
        "memory": {"peak_rss_mb": 700.0},
        "model_memory_mb": 1.0,
    }
    report = BenchmarkReport.parse(old)
    assert report.schema_version == 1 and report.model_id == "a" * 64 and report.model.format is None
    headline = report.headline()
    assert headline["size_mb"] == 1.0  # no size on disk: the weights' size, as the selector always did
    assert headline["latency_p95_ms"] == 3.0 and "latency_p99_ms" not in headline
    assert headline["environment"] == {}


def test_environment_parse_names_the_field_and_accepts_struct_numbers():
    env = sample_environment().model_dump(exclude_unset=True)
    env["cpu_count"] = 8.0  # what an operation's metrics Struct makes of an int
    assert Environment.parse(env).cpu_count == 8
    assert Environment.parse(None) == Environment() == Environment.parse({})
    with pytest.raises(
        InvalidArgument, match="summary: not a valid environment block: gpu.memory: not a field"
    ):
        Environment.parse({**env, "gpu": {"name": "H200", "memory": 1}}, "summary")
    assert Environment.parse(env).describe() == (
        "Intel(R) Xeon(R) Platinum 8481C, 2 cores, 1 torch thread(s), torch 2.13.0, transformers 5.23.0"
    )


# --- every reader, fed the same typed sample ---------------------------------------------------------


@pytest.fixture()
def report_files(tmp_path: Path) -> dict[str, Path]:
    rows = {
        "fp32": sample_report(3.65, 1000.0, 40.0, 45.0, 1400.0),
        "int8": sample_report(3.72, 260.0, 20.0, 24.0, 700.0),
        "nf4": sample_report(4.12, 150.0, 30.0, 60.0, 600.0),
    }
    paths = {}
    for name, report in rows.items():
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "report.json"
        paths[name].write_text(report.dump_json())
    return paths


def test_the_selector_reads_the_typed_sample(report_files):
    from tailor_selector.reports import load_candidates

    candidates = load_candidates(list(report_files.values()))
    for c in candidates:
        headline = BenchmarkReport.parse(report_files[c.name].read_text()).headline()
        assert c.metrics == {k: float(v) for k, v in headline.items() if isinstance(v, int | float)}
    assert candidates[1].metrics["size_mb"] == 260.0 and candidates[1].metrics["latency_p95_ms"] == 24.0


def test_the_selector_names_the_file_and_the_field_of_a_report_that_does_not_fit(report_files):
    from tailor_selector.reports import load_candidates

    data = json.loads(report_files["int8"].read_text())
    del data["memory"]["peak_rss_mb"]
    report_files["int8"].write_text(json.dumps(data))
    with pytest.raises(
        InvalidArgument, match=r"int8/report.json: not a valid benchmark report.*memory.peak_rss_mb: missing"
    ):
        load_candidates(list(report_files.values()))


def test_tailor_select_reads_the_typed_sample_without_torch(report_files):
    code = (
        "import sys; from tailor_cli.main import main; "
        f"rc = main(['select', *{[str(p) for p in report_files.values()]!r}, '--max-quality-loss-pct', '5', '--json']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["recommended"].endswith("int8/report.json")


def _summary_with(environment: dict) -> dict:
    summary = sample_summary()
    summary["environment"] = environment
    return summary


def test_the_html_footer_and_the_cli_read_the_same_environment():
    from rich.console import Console

    from tailor_cli.render import summary_view
    from tailor_gateway.report import render_report_html

    env = sample_report(gpu=True).headline()["environment"]  # what a benchmark stage's metrics carry
    page = render_report_html(_summary_with(env))
    footer = re.search(r"<footer>.*?</footer>", page, re.S).group(0)
    assert "bench-box · NVIDIA H200, 140 GiB · Intel(R) Xeon(R) Platinum 8481C, 2 cores · 8 GiB RAM" in footer
    assert "CUDA 12.8" in footer and "1 torch thread(s)" in footer and "None" not in footer
    console = Console(width=200, record=True, color_system=None)
    console.print(summary_view(_summary_with(env), None))
    assert "measured on: NVIDIA H200, Intel(R) Xeon(R) Platinum 8481C, 2 cores, 1 torch thread(s)" in (
        console.export_text()
    )


def test_the_html_report_refuses_an_environment_that_does_not_fit():
    from tailor_gateway.report import render_report_html

    env = {**sample_environment().model_dump(exclude_unset=True), "cpus": 2}
    with pytest.raises(InvalidArgument, match="cpus: not a field of this schema"):
        render_report_html(_summary_with(env))


def test_the_pipeline_summary_keeps_the_benchmark_stages_environment():
    from types import SimpleNamespace

    from tailor_gateway import state as st
    from tailor_gateway.reporting import build_summary
    from tailor_gateway.spec import parse_spec

    spec = parse_spec(
        f"name: one\nmodel: {{artifact: {'a' * 64}}}\ndata: {{eval: {{artifact: {'b' * 64}}}}}\n"
        "quantize: [{method: int8_dynamic}]\n"
    )
    metrics = sample_report().headline()
    metrics["environment"]["cpu_count"] = 8.0  # through the operation's Struct
    stages = {
        "benchmark/original": st.StageRow(
            "p1", "benchmark/original", "benchmark", 0, [], {"candidate": "original"}, state=st.SUCCEEDED,
            metrics=metrics, results=[{"id": "r" * 64}],
        ),
        "select": st.StageRow("p1", "select", "select", 0, [], {}, state=st.SUCCEEDED, metrics={}),
    }  # fmt: skip
    summary = build_summary(SimpleNamespace(id="p1", name="one", created=0.0), spec, stages)
    assert Environment.parse(summary["environment"]) == sample_environment()
    assert isinstance(summary["environment"]["cpu_count"], int) and summary["environment"]["gpu"] is None
    metrics["environment"]["threads"] = {"torch": 1}  # a block that does not fit fails here, named
    with pytest.raises(InvalidArgument, match="benchmark/original's environment.*threads.torch: not a field"):
        build_summary(SimpleNamespace(id="p1", name="one", created=0.0), spec, stages)
    assert math.isclose(summary["candidates"][0]["metrics"]["perplexity"], 3.912)
