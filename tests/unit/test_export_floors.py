"""Each export's summary states its agreement beside the floor its check enforced (issue 20)."""

from __future__ import annotations

import pytest
from support.report_sample import sample_summary

from tailor_exporter import gguf_export
from tailor_exporter.gguf_export import TOLERANCES, _enforce, _headline
from tailor_gateway.report import render_report_html
from tailor_runtime.errors import VerificationFailed


def _llama_check(greedy: float) -> dict:
    return {
        "max_abs_diff": 2.0,
        "top1_agreement": 0.9,
        "positions": 64,
        "tokenizer_agreement": 1.0,
        "greedy_agreement": greedy,
    }


def test_a_q4_0_gguf_at_27_percent_greedy_passes_its_stated_25_percent_floor_and_says_so():
    tol = TOLERANCES["Q4_0"]
    dequantized = {"max_abs_diff": 2.0, "top1_agreement": 0.9, "positions": 64}
    _enforce("dequantized", dequantized, tol["atol"], tol["top1"], "Q4_0")
    llama = _llama_check(0.27)
    _enforce("llama_cpp", llama, tol["llama_atol"], tol["llama_top1"], "Q4_0", tol["greedy"])
    flat = _headline({"dequantized": dequantized, "llama_cpp": llama})
    assert flat["min_top1_agreement"] == tol["top1"] and flat["llama_cpp_min_greedy_agreement"] == 0.25
    page = render_report_html({**sample_summary(), "export": {"format": "gguf", "artifact_id": "e", **flat}})
    assert "greedy tokens equal to the source&#x27;s" in page and "27.0% (floor 25%: passed)" in page
    assert "90.0% (floor 75%: passed)" in page


def test_a_gguf_below_its_greedy_floor_is_refused():
    tol = TOLERANCES["Q8_0"]
    with pytest.raises(VerificationFailed, match=r"greedy token agreement 0.270 < 0.6"):
        _enforce("llama_cpp", _llama_check(0.27), 10.0, 0.5, "Q8_0", tol["greedy"])
    assert gguf_export.TOLERANCES["F16"]["greedy"] == 0.9
