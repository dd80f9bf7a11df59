"""GGUF export of the bundled real model (stories260K), verified by dequantization and in llama.cpp.

The llama.cpp tests need llama-cpp-python (requirements-llamacpp.txt, a 10-15 minute source build). Without
it they skip, saying why; with TAILOR_REQUIRE_LLAMA_CPP=1 (CI) its absence fails them instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from support.optional import require_llama_cpp

from tailor_exporter.gguf_export import NOT_INSTALLED, TOLERANCES, GgufExportConfig, export_gguf
from tailor_runtime.errors import FailedPrecondition, InvalidArgument, VerificationFailed
from tailor_runtime.ml import gguf_io, gguf_vocab, llama_cpp_convert
from tailor_runtime.ml.formats.gguf import save_gguf_folder
from tailor_runtime.ml.formats.int8_dynamic import save_quantized
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.progress import no_progress

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
HAS_LLAMA_CPP, WHY_NOT = gguf_io.llama_cpp_availability()
TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf-export")
    return {
        t: (root / t, export_gguf(MODEL, root / t, GgufExportConfig(type=t), no_progress))
        for t in TYPES
        if HAS_LLAMA_CPP or t != "Q4_K_M"
    }


@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.slow
def test_each_type_exports_a_verified_loadable_folder(exports, gguf_type):
    if gguf_type == "Q4_K_M":
        require_llama_cpp()
    out, result = exports[gguf_type]
    assert {"model.gguf", "Modelfile", "config.json", "tokenizer.json", "tailor_format.json"} <= set(
        result["files"]
    )
    assert {"verification.json", "LICENSE", "README.md"} <= set(result["files"])
    assert result["format"]["format"] == "gguf" and result["format"]["gguf_type"] == gguf_type
    check, tol = result["verification"]["checks"]["dequantized"], TOLERANCES[gguf_type]
    assert check["passed"] and check["positions"] > 100
    assert check["max_abs_diff"] <= tol["atol"] and check["top1_agreement"] >= tol["top1"]
    assert result["verification"]["max_abs_diff"] == check["max_abs_diff"]  # flat headline for metrics
    saved = json.loads((out / "verification.json").read_text())
    assert saved["checks"]["dequantized"] == check and saved["versions"]["gguf"] == "0.19.0"
    print(f"{gguf_type}: {result['gguf_bytes']} bytes, {result['tensor_types']}, {result['verification']}")
    model, tok = load_causal_lm(out)
    assert tok("Once upon a time")["input_ids"] == [1, 403, 407, 261, 378]
    assert not list(out.parent.glob(".*partial*"))


@pytest.mark.slow
def test_q4_k_m_holds_what_llama_cpp_could_make_of_64_wide_rows(exports):
    require_llama_cpp()
    _, result = exports["Q4_K_M"]
    # K-quants need rows of 256: llama.cpp fell back to Q5_0 (Q4_K's fallback) and Q8_0 (Q6_K's, for the
    # output / tied embedding and 2 of the 5 attn_v), and to F16 for ffn_down (172 wide fits no block).
    assert result["tensor_types"] == {"F16": 5, "F32": 11, "Q5_0": 28, "Q8_0": 3}
    assert "Q4_K" not in result["tensor_types"] and result["fallback_tensors"] == 36


@pytest.mark.parametrize("gguf_type", TYPES)
@pytest.mark.slow
def test_llama_cpp_runs_the_export_like_the_source(exports, gguf_type):
    require_llama_cpp()
    _, result = exports[gguf_type]
    headline, tol = result["verification"], TOLERANCES[gguf_type]
    assert headline["llama_cpp"].startswith("verified with llama-cpp-python ")
    assert headline["llama_cpp_tokenizer_agreement"] == 1.0  # llama.cpp's own tokenizer gives the same ids
    assert headline["llama_cpp_max_abs_diff"] <= tol["llama_atol"]
    assert headline["llama_cpp_top1_agreement"] >= tol["llama_top1"]
    assert headline["llama_cpp_greedy_agreement"] >= tol["greedy"]
    if gguf_type in ("F16", "Q8_0"):  # measured: every greedy token equal to the source's
        assert headline["llama_cpp_greedy_agreement"] == 1.0


@pytest.mark.slow
def test_llama_cpp_completes_text_as_transformers_generates_it(exports):
    """End to end in llama.cpp: its tokenizer, greedy sampler, stop tokens and detokenizer."""
    require_llama_cpp()
    from llama_cpp import Llama

    out, _ = exports["F16"]
    model, tok = load_causal_lm(MODEL)
    prompt = "Once upon a time, there was a little dog"
    with torch.inference_mode():
        ids = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=40, do_sample=False)
    # The whole text: decoding only the continuation would strip its leading space (SentencePiece decoding).
    want = tok.decode(ids[0], skip_special_tokens=True)
    llm = Llama(model_path=str(out / "model.gguf"), n_ctx=128, verbose=False, seed=0)
    try:
        out = llm.create_completion(prompt, max_tokens=40, temperature=0.0, repeat_penalty=1.0)
        got = out["choices"][0]["text"]
    finally:
        llm.close()
    assert len(want) > len(prompt) + 40 and prompt + got == want


@pytest.mark.slow
def test_a_tokenizer_llama_cpp_reads_differently_fails_verification(monkeypatch, tmp_path):
    """llama.cpp's converter writes score -1000 for every token of a BPE tokenizer.json; its SPM tokenizer
    then merges in text order. The llama.cpp check must catch that, not publish it."""
    require_llama_cpp()
    real = gguf_vocab.spm_vocab

    def flat_scores(*args):
        tokens, scores, types = real(*args)
        return tokens, [-1000.0] * len(scores), types

    monkeypatch.setattr(gguf_vocab, "spm_vocab", flat_scores)
    with pytest.raises(VerificationFailed, match="llama.cpp tokenizes .* of the samples differently"):
        export_gguf(MODEL, tmp_path / "out", GgufExportConfig(type="F16"), no_progress)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_without_llama_cpp_the_metrics_say_so(monkeypatch, tmp_path):
    monkeypatch.setattr(
        gguf_io, "llama_cpp_availability", lambda: (False, "llama-cpp-python is not importable")
    )
    result = export_gguf(MODEL, tmp_path / "q8", GgufExportConfig(type="Q8_0"), no_progress)
    assert result["verification"]["llama_cpp"] == NOT_INSTALLED
    assert set(result["verification"]["checks"]) == {"dequantized"}
    assert not any(k.startswith("llama_cpp_") for k in result["verification"])
    with pytest.raises(FailedPrecondition, match="Q4_K_M is made by llama.cpp's quantizer"):
        export_gguf(MODEL, tmp_path / "q4km", GgufExportConfig(type="Q4_K_M"), no_progress)


@pytest.mark.slow
def test_modelfile_runs_the_gguf_as_a_plain_text_story_model(exports):
    out, _ = exports["Q8_0"]
    lines = (out / "Modelfile").read_text().splitlines()
    directives = [line for line in lines if line and not line.startswith("#")]
    assert directives == [
        "FROM ./model.gguf",
        'TEMPLATE """{{ .Prompt }}"""',
        'PARAMETER stop "</s>"',
        'PARAMETER stop "<s>"',
        "PARAMETER num_ctx 512",
    ]


@pytest.mark.slow
def test_export_is_byte_identical_when_repeated(exports, tmp_path):
    first, _ = exports["Q8_0"]
    export_gguf(MODEL, tmp_path / "again", GgufExportConfig(type="Q8_0"), no_progress)
    assert file_hashes(tmp_path / "again") == file_hashes(first)


@pytest.mark.slow
def test_a_file_that_computes_something_else_fails_and_publishes_nothing(monkeypatch, tmp_path):
    # The converter's file with every layer's Q and K rows reversed (what a wrong RoPE permutation does):
    # the checks must see the difference and nothing may be published.
    import gguf

    convert = llama_cpp_convert.convert

    def convert_then_scramble(model_dir, out_path, gguf_type, name=None):
        convert(model_dir, out_path, gguf_type, name)
        for tensor in gguf.GGUFReader(out_path, "r+").tensors:
            if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
                tensor.data[:] = tensor.data[::-1].copy()

    monkeypatch.setattr(llama_cpp_convert, "convert", convert_then_scramble)
    with pytest.raises(
        VerificationFailed, match=r"dequantized check over \d+ positions.*top-1 agreement 0\.\d+ <"
    ):
        export_gguf(MODEL, tmp_path / "out", GgufExportConfig(type="F16"), no_progress)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow
def test_a_quantizer_gguf_is_published_as_it_is(tmp_path):
    save_gguf_folder(MODEL, tmp_path / "q8", "Q8_0")  # what the gguf_q8_0 method writes
    result = export_gguf(tmp_path / "q8", tmp_path / "out", GgufExportConfig(type="Q8_0"), no_progress)
    assert (tmp_path / "out/model.gguf").read_bytes() == (tmp_path / "q8/model.gguf").read_bytes()
    assert result["format"]["gguf_type"] == "Q8_0" and result["tensor_types"] == {
        "F16": 5,
        "F32": 11,
        "Q8_0": 31,
    }
    assert result["verification"]["max_abs_diff"] == 0.0  # against its own dequantized weights
    assert json.loads((tmp_path / "out/verification.json").read_text())["reference"] == "gguf"
    assert (tmp_path / "out/Modelfile").read_text().startswith("# Ollama Modelfile for q8 (GGUF Q8_0)")
    with pytest.raises(InvalidArgument, match="already GGUF Q8_0; it can only be exported as that type"):
        export_gguf(tmp_path / "q8", tmp_path / "f16", GgufExportConfig(type="F16"), no_progress)


def test_unsupported_sources_are_refused_before_anything_is_written(tmp_path):
    model, tok = load_causal_lm(MODEL)
    save_quantized(model, tok, tmp_path / "int8")
    with pytest.raises(InvalidArgument, match="valid choices: gguf, hf-safetensors"):
        export_gguf(tmp_path / "int8", tmp_path / "a", GgufExportConfig(), no_progress)
    falcon = tmp_path / "falcon"  # a family the architecture registry does not know
    shutil.copytree(MODEL, falcon)
    config = json.loads((falcon / "config.json").read_text())
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (falcon / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="'falcon'.*not an architecture Tailor supports yet"):
        export_gguf(falcon, tmp_path / "b", GgufExportConfig(), no_progress)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_is_strict_and_takes_struct_numbers():
    assert GgufExportConfig().type == "Q8_0"
    cfg = GgufExportConfig.model_validate({"type": "Q4_0", "greedy_tokens": 8.0, "atol": 3.0})
    assert cfg.greedy_tokens == 8 and cfg.tolerance()["llama_atol"] == 3.0
    assert cfg.tolerance()["top1"] == TOLERANCES["Q4_0"]["top1"]
    for bad in (
        {"type": "Q3_K"},
        {"type": "q8_0"},
        {"greedy_tokens": 2.5},
        {"min_top1_agreement": 2.0},
        {"x": 1},
    ):
        with pytest.raises(ValidationError):
            GgufExportConfig.model_validate(bad)
