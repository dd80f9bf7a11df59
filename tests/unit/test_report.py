"""The report page and JSON from odd summaries: hostile text, failed measurements, no winner."""

from __future__ import annotations

import json
import math
import re

import pytest
from support.report_sample import sample_summary

from tailor_gateway.report import render_report_html, render_report_json


def _plot(page: str, plot_id: str) -> str:
    return re.search(rf"<svg id={plot_id} .*?</svg>", page, re.S).group(0)


def test_every_piece_of_text_is_escaped():
    summary = sample_summary()
    evil = "<img src=x onerror=alert(1)>"
    summary["pipeline"]["name"] = evil
    summary["candidates"][1]["name"] = evil
    summary["recommended"] = evil
    summary["rationale"] = evil
    summary["environment"]["cpu_model"] = evil
    summary["environment"]["hostname"] = evil
    page = render_report_html(summary)
    assert "<img" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") >= 6


def test_page_fetches_nothing():
    page = render_report_html(sample_summary())
    assert not re.search(r"(src|href)\s*=", page)
    assert "<script" not in page
    assert "default-src 'none'" in page


def test_perplexity_limit_line_sits_at_the_baseline_plus_the_allowed_increase():
    page = render_report_html(sample_summary())
    # original: 3.912; limit +5% -> 4.1076, drawn on both plots.
    assert "limit: perplexity +5% (4.108)" in _plot(page, "plot-size")
    assert "limit: perplexity +5% (4.108)" in _plot(page, "plot-latency")


def test_a_size_limit_far_from_the_data_is_named_not_drawn():
    summary = sample_summary()
    summary["constraints"].append({"metric": "size_mb", "comparison": "at_most", "value": 4096.0})
    size_plot = _plot(render_report_html(summary), "plot-size")
    assert "limit: size (4,096): off the chart" in size_plot
    assert "4,000" not in size_plot  # the axis was not stretched to reach it


def test_a_near_size_limit_is_a_vertical_line():
    summary = sample_summary()
    summary["constraints"].append({"metric": "size_mb", "comparison": "at_most", "value": 0.5})
    size_plot = _plot(render_report_html(summary), "plot-size")
    assert "limit: size (0.50)" in size_plot
    assert "off the chart" not in size_plot


def test_violations_say_which_limit_and_by_how_much():
    page = render_report_html(sample_summary())
    assert "Peak memory 1,530 MB &gt; 1,024 MB (+49.4%)" in page
    assert "Perplexity increase 6.39% &gt; 5%" in page


def test_failed_measurements_show_as_dashes_and_stay_off_the_plot():
    summary = sample_summary()
    del summary["candidates"][2]["metrics"]["latency_ms_per_token"]
    summary["candidates"][3]["metrics"]["perplexity"] = math.nan
    page = render_report_html(summary)
    assert _plot(page, "plot-latency").count("class='pt ") == len(summary["candidates"]) - 2
    assert _plot(page, "plot-size").count("class='pt ") == len(summary["candidates"]) - 1
    assert "—" in page


def test_no_recommendation_is_said_plainly():
    summary = sample_summary()
    summary["recommended"] = ""
    summary["rationale"] = "no candidate keeps peak memory under 1 MB"
    page = render_report_html(summary)
    assert "No candidate is recommended" in page
    assert "no candidate keeps peak memory under 1 MB" in page


def test_degenerate_summaries_render():
    empty = {"pipeline": {"id": "p"}, "candidates": []}
    assert "no measurements to plot" in render_report_html(empty)
    one = sample_summary()
    one["candidates"] = one["candidates"][:1]
    one["recommended"] = "original"
    assert "Recommended" in render_report_html(one)
    same = sample_summary()
    for cand in same["candidates"]:
        cand["metrics"].update(size_mb=0.0, perplexity=4.0, latency_ms_per_token=1.0)
    assert "<svg id=plot-size" in render_report_html(same)


def test_footer_names_the_machine_and_versions():
    page = render_report_html(sample_summary())
    footer = re.search(r"<footer>.*?</footer>", page, re.S).group(0)
    assert "measured on <b>bench-box · Intel(R) Xeon(R) Platinum 8481C, 2 cores · 8 GiB RAM</b>" in footer
    assert "torch 2.13.0" in footer and "transformers 5.23.0" in footer and "8 GiB RAM" in footer
    assert "onnxruntime 1.31.1" in footer and "Python 3.11.2" in footer
    assert "unnamed" not in footer and "{" not in footer and "None" not in footer  # no raw dicts


def test_footer_names_the_gpu_a_cuda_benchmark_ran_on():
    summary = sample_summary()
    summary["environment"]["gpu"] = {
        "name": "NVIDIA H200",
        "compute_capability": "9.0",
        "memory_total_mb": 143771.0,
        "cuda": "12.8",
    }
    footer = re.search(r"<footer>.*?</footer>", render_report_html(summary), re.S).group(0)
    assert "bench-box · NVIDIA H200, 140 GiB · Intel(R)" in footer and "CUDA 12.8" in footer
    assert "{" not in footer


def test_json_is_valid_even_with_failed_measurements():
    summary = sample_summary()
    summary["candidates"][0]["metrics"]["perplexity"] = math.inf
    loaded = json.loads(render_report_json(summary))
    assert loaded["candidates"][0]["metrics"]["perplexity"] is None
    assert loaded["recommended"] == "int8_dynamic"


def test_a_pipeline_without_a_feasible_candidate_reports_every_miss_and_the_skipped_export():
    """No candidate meets the constraints: the engine skips the export (NOTHING_TO_EXPORT) and the report
    still lists each candidate with the limit it missed and by how much."""
    from types import SimpleNamespace

    from tailor_gateway import state as st
    from tailor_gateway.engine import NOTHING_TO_EXPORT
    from tailor_gateway.reporting import build_summary
    from tailor_gateway.spec import parse_spec
    from tailor_selector.selection import AT_MOST, Candidate, Constraint, select

    spec = parse_spec(
        f"name: tight\nmodel: {{artifact: {'a' * 64}}}\ndata: {{eval: {{artifact: {'b' * 64}}}}}\n"
        "quantize: [{method: int8_dynamic}]\nselect: {constraints: {max_size_mb: 0.01}}\n"
        "export: {format: onnx}\n"
    )
    chosen = select(
        [Candidate("original", "original", {"perplexity": 4.0, "size_mb": 1.0, "latency_ms_per_token": 2.0},
                   True),
         Candidate("int8_dynamic", "int8_dynamic",
                   {"perplexity": 4.1, "size_mb": 0.5, "latency_ms_per_token": 1.0})],
        [Constraint("size_mb", AT_MOST, 0.01)],
    )  # fmt: skip
    assert chosen.recommended is None
    verdicts = [
        {
            "candidate_id": v.candidate.id,
            "feasible": v.feasible,
            "metrics": v.candidate.metrics,
            "violations": [vars(x) for x in v.violations],
        }
        for v in chosen.verdicts
    ]

    def row(name, kind, state, **kw):
        return st.StageRow("p1", name, kind, 0, [], kw.pop("params", {}), state=state, **kw)

    stages = {
        "quantize/int8_dynamic": row(
            "quantize/int8_dynamic", "quantize", st.SUCCEEDED, params={"method": "int8_dynamic",
            "candidate": "int8_dynamic"}, results=[{"id": "q1"}]),
        "benchmark/original": row("benchmark/original", "benchmark", st.SUCCEEDED,
                                  params={"candidate": "original"}, metrics={"size_mb": 1.0}),
        "benchmark/int8_dynamic": row("benchmark/int8_dynamic", "benchmark", st.SUCCEEDED,
                                      params={"candidate": "int8_dynamic"}, metrics={"size_mb": 0.5}),
        "select": row("select", "select", st.SUCCEEDED,
                      metrics={"verdicts": verdicts, "recommended_id": "", "rationale": chosen.rationale}),
        "export": row("export", "export", st.SKIPPED, params={"format": "onnx"},
                      error_message=NOTHING_TO_EXPORT),
    }  # fmt: skip
    summary = build_summary(SimpleNamespace(id="p1", name="tight", created=0.0), spec, stages)
    assert summary["recommended"] == "" and summary["export"]["skipped"] == NOTHING_TO_EXPORT
    assert {c["name"] for c in summary["candidates"]} == {"original", "int8_dynamic"}
    assert all(c["violations"] and not c["feasible"] for c in summary["candidates"])
    page = render_report_html(summary)
    assert "No candidate is recommended" in page and NOTHING_TO_EXPORT in page
    assert "exceeds the limit 0.01 MB by 0.49 MB" in page  # the rationale: how far it missed
    assert json.loads(render_report_json(summary))["export"]["skipped"] == NOTHING_TO_EXPORT


def _recommended_chips(page: str) -> list[str]:
    section = re.search(r"<section class='verdict ok'>.*?</section>", page, re.S).group(0)
    return re.findall(r"<span class=chip>(.*?)</span>", section)


def test_the_recommendation_says_slower_for_a_slower_model_never_a_ratio_below_one():
    summary = sample_summary()
    chosen = summary["candidates"][2]  # int8_dynamic, the recommended one
    chosen["metrics"]["latency_ms_per_token"] = 0.91 * 1.28  # the baseline takes 0.91 ms/token
    chips = _recommended_chips(render_report_html(summary))
    assert "1.28x slower" in chips and "3.39x smaller" in chips
    assert not any(re.match(r"0\.\d+x", c) for c in chips)
    chosen["metrics"]["latency_ms_per_token"] = 0.91 / 1.28
    assert "1.28x faster" in _recommended_chips(render_report_html(summary))


def test_memory_column_is_named_by_what_was_measured():
    summary = sample_summary()
    for cand in summary["candidates"]:
        cand["device"] = "cuda"
    page = render_report_html(summary)
    assert "Peak GPU memory (allocated)<br>(MB)" in page and "Peak RSS" not in page
    for cand in summary["candidates"]:
        cand["device"] = "cpu"
    assert "Peak RSS<br>(MB)" in render_report_html(summary)
    summary["candidates"][0]["device"] = "cuda"  # a mixed table: each row says which
    page = render_report_html(summary)
    assert "Peak memory (GPU allocated or RSS)" in page and "(GPU)</small>" in page


def test_latency_and_throughput_headers_say_they_are_one_median():
    page = render_report_html(sample_summary())
    assert "Latency, median<br>(ms/token)" in page
    assert "Throughput, from median latency<br>(tokens/s)" in page


def test_a_gate_rejection_shows_the_gates_own_baseline_when_it_is_not_the_tables():
    summary = sample_summary()
    rejected = summary["candidates"][-1]
    rejected["rejected_by"] = "accuracy gate"
    rejected["gate"] = {"parent_perplexity": 3.5, "tokens_scored": 4095}
    assert "gate: vs its parent 3.500 on 4,095 tokens, not the baseline row" in render_report_html(summary)
    rejected["gate"]["parent_perplexity"] = 3.912  # measured on the benchmark's tokens: the same baseline
    page = render_report_html(summary)
    assert "not the baseline row" not in page and "gate, same tokens as the benchmark" in page


def test_each_export_agreement_stands_beside_its_floor():
    summary = sample_summary()
    summary["export"] = {
        "format": "gguf",
        "artifact_id": "e" * 64,
        "max_abs_diff": 3.1,
        "top1_agreement": 0.81,
        "llama_cpp_greedy_agreement": 0.27,
        "llama_cpp_min_greedy_agreement": 0.25,
        "min_top1_agreement": 0.85,
    }
    page = render_report_html(summary)
    assert "27.0% (floor 25%: passed)" in page
    assert "81.0% (floor 85%: BELOW the floor)" in page
    del summary["export"]["min_top1_agreement"]
    assert "81.0% (no floor reported)" in render_report_html(summary)


def test_summary_carries_the_gates_baseline_and_each_rows_device():
    """build_summary keeps what the report needs to label numbers: the gate's parent perplexity and
    tokens for a gate-rejected candidate, and where each benchmark ran (what its memory figure is)."""
    from types import SimpleNamespace

    from tailor_gateway import state as st
    from tailor_gateway.reporting import build_summary
    from tailor_gateway.spec import parse_spec

    spec = parse_spec(
        f"name: g\nmodel: {{artifact: {'a' * 64}}}\ndata: {{eval: {{artifact: {'b' * 64}}}}}\n"
        "quantize: [{method: nf4}]\n"
    )

    def row(name, kind, state, **kw):
        return st.StageRow("p1", name, kind, 0, [], kw.pop("params", {}), state=state, **kw)

    gate = {
        "gate": "rejected",
        "perplexity": 4.2027,
        "parent_perplexity": 3.7580,
        "perplexity_increase_pct": 11.83,
        "gate_max_perplexity_increase_pct": 5.0,
        "gate_tokens_scored": 8191,
        "gate_context_length": 256,
        "gate_stride": 128,
    }
    stages = {
        "quantize/nf4": row("quantize/nf4", "quantize", st.REJECTED, params={"method": "nf4",
                            "candidate": "nf4"}, metrics=gate, error_message="accuracy gate rejected nf4"),
        "benchmark/original": row("benchmark/original", "benchmark", st.SUCCEEDED, params={"candidate":
                                  "original"}, metrics={"perplexity": 3.7580, "device": "cpu"}),
        "select": row("select", "select", st.SUCCEEDED, metrics={"verdicts": [], "recommended_id": ""}),
    }  # fmt: skip
    summary = build_summary(SimpleNamespace(id="p1", name="g", created=0.0), spec, stages)
    nf4 = next(c for c in summary["candidates"] if c["name"] == "nf4")
    original = next(c for c in summary["candidates"] if c["name"] == "original")
    assert nf4["gate"] == {
        "parent_perplexity": 3.758,
        "tokens_scored": 8191,
        "context_length": 256,
        "stride": 128,
    }
    assert original["device"] == "cpu"
    page = render_report_html(summary)
    # The gate measured on the benchmark's tokens: its baseline is the table's, and the page says so.
    assert "gate, same tokens as the benchmark on 8,191 tokens" in page and "not the baseline row" not in page
    assert "Peak RSS<br>(MB)" in page


def test_the_base_model_is_its_own_reference_row_beside_the_fine_tuned_one():
    """With a finetune, the base model is benchmarked too (benchmark/base): the summary, the page and the
    CLI table show it as a reference row with its perplexity change against the fine-tuned model; it is
    never a candidate (not selected, not in the candidates list)."""
    from types import SimpleNamespace

    from rich.console import Console

    from tailor_cli.render import candidates_table
    from tailor_gateway import state as st
    from tailor_gateway.reporting import build_summary
    from tailor_gateway.spec import parse_spec, plan
    from tailor_gateway.stage_requests import select_request

    spec = parse_spec(
        f"name: ft\nmodel: {{artifact: {'a' * 64}}}\n"
        f"data: {{train: {{artifact: {'c' * 64}}}, eval: {{artifact: {'b' * 64}}}}}\n"
        "finetune: {method: lora}\nquantize: [{method: bf16}]\n"
    )
    planned = {s.name: s for s in plan(spec)}
    assert planned["benchmark/base"].depends_on == [] and "benchmark/base" in planned["select"].depends_on

    def row(name, kind, state, **kw):
        return st.StageRow("p1", name, kind, 0, [], kw.pop("params", {}), state=state, **kw)

    ft = {"id": "f" * 64, "kind": "model"}
    stages = {
        "benchmark/base": row("benchmark/base", "benchmark", st.SUCCEEDED, params={"candidate": "base"},
                              metrics={"perplexity": 5.0, "size_mb": 1.0, "device": "cpu"}),
        "finetune": row("finetune", "finetune", st.SUCCEEDED, results=[ft], metrics={"steps": 2}),
        "benchmark/original": row("benchmark/original", "benchmark", st.SUCCEEDED,
                                  params={"candidate": "original"}, metrics={"perplexity": 4.0, "size_mb": 1.0}),
        "select": row("select", "select", st.SUCCEEDED, metrics={"verdicts": [], "recommended_id": "original"}),
    }  # fmt: skip
    request, models = select_request(spec, stages)
    assert [c.name for c in request.candidates] == ["original"] and "base" not in models
    summary = build_summary(SimpleNamespace(id="p1", name="ft", created=0.0), spec, stages)
    assert [c["name"] for c in summary["candidates"]] == ["original"]
    base = summary["base_model"]
    assert base["artifact_id"] == "a" * 64 and base["metrics"]["perplexity"] == 5.0
    assert abs(base["metrics"]["perplexity_increase_pct"] - 25.0) < 1e-9  # 5.0 against the fine-tuned 4.0
    page = render_report_html(summary)
    assert "before fine-tuning" in page and "+25.0%" in page
    console = Console(width=200, record=True)
    console.print(candidates_table(summary))
    text = console.export_text()
    assert "base" in text and "+25.00%" in text and "reference (before fine-tuning)" in text


def test_base_is_a_reserved_candidate_name():
    from tailor_gateway.spec import parse_spec
    from tailor_runtime.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="reserved"):
        parse_spec(
            f"name: r\nmodel: {{artifact: {'a' * 64}}}\ndata: {{eval: {{artifact: {'b' * 64}}}}}\n"
            "quantize: [{method: nf4, name: base}]\n"
        )


def test_the_fine_tuning_section_plots_the_loss_curve_and_the_held_out_losses():
    from tailor_gateway.reporting import LOSS_POINTS, thin_curve

    curve = thin_curve([5.0 - 0.001 * i for i in range(3000)])
    assert len(curve) == LOSS_POINTS and curve[0] == [1, 5.0] and curve[-1][0] == 3000  # the last step kept
    summary = sample_summary()
    summary["finetune"] = {"steps": 3000, "final_loss": 2.0, "loss_curve": curve,
                           "eval_losses": [{"step": 1000, "loss": 4.1}, {"step": 2000, "loss": 3.3}]}  # fmt: skip
    page = render_report_html(summary)
    section = page[page.index("<h2>Fine-tuning</h2>") :]
    svg = section[section.index("<svg id=plot-loss") : section.index("</svg>")]
    points = re.search(r"<polyline points='([^']*)'", svg).group(1).split()
    assert len(points) == LOSS_POINTS
    assert svg.count("<circle") == 2 and "held-out loss 3.3000 at step 2000" in svg
    assert "loss_curve" not in section[: section.index("<svg")]  # the curve is drawn, not dumped as a fact
    summary["finetune"]["loss_curve"] = curve[:1]  # one point: no line to draw, the facts alone
    assert "plot-loss" not in render_report_html(summary)


def test_a_running_stage_shows_its_loss_learning_rate_and_time_left():
    from tailor.common.v1 import common_pb2 as common
    from tailor_cli.render import live_numbers

    progress = common.Progress(phase="training", percent=40, message="step 40/100")
    assert live_numbers(progress) == ""
    progress.metrics.update({"loss": 2.34567, "learning_rate": 0.0002, "tokens_per_s": 5123.4, "eta_s": 95})
    assert live_numbers(progress) == "loss 2.3457, lr 2.00e-04, 5,123 tok/s, ETA 1:35"
