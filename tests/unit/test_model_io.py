"""Model folder formats: the tailor_format.json contract and the hf-safetensors round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor_runtime.errors import InvalidArgument, NotFound
from tailor_runtime.ml.model_io import (
    folder_size_bytes,
    load_causal_lm,
    read_format,
    save_hf_model,
    write_format,
)

MODEL = Path(__file__).resolve().parents[2] / "examples" / "models" / "stories260K"


def test_a_folder_without_format_file_or_config_is_not_a_model(tmp_path):
    with pytest.raises(InvalidArgument, match="neither tailor_format.json nor config.json"):
        read_format(tmp_path)


def test_unknown_declared_format_lists_the_formats(tmp_path):
    (tmp_path / "tailor_format.json").write_text('{"format": "ggml"}')
    with pytest.raises(InvalidArgument) as err:
        read_format(tmp_path)
    for name in (
        "bnb-nf4",
        "compressed-tensors",
        "gguf",
        "hf-safetensors",
        "int8-dynamic",
        "onnx",
        "executorch",
    ):
        assert name in err.value.message


@pytest.mark.parametrize("content", ['{"format": "ggml"}', "[1, 2]", "not json", '{"dtype": "float32"}'])
def test_unknown_or_broken_format_is_invalid_argument(tmp_path, content):
    (tmp_path / "tailor_format.json").write_text(content)
    with pytest.raises(InvalidArgument, match="tailor_format.json"):
        read_format(tmp_path)


def test_missing_folder_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        read_format(tmp_path / "nope")


def test_write_format_is_reproducible(tmp_path):
    write_format(tmp_path, "int8-dynamic", dtype="float32", quantized_layers=3)
    first = (tmp_path / "tailor_format.json").read_bytes()
    write_format(tmp_path, "int8-dynamic", quantized_layers=3, dtype="float32")
    assert (tmp_path / "tailor_format.json").read_bytes() == first
    assert json.loads(first) == {"format": "int8-dynamic", "dtype": "float32", "quantized_layers": 3}
    with pytest.raises(InvalidArgument):
        write_format(tmp_path, "tflite")


def test_hf_safetensors_round_trip_in_bfloat16(tmp_path):
    import torch

    model, tok = load_causal_lm(MODEL)
    assert not model.training and model.device.type == "cpu" and model.dtype == torch.float32
    save_hf_model(model, tok, tmp_path / "bf16", dtype="bfloat16")
    assert read_format(tmp_path / "bf16") == {"format": "hf-safetensors", "dtype": "bfloat16"}
    again, tok2 = load_causal_lm(tmp_path / "bf16")
    assert again.dtype == torch.bfloat16
    assert tok2("Once upon a time")["input_ids"] == tok("Once upon a time")["input_ids"]
    assert folder_size_bytes(tmp_path / "bf16") < 0.6 * folder_size_bytes(MODEL)
    with pytest.raises(InvalidArgument, match="dtype"):
        save_hf_model(model, tok, tmp_path / "x", dtype="float8")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["int8-dynamic", "onnx", "gguf"])
def test_cpu_only_formats_are_refused_on_a_gpu_before_loading(tmp_path, fmt):
    from tailor_runtime.errors import FailedPrecondition

    write_format(tmp_path, fmt)  # no weights: the refusal comes before any loading
    with pytest.raises(FailedPrecondition, match=rf"a '{fmt}' model runs on CPU only.*hf-safetensors"):
        load_causal_lm(tmp_path, device="cuda")
