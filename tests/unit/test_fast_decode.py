"""The static-cache decoder computes what Hugging Face generate computes (real model, CPU, eager)."""

from pathlib import Path

import pytest
import torch

from tailor_runtime.ml.fast_decode import StaticDecoder
from tailor_runtime.ml.model_io import load_causal_lm

MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "stories260K"
# Both decode the real model 40 tokens at a time: seconds each (make test-fast leaves them out).
pytestmark = pytest.mark.slow


def test_greedy_tokens_equal_hf_generate():
    model, tok = load_causal_lm(MODEL)
    prompt = torch.tensor([tok("Once upon a time")["input_ids"]])
    reference = model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)[
        0, prompt.shape[1] :
    ]
    decoder = StaticDecoder(model, max_len=64, compile=False)
    tokens, timing = decoder.generate(prompt, 40)
    assert tokens == reference.tolist()
    assert timing.tokens_per_s > 0 and len(timing.per_token_ms) == 39
    # Twice with one decoder: the static cache is reset between generations.
    assert decoder.generate(prompt, 40)[0] == tokens


def test_a_step_that_fails_to_compile_runs_eagerly_and_says_why():
    model, tok = load_causal_lm(MODEL)
    prompt = torch.tensor([tok("Once upon a time")["input_ids"]])
    expected, _ = StaticDecoder(model, max_len=32, compile=False).generate(prompt, 8)
    decoder = StaticDecoder(model, max_len=32, compile=False)

    def fails_to_compile(*args):  # what torch.compile raises on a graph it cannot capture
        raise RuntimeError("Unsupported: graph break in a quantized kernel\nmore detail")

    decoder._step = fails_to_compile
    assert decoder.compiled
    tokens, _ = decoder.generate(prompt, 8)
    assert tokens == expected and not decoder.compiled
    assert decoder.compile_error == "RuntimeError: Unsupported: graph break in a quantized kernel"
