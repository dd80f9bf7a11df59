"""Quantization methods that need a GPU, run for real on the bundled stories260K model.

Run on a machine with an FP8 GPU (compute capability 8.9: L4, H100, ...) through the device tool:
    python -m pytest -m gpu services/quantizer/tests/test_gpu_methods.py
CI deselects them (-m "not gpu"); without such a GPU they are skipped, never counted as passing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor_quantizer.methods import QuantizeJob, get_method, parse_config
from tailor_runtime.ml.model_io import load_causal_lm, read_format
from tailor_runtime.ml.perplexity import perplexity
from tailor_runtime.progress import no_progress

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
EVAL = REPO / "examples" / "data" / "tinystories_eval.txt"
EVAL_TOKENS = 4096

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def fp8_gpu():
    ok, why = get_method("fp8").availability()
    if not ok:
        pytest.skip(f"fp8 cannot run here: {why}")


def _ppl(folder: Path) -> float:
    model, tok = load_causal_lm(folder)
    text = EVAL.read_text()
    return perplexity(model, tok, text, context_length=256, stride=128, max_tokens=EVAL_TOKENS)["perplexity"]


def test_fp8_quantizes_on_cuda_and_keeps_quality(fp8_gpu, tmp_path):
    import torch
    from safetensors import safe_open

    method = get_method("fp8")
    torch.cuda.reset_peak_memory_stats()
    metrics = method.run(
        MODEL, tmp_path, parse_config(method, {}), QuantizeJob(progress=no_progress, device="cuda")
    )
    assert torch.cuda.max_memory_allocated() > 0, "nothing ran on the GPU"
    fmt = read_format(tmp_path)
    assert fmt["format"] == "compressed-tensors" and fmt["scheme"] == "FP8_DYNAMIC"
    assert metrics["quantized_layers"] == 35
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert (group["weights"]["type"], group["weights"]["num_bits"], group["weights"]["strategy"]) == (
        "float",
        8,
        "channel",
    )
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
    # Measured on CPU (same arithmetic): float 3.500, fp8 3.543 (+1.2%); allow 3%.
    base, quantized = _ppl(MODEL), _ppl(tmp_path)
    print(f"fp8: perplexity {quantized:.4f} vs {base:.4f}; {metrics['weight_bytes']} weight bytes")
    assert quantized <= base * 1.03
