"""Quantization-aware fine-tuning of the real stories260K: after QAT, int4 rounding costs less."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from support.threads import torch_threads

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.ml.perplexity import perplexity
from tailor_runtime.progress import no_progress
from tailor_trainer.data import BatchSampler, load_token_stream
from tailor_trainer.loop import train
from tailor_trainer.qat import QatTrainConfig, finetune_qat, prepare_fake_quantization

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
TRAIN = REPO / "examples" / "data" / "tinystories_train.txt"
EVAL = REPO / "examples" / "data" / "tinystories_eval.txt"
CFG = QatTrainConfig(steps=60, learning_rate=3e-4, batch_size=8, seq_len=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):  # see support.threads
        yield


def _ppl(model, tok) -> float:
    text = EVAL.read_text()
    return perplexity(model, tok, text, context_length=256, stride=128, max_tokens=4096)["perplexity"]


def _int4(model):
    """The model as it runs after int4 rounding: the same per-channel symmetric quantizer QAT trained with."""
    rounded = copy.deepcopy(model)
    prepare_fake_quantization(rounded, CFG)
    return rounded.eval()


@pytest.fixture(scope="module")
def qat_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "model"
    metrics = finetune_qat(MODEL, TRAIN, out, CFG, no_progress)
    assert metrics["fake_quantized_layers"] == 35 and metrics["steps"] == 60
    return out


@pytest.mark.slow
def test_qat_output_is_a_plain_float_model_that_records_qat(qat_dir):
    fmt = json.loads((qat_dir / "tailor_format.json").read_text())
    assert fmt["format"] == "hf-safetensors" and fmt["qat"] == {
        "weight_bits": 4,
        "group_size": None,
        "activation_bits": None,
    }
    model, _ = load_causal_lm(qat_dir)
    assert all(type(m) is not torch.nn.Module for m in model.modules())
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == 36  # 35 + lm_head, no fake quantizers


@pytest.mark.slow
def test_int4_after_qat_loses_less_than_int4_after_plain_training(qat_dir):
    qat_model, tok = load_causal_lm(qat_dir)
    plain, _ = load_causal_lm(MODEL)
    stream = load_token_stream(TRAIN, tok, CFG.seq_len)
    sampler = BatchSampler(stream, CFG.batch_size, CFG.seq_len, CFG.seed)
    train(plain, list(plain.parameters()), sampler.batch, CFG.steps, CFG.learning_rate, no_progress)
    plain_float, plain_int4 = _ppl(plain, tok), _ppl(_int4(plain), tok)
    qat_int4 = _ppl(_int4(qat_model), tok)
    print(f"plain float {plain_float:.4f}, plain->int4 {plain_int4:.4f}, QAT->int4 {qat_int4:.4f}")
    # Measured: 3.41 float, 4.02 after int4 rounding, 3.75 with QAT: QAT recovers 44% of the loss.
    assert qat_int4 < plain_int4 - 0.3 * (plain_int4 - plain_float)


def test_group_size_must_divide_every_layer():
    model, _ = load_causal_lm(MODEL)
    with pytest.raises(InvalidArgument, match=r"group_size 32 does not divide the input widths \[172\]"):
        prepare_fake_quantization(model, CFG.model_copy(update={"group_size": 32}))
