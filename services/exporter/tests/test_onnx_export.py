"""ONNX exports of the bundled real model (stories260K), verified in ONNX Runtime against PyTorch."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from pydantic import ValidationError

from tailor_exporter import onnx_export
from tailor_exporter.onnx_export import TOLERANCES, OnnxExportConfig
from tailor_exporter.registry import ExportJob, get_format, list_formats
from tailor_runtime.errors import FailedPrecondition, InvalidArgument, VerificationFailed
from tailor_runtime.ml.formats.int8_dynamic import save_quantized
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.ml.onnx import export as onnx_export_core
from tailor_runtime.ml.onnx import optimize, verify
from tailor_runtime.ml.onnx.session import OnnxCausalLM
from tailor_runtime.progress import no_progress

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
CALIBRATION = REPO / "examples/data/tinystories_train.txt"
VARIANTS = ("onnx-fp16", "onnx-int8", "onnx-int8-static", "ort")
# torch 2.13 deprecates torch.ao's quantized modules (still functional; see formats/int8_dynamic.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run(variant: str, out: Path, source: Path = MODEL, **config) -> dict:
    fmt = get_format(variant)
    return fmt.run(source, out, fmt.Config(**config), ExportJob(no_progress, calibration_file=CALIBRATION))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("export") / "stories260K-onnx"
    return out, run("onnx", out)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """The real torch.onnx.export of stories260K's float32 model, done once: (graph, MatMul scopes).

    The variants below start from it (a copy instead of tracing the same model again, 20 s each); what
    they test is what each does after the export. The `onnx` fixture and the repeat test trace for real.
    """
    model, _ = load_causal_lm(MODEL)
    graph = tmp_path_factory.mktemp("traced") / "exported.onnx"
    return graph, onnx_export_core.export_decoder(model, graph, 18)


def _replay(traced):
    """An export_decoder that copies the traced graph."""
    graph, scopes = traced

    def export_decoder(model, path, opset):
        shutil.copyfile(graph, path)
        return scopes

    return export_decoder


@pytest.fixture
def reuse_trace(traced, monkeypatch):
    monkeypatch.setattr(onnx_export_core, "export_decoder", _replay(traced))


@pytest.fixture(scope="module")
def variants(traced, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export_core, "export_decoder", _replay(traced))
        for variant in VARIANTS:
            out = tmp_path_factory.mktemp(variant) / "out"
            results[variant] = out, run(variant, out, **_small(variant))
    return results


def _small(variant: str) -> dict:
    return {"calibration_samples": 16, "calibration_seq_len": 128} if variant == "onnx-int8-static" else {}


@pytest.mark.slow
def test_export_passes_verification_and_writes_a_complete_folder(exported):
    out, result = exported
    checks = result["verification"]["checks"]
    assert result["verification"]["max_abs_diff"] == checks["published"]["max_abs_diff"]  # flat headline
    for name in ("exported", "published"):  # the raw export, then the optimized graph that is published
        check = checks[name]
        assert check["passed"] and check["max_abs_diff"] < 1e-3 and check["top1_agreement"] >= 0.99
        assert check["prefill"]["positions"] > 100 and check["decode"]["positions"] == 18  # 6 rows x 3
        assert check["decode"]["max_abs_diff"] < 1e-3
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
    assert fmt["kv_cache"] is True and fmt["model_file"] == "model.onnx" and fmt["variant"] == "onnx"
    assert result["fused_operators"]["SkipSimplifiedLayerNormalization"] == 10
    verification = json.loads((out / "verification.json").read_text())
    assert verification["checks"]["published"]["passed"]
    assert set(verification["versions"]) == {"torch", "transformers", "onnx", "onnxscript", "onnxruntime"}
    assert not list(out.parent.glob(".*partial*"))  # the work folder is gone


@pytest.mark.slow
def test_export_is_byte_identical_when_repeated(exported, tmp_path):
    first, _ = exported
    run("onnx", tmp_path / "again")
    assert file_hashes(tmp_path / "again") == file_hashes(first)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.slow
def test_every_variant_is_verified_with_and_without_past(variant, variants, exported):
    out, result = variants[variant]
    fmt = result["format"]
    weights = {"onnx-fp16": "float16", "onnx-int8": "int8-dynamic", "onnx-int8-static": "int8-static-qdq"}
    assert fmt["weights"] == weights.get(variant, "float32") and fmt["variant"] == variant
    published = result["verification"]["checks"]["published"]
    tolerance = TOLERANCES[fmt["weights"]]
    assert published["passed"] and published["atol"] == tolerance.atol
    assert published["min_top1_agreement"] == tolerance.min_top1_agreement
    assert published["decode"]["positions"] == 18 and published["prefill"]["positions"] > 100
    # The published file is what load_causal_lm runs, and it is the model the variant names.
    model, _ = load_causal_lm(out)
    assert isinstance(model, OnnxCausalLM) and model.path.name == fmt["model_file"]
    fp32_bytes = (exported[0] / "model.onnx").stat().st_size
    if variant == "ort":
        assert fmt["format"] == "ort" and fmt["model_file"] == "model.ort"
        assert (
            "ai.onnx;" in (out / "model.required_operators.config").read_text()
        )  # for a reduced mobile build
        assert published["max_abs_diff"] < 1e-3
        return
    counts = optimize.op_counts(out / "model.onnx")
    size = (out / "model.onnx").stat().st_size
    if variant == "onnx-fp16":
        graph = onnx.load(str(out / "model.onnx"))
        assert {t.data_type for t in graph.graph.initializer if len(t.dims) == 2} == {
            onnx.TensorProto.FLOAT16
        }
        assert 1e-4 < published["max_abs_diff"] < 0.5 and size < 0.6 * fp32_bytes
    elif variant == "onnx-int8":
        assert result["quantized_matmuls"] == 36 and counts["MatMulInteger"] == 36  # lm_head included
        assert published["top1_agreement"] >= 0.9 and size < 0.5 * fp32_bytes
    else:
        calibration = result["calibration"]
        assert calibration["calibrator"] == "minmax" and calibration["calibrated_tensors"] > 36
        assert calibration["calibration_samples"] == 16 and calibration["calibration_seq_len"] == 128
        assert counts["QuantizeLinear"] == 21 and published["top1_agreement"] >= 0.8
        assert size < 0.5 * fp32_bytes


@pytest.mark.parametrize("variant", [v for v in VARIANTS if get_format(v).deterministic])
@pytest.mark.slow
def test_variants_are_byte_identical_when_repeated(variant, variants, reuse_trace, tmp_path):
    first, _ = variants[variant]
    run(variant, tmp_path / "again", **_small(variant))
    assert file_hashes(tmp_path / "again") == file_hashes(first)


def test_static_int8_needs_calibration_data(tmp_path):
    fmt = get_format("onnx-int8-static")
    assert fmt.needs_calibration
    with pytest.raises(InvalidArgument, match="calibration_data"):
        fmt.run(MODEL, tmp_path / "out", fmt.Config(), ExportJob(no_progress))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_export_that_computes_something_else_fails_and_publishes_nothing(
    reuse_trace, tmp_path, monkeypatch
):
    real_reference = verify.reference_logits
    monkeypatch.setattr(verify, "reference_logits", lambda *args: real_reference(*args) + 0.01)
    out = tmp_path / "corrupted"
    with pytest.raises(
        VerificationFailed,
        match=r"exported check .* max \|logit difference\| 0\.01 > atol 0\.001.*nothing was published",
    ):
        run("onnx", out)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a work folder


@pytest.mark.slow
def test_int8_source_is_exported_as_onnx_runtime_int8(exported, tmp_path):
    model, tokenizer = load_causal_lm(MODEL)
    save_quantized(model, tokenizer, tmp_path / "int8")
    fmt = get_format("onnx")
    result = fmt.run(tmp_path / "int8", tmp_path / "int8-onnx", fmt.Config(), ExportJob(no_progress))
    checks = result["verification"]["checks"]
    assert result["verification"]["top1_agreement"] == checks["source"]["top1_agreement"]
    assert (
        result["format"]["weights"] == "int8-dynamic" and result["format"]["source_format"] == "int8-dynamic"
    )
    assert checks["exported"]["passed"] and checks["exported"]["max_abs_diff"] < 1e-3
    assert checks["source"]["passed"] and checks["source"]["top1_agreement"] >= 0.85
    # Exactly the source's 35 int8 layers; lm_head stays float as in the source.
    assert optimize.op_counts(tmp_path / "int8-onnx" / "model.onnx")["MatMulInteger"] == 35
    assert result["files"]["model.onnx"] < 0.6 * exported[1]["files"]["model.onnx"]
    assert [f for f in result["files"] if ".onnx" in f] == ["model.onnx"]  # no intermediate graph left


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

    fmt = get_format("onnx")
    result = fmt.run(
        tmp_path / "nf4", tmp_path / "nf4-onnx", fmt.Config(dequantize=True), ExportJob(no_progress)
    )
    source = result["verification"]["checks"]["source"]  # ONNX Runtime against the bitsandbytes model itself
    assert source["passed"] and source["max_abs_diff"] < 1e-3 and source["top1_agreement"] >= 0.99
    assert result["format"]["weights"] == "float32" and result["format"]["source_format"] == "bnb-nf4"
    assert "quantization_config" not in json.loads((tmp_path / "nf4-onnx" / "config.json").read_text())


def test_nf4_without_dequantize_is_refused_with_the_paths_that_work(tmp_path):
    (tmp_path / "tailor_format.json").write_text('{"format": "bnb-nf4", "dtype": "float32"}')
    for variant in ("onnx", "onnx-int8"):
        fmt = get_format(variant)
        with pytest.raises(InvalidArgument, match="dequantize=true") as info:
            fmt.run(tmp_path, tmp_path / "out", fmt.Config(), ExportJob(no_progress))
        assert "parent" in info.value.message and "onnx-int8" in info.value.message
    assert not (tmp_path / "out").exists()


def test_formats_that_cannot_be_exported_list_the_ones_that_can(tmp_path):
    (tmp_path / "tailor_format.json").write_text('{"format": "peft-lora"}')
    with pytest.raises(InvalidArgument, match="valid choices: bnb-nf4, hf-safetensors, int8-dynamic"):
        run("onnx", tmp_path / "out", source=tmp_path)


def test_an_existing_destination_is_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="not empty"):
        run("onnx", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_registry_lists_the_variants_and_unknown_names_fail():
    names = {fmt.name for fmt in list_formats()}
    assert {"onnx", *VARIANTS} <= names
    assert get_format("onnx-int8").tolerance == TOLERANCES["int8-dynamic"]
    assert get_format("ort").output_format == "ort" and get_format("onnx-fp16").output_format == "onnx"
    # Byte-reproducible, and tested so above, except the ORT format (ONNX Runtime's serializer).
    assert [fmt.name for fmt in list_formats() if not fmt.deterministic and fmt.name in VARIANTS] == ["ort"]
    with pytest.raises(InvalidArgument, match="valid choices: .*onnx-int8-static"):
        get_format("tflite")


def test_config_is_strict():
    assert OnnxExportConfig().opset == 18 and OnnxExportConfig().atol is None
    assert (
        OnnxExportConfig.model_validate({"opset": 17.0, "verify_batches": 4.0}).opset == 17
    )  # from a Struct
    assert onnx_export.Int8StaticConfig(calibrator="entropy").percentile == 99.999
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
    with pytest.raises(ValidationError):
        onnx_export.Int8StaticConfig(calibrator="kl")
