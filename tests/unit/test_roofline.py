"""The roofline estimator: profiles, bounds, and a check against what this machine measures."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.roofline import (
    PROFILES,
    decode_estimate,
    estimate_for_target,
    get_profile,
    local_profile,
    measure_memory_bandwidth_gbs,
)

REPO = Path(__file__).resolve().parents[2]
# Measured here (busy shared 2-core EPYC, 1 thread): roofline / measured was 1.7 for a 110M fp32 model,
# 2.4 for 60M, 3.9 for 29M and ~40 for stories260K (framework overhead per layer dominates small models).
FACTOR_FOR_WEIGHT_BOUND_MODELS = 5.0


def test_profiles_are_complete_and_sourced():
    assert {"raspberry-pi-5", "snapdragon-8-gen-3", "t4", "a100", "h100"} <= set(PROFILES)
    for p in PROFILES.values():
        assert p.memory_bandwidth_gbs > 0 and p.peak_gflops > 0 and p.memory_gb > 0
        assert p.kind in ("cpu", "gpu") and p.source
    with pytest.raises(InvalidArgument):
        get_profile("pdp-11")


def test_profiles_are_the_catalogues_targets_with_figures_and_answer_to_their_aliases():
    from tailor_runtime import targets

    assert set(PROFILES) == {t.name for t in targets.CATALOGUE if t.hardware is not None}
    pi = targets.TARGETS["raspberry-pi-5"]
    assert get_profile("raspberry-pi") == get_profile("raspberry-pi-5") == PROFILES["raspberry-pi-5"]
    assert (PROFILES["raspberry-pi-5"].memory_bandwidth_gbs, PROFILES["raspberry-pi-5"].memory_gb) == (
        pi.hardware.memory_bandwidth_gbs,
        pi.hardware.memory_gb,
    )
    assert "gguf" in pi.formats  # the same entry the exporter resolves
    with pytest.raises(InvalidArgument) as err:
        get_profile("pdp-11")
    assert err.value.message.startswith(
        "unknown hardware target 'pdp-11'; valid choices: a100, h100, raspberry-pi,"
    )
    with pytest.raises(InvalidArgument, match="'cpu-x86' has no roofline figures.*valid choices: a100"):
        get_profile("cpu-x86")  # an export target without vendor figures


def test_tailor_select_takes_the_old_target_name_and_refuses_one_without_figures(tmp_path):
    from support.benchmark_sample import sample_report

    from tailor_cli.main import main

    report = tmp_path / "report.json"
    report.write_text(sample_report().dump_json())
    assert main(["select", str(report), "--target", "raspberry-pi", "--json"]) == 0
    with pytest.raises(SystemExit):  # argparse: the choices are the targets with figures
        main(["select", str(report), "--target", "cpu-x86"])


def test_decode_is_bandwidth_bound_at_batch_1_and_compute_bound_at_large_batches():
    pi = get_profile("raspberry-pi-5")
    one = decode_estimate(pi, weight_bytes=440e6, parameters=110e6)
    assert one["bound"] == "memory bandwidth" and one["label"].startswith("estimate")
    assert one["tokens_per_s"] == pytest.approx(17.1e9 / 440e6)
    big = decode_estimate(pi, weight_bytes=440e6, parameters=110e6, batch=256)
    assert big["bound"] == "compute"
    assert big["tokens_per_s"] == pytest.approx(153.6e9 / (2 * 110e6))


def test_target_estimate_uses_measured_memory_on_cpus_and_weights_on_gpus():
    metrics = {"model_memory_mb": 1000.0, "peak_memory_mb": 1500.0, "latency_ms_per_token": 10.0,
               "latency_p95_ms": 12.0}  # fmt: skip
    pi = estimate_for_target(get_profile("raspberry-pi-5"), metrics)
    assert pi["est_memory_mb"] == 1500.0 and pi["est_fits"] == 1.0
    assert pi["est_latency_p95_ms"] == pytest.approx(pi["est_latency_ms_per_token"] * 1.2)
    t4 = estimate_for_target(get_profile("t4"), {"model_memory_mb": 20_000.0})
    assert t4["est_memory_mb"] == pytest.approx(24_000.0) and t4["est_fits"] == 0.0
    assert estimate_for_target(get_profile("t4"), metrics)["est_tokens_per_s"] > pi["est_tokens_per_s"]
    # Measured on a GPU: peak_memory_mb is GPU memory there; a CPU target takes the process's RSS.
    measured_on_gpu = {**metrics, "peak_memory_mb": 1100.0, "peak_rss_mb": 2500.0}
    assert estimate_for_target(get_profile("raspberry-pi-5"), measured_on_gpu)["est_memory_mb"] == 2500.0


def test_roofline_module_imports_no_torch():
    code = "import sys, tailor_runtime.roofline; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_estimator_against_this_machine():
    """The machine's own probed profile predicts measured decode speed within the stated factor."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailor_benchmarker.child import torch_weight_bytes
    from tailor_benchmarker.latency import decode_latency
    from tailor_runtime.ml.model_io import load_causal_lm

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    gflops = 10 * 2 * 512**3 / (time.perf_counter() - start) / 1e9
    here = local_profile(measure_memory_bandwidth_gbs(), gflops, memory_gb=1.0)

    small, tokenizer = load_causal_lm(REPO / "examples/models/stories260K")
    torch.manual_seed(0)
    # ~60M parameters, random weights: few wide layers, so streaming the weights dominates a step.
    config = LlamaConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2816,
                         vocab_size=8000, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip
    wide = LlamaForCausalLM(config).eval()
    for model, bounded in ((small, False), (wide, True)):
        measured = decode_latency(model, tokenizer, new_tokens=8, warmup=1, repetitions=2)["tokens_per_s"]
        params = sum(p.numel() for p in model.parameters())
        estimated = decode_estimate(here, torch_weight_bytes(model), params)["tokens_per_s"]
        ratio = estimated / measured
        print(f"{params / 1e6:.1f}M parameters: measured {measured:.1f}, estimated {estimated:.1f} tokens/s")
        assert ratio >= 1.0  # an upper bound
        if bounded:
            assert ratio <= FACTOR_FOR_WEIGHT_BOUND_MODELS
