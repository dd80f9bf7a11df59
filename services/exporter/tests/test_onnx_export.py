"""ONNX export of the bundled real model (stories260K), verified in ONNX Runtime against PyTorch."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from tailor_exporter import onnx_export, onnx_verify
from tailor_exporter.onnx_export import OnnxExportConfig, export_onnx
from tailor_runtime.errors import FailedPrecondition, InvalidArgument, VerificationFailed
from tailor_runtime.ml.formats.int8_dynamic import save_quantized
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.progress import no_progress

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
# torch 2.13 deprecates torch.ao's quantized modules (still functional; see formats/int8_dynamic.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export") / "stories260K-onnx"
    return out, export_onnx(MODEL, out, OnnxExportConfig(), no_progress)


def test_export_passes_verification_and_writes_a_complete_folder(exported):
    out, result = exported
    check = result["verification"]["checks"]["float_graph"]
    assert result["verification"]["max_abs_diff"] == check["max_abs_diff"]  # flat headline for metrics
    assert check["passed"] and check["max_abs_diff"] < 1e-3 and check["top1_agreement"] >= 0.99
    assert check["positions"] > 100
    assert {
        "model.onnx",
        "config.json",
        "tokenizer.json",
        "tailor_format.json",
        "verification.json",
        "LICENSE",
    } <= set(result["files"])
    fmt = json.loads((out / "tailor_format.json").read_text())
    assert fmt["format"] == "onnx" and fmt["opset"] == 18 and fmt["weights"] == "float32"
    assert json.loads((out / "verification.json").read_text())["checks"]["float_graph"]["passed"]
    assert not list(out.parent.glob(".*partial*"))  # the work folder is gone


def test_exported_graph_has_dynamic_batch_and_sequence(exported):
    out, _ = exported
    model, tokenizer = load_causal_lm(MODEL)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.tensor([tokenizer("Once upon a time, there was a big dog named Max.")["input_ids"]] * 4)
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    assert got.shape == (4, ids.shape[1], 512)
    assert np.abs(got - want).max() < 1e-3


def test_export_is_byte_identical_when_repeated(exported, tmp_path):
    first, _ = exported
    export_onnx(MODEL, tmp_path / "again", OnnxExportConfig(), no_progress)
    assert file_hashes(tmp_path / "again") == file_hashes(first)


def test_an_export_that_computes_something_else_fails_and_publishes_nothing(exported, tmp_path, monkeypatch):
    first, _ = exported
    # Reuse the good graph (no second export), and compare it with logits that are off by 0.01.
    monkeypatch.setattr(
        onnx_export, "_export_graph", lambda model, path, opset: shutil.copyfile(first / "model.onnx", path)
    )
    real_reference = onnx_verify.reference_logits
    monkeypatch.setattr(onnx_verify, "reference_logits", lambda *args: real_reference(*args) + 0.01)
    out = tmp_path / "corrupted"
    with pytest.raises(
        VerificationFailed, match=r"max \|logit difference\| 0\.01 > atol 0\.001.*nothing was published"
    ):
        export_onnx(MODEL, out, OnnxExportConfig(), no_progress)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a work folder


def test_int8_source_is_exported_as_onnx_runtime_int8(exported, tmp_path):
    model, tokenizer = load_causal_lm(MODEL)
    save_quantized(model, tokenizer, tmp_path / "int8")
    result = export_onnx(tmp_path / "int8", tmp_path / "int8-onnx", OnnxExportConfig(), no_progress)
    checks = result["verification"]["checks"]
    assert result["verification"]["top1_agreement"] == checks["source"]["top1_agreement"]
    assert (
        result["format"]["weights"] == "int8-dynamic" and result["format"]["source_format"] == "int8-dynamic"
    )
    assert checks["float_graph"]["passed"] and checks["float_graph"]["max_abs_diff"] < 1e-3
    assert (
        checks["source"]["passed"]
        and checks["source"]["top1_agreement"] >= onnx_export.INT8_MIN_TOP1_AGREEMENT
    )
    assert result["files"]["model.onnx"] < 0.6 * exported[1]["files"]["model.onnx"]
    assert "float.onnx" not in result["files"]


@pytest.mark.slow
def test_nf4_with_dequantize_exports_the_rounded_weights(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tailor_runtime.ml.model_io import load_tokenizer, write_format

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    nf4 = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=quantization, device_map="cpu")
    nf4.save_pretrained(tmp_path / "nf4")
    load_tokenizer(MODEL).save_pretrained(tmp_path / "nf4")
    write_format(tmp_path / "nf4", "bnb-nf4", dtype="float32")

    result = export_onnx(
        tmp_path / "nf4", tmp_path / "nf4-onnx", OnnxExportConfig(dequantize=True), no_progress
    )
    source = result["verification"]["checks"]["source"]  # ONNX Runtime against the bitsandbytes model itself
    assert source["passed"] and source["max_abs_diff"] < 1e-3 and source["top1_agreement"] >= 0.99
    assert result["format"]["weights"] == "float32" and result["format"]["source_format"] == "bnb-nf4"
    assert "quantization_config" not in json.loads((tmp_path / "nf4-onnx" / "config.json").read_text())


def test_nf4_needs_dequantize(tmp_path):
    (tmp_path / "tailor_format.json").write_text('{"format": "bnb-nf4", "dtype": "float32"}')
    with pytest.raises(InvalidArgument, match="dequantize=true") as info:
        export_onnx(tmp_path, tmp_path / "out", OnnxExportConfig(), no_progress)
    assert "parent" in info.value.message
    assert not (tmp_path / "out").exists()


def test_formats_that_cannot_be_exported_list_the_ones_that_can(tmp_path):
    (tmp_path / "tailor_format.json").write_text('{"format": "peft-lora"}')
    with pytest.raises(InvalidArgument, match="valid choices: bnb-nf4, hf-safetensors, int8-dynamic"):
        export_onnx(tmp_path, tmp_path / "out", OnnxExportConfig(), no_progress)


def test_an_existing_destination_is_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="not empty"):
        export_onnx(MODEL, tmp_path / "out", OnnxExportConfig(), no_progress)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_config_is_strict():
    assert OnnxExportConfig().opset == 18 and OnnxExportConfig().atol == 1e-3
    assert (
        OnnxExportConfig.model_validate({"opset": 17.0, "verify_batches": 4.0}).opset == 17
    )  # from a Struct
    for bad in (
        {"opset": 16},
        {"opset": "18"},
        {"opset": 18.5},
        {"atol": -1.0},
        {"min_top1_agreement": 1.5},
        {"target": "gguf"},
    ):
        with pytest.raises(ValidationError):
            OnnxExportConfig(**bad)
