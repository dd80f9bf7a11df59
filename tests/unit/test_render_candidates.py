"""The CLI's candidates table and summary lines: labels by what was measured, agreements beside floors."""

from __future__ import annotations

from rich.console import Console
from support.report_sample import sample_summary

from tailor_cli.render import candidates_table, export_check_line, summary_view


def _text(renderable) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_memory_column_says_gpu_or_rss_never_rss_for_a_gpu():
    summary = sample_summary()
    for cand in summary["candidates"]:
        cand["device"] = "cuda"
    text = _text(candidates_table(summary))
    assert "peak GPU MB" in text and "RSS" not in text
    for cand in summary["candidates"]:
        cand["device"] = "cpu"
    assert "peak RSS MB" in _text(candidates_table(summary))
    summary["candidates"][0]["device"] = "cuda"
    assert "peak mem MB" in _text(candidates_table(summary))
    assert "ms/token (median)" in _text(candidates_table(summary))


def test_export_line_states_each_agreement_and_its_floor():
    line = export_check_line(
        {
            "format": "gguf",
            "artifact_id": "e" * 64,
            "max_abs_diff": 3.1,
            "atol": 10.0,
            "top1_agreement": 0.9,
            "min_top1_agreement": 0.75,
            "llama_cpp_greedy_agreement": 0.27,
            "llama_cpp_min_greedy_agreement": 0.25,
            "passed": True,
        }
    )
    assert "onnxruntime" not in line  # a GGUF is checked in llama.cpp, not ONNX Runtime
    assert "top-1 agreement 90.0% (floor 75%)" in line and "greedy tokens 27.0% (floor 25%)" in line
    assert "(<= 10)" in line and "passed" in line


def test_summary_names_the_gpu_it_was_measured_on():
    summary = sample_summary()
    summary["environment"]["gpu"] = {"name": "NVIDIA H200", "memory_total_mb": 143771.0}
    text = _text(summary_view(summary, None))
    assert "measured on: NVIDIA H200, Intel(R) Xeon(R) Platinum 8481C, 2 cores" in text
    assert "checked against its source" in text
