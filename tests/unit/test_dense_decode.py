"""Quantized folders decoded to dense float (tailor_runtime.ml.dense), and every Hugging Face-looking folder
Tailor writes loaded by plain transformers: it must compute what Tailor's own loader computes.

Real quantizer methods on tiny models of several families (tests/support/families.py): int8_dynamic,
nf4, fp4, llm_int8 (bitsandbytes) and rtn (compressed-tensors, llm-compressor)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from support.families import tiny_model
from support.threads import torch_threads

from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.ml.dense import decode_to_dense
from tailor_runtime.ml.model_io import load_causal_lm, read_format
from tailor_runtime.progress import no_progress

PROMPT = "Once upon a time, there was a little girl named Lily. She"
NEW_TOKENS = 24

# (family, method, config): the decode matrix. GPT-2's Conv1D layers: bitsandbytes quantizes them
# (transposed), int8_dynamic and llm-compressor refuse them (the architecture registry says so).
CASES = [
    ("llama", "int8_dynamic", {}),
    ("qwen2", "int8_dynamic", {}),
    ("phi3", "int8_dynamic", {}),
    ("llama", "nf4", {}),
    ("phi3", "nf4", {"double_quant": False}),
    ("gpt2", "nf4", {}),
    ("qwen2", "fp4", {}),
    ("llama", "llm_int8", {}),
    ("gpt2", "llm_int8", {}),
    ("llama", "rtn", {"group_size": 16}),
    ("qwen2", "rtn", {"bits": 8, "group_size": -1}),
    ("phi3", "rtn", {"group_size": 16, "symmetric": False}),
]


def _quantize(method: str, config: dict, src: Path, out: Path) -> Path:
    from tailor_quantizer.methods import QuantizeJob, get_method, parse_config

    m = get_method(method)
    ok, why = m.availability()
    if not ok:
        pytest.skip(f"{method} cannot run here: {why}")
    m.run(src, out, parse_config(m, config), QuantizeJob(progress=no_progress))
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):  # see support.threads
        yield


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_model(f, root / f) for f in {c[0] for c in CASES}}


def _greedy(model, tokenizer) -> list[int]:
    import torch

    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def _plain_transformers(folder: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


@pytest.mark.slow
@pytest.mark.parametrize(("family", "method", "config"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_decoded_folder_computes_what_the_candidate_computes(sources, tmp_path, family, method, config):
    import torch

    candidate_dir = _quantize(method, config, sources[family], tmp_path / "q")
    info = decode_to_dense(candidate_dir, tmp_path / "dense")
    source_format = read_format(candidate_dir)["format"]
    assert info["decoded_from"] == source_format and info["decoded_layers"] > 0
    fmt = read_format(tmp_path / "dense")
    assert fmt["format"] == "hf-safetensors" and fmt["decoded_from"] == source_format
    config_json = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config_json

    check = info["check"]
    assert check["passed"] and check["positions"] > 50
    if not check["activations_quantized"]:
        # Weight-only: the decoded weights are the candidate's own values; the logits agree to rounding.
        assert check["max_abs_diff"] <= 1e-2 and check["top1_agreement"] == 1.0
    else:
        assert check["top1_agreement"] >= 0.9

    # The decoded folder is plain float: its weights are exactly the dequantized candidate's.
    from safetensors.torch import load_file

    dense = load_file(tmp_path / "dense" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in dense.values())
    # Plain transformers loads it and generates what Tailor's loader of it generates.
    ours, tok = load_causal_lm(tmp_path / "dense")
    assert _greedy(_plain_transformers(tmp_path / "dense"), tok) == _greedy(ours, tok)


def test_int8_dynamic_weights_decode_exactly(sources, tmp_path):
    """int8 * scale, bit for bit: the decoded weight of every quantized layer is the stored grid."""
    import torch
    from safetensors.torch import load_file

    q = _quantize("int8_dynamic", {}, sources["llama"], tmp_path / "q")
    decode_to_dense(q, tmp_path / "dense")
    stored, dense = load_file(q / "model.safetensors"), load_file(tmp_path / "dense" / "model.safetensors")
    layers = [k[: -len(".weight_scale")] for k in stored if k.endswith(".weight_scale")]
    assert len(layers) == read_format(q)["quantized_layers"] > 0
    for name in layers:
        expected = stored[f"{name}.weight"].float() * stored[f"{name}.weight_scale"].float()
        assert torch.equal(dense[f"{name}.weight"], expected), name


def test_dense_and_unknown_sources_are_refused_with_what_decodes(sources, tmp_path):
    with pytest.raises(InvalidArgument, match="already is dense") as err:
        decode_to_dense(sources["llama"], tmp_path / "dense")
    assert "int8-dynamic" in str(err.value.choices) and "compressed-tensors" in str(err.value.choices)
    q = _quantize("int8_dynamic", {}, sources["llama"], tmp_path / "q")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FailedPrecondition, match="not empty"):
        decode_to_dense(q, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["x"]


# --- every Hugging Face-looking folder in plain transformers ---------------------------------------------

HF_LOOKING = [
    ("llama", "bf16", {}),
    ("llama", "int8_dynamic", {}),
    ("qwen2", "int8_dynamic", {}),
    ("phi3", "int8_dynamic", {}),
    ("llama", "nf4", {}),
    ("llama", "llm_int8", {}),
    ("llama", "rtn", {"group_size": 16}),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "method", "config"), HF_LOOKING, ids=[f"{c[0]}-{c[1]}" for c in HF_LOOKING]
)
def test_plain_transformers_generates_what_tailor_generates(sources, tmp_path, family, method, config):
    """`AutoModelForCausalLM.from_pretrained(folder)` either computes what Tailor's loader computes or
    raises; never loads silently wrong. int8-dynamic folders carry a compressed-tensors
    quantization_config describing their int8 weights and per-call activation rounding exactly."""
    import torch

    folder = _quantize(method, config, sources[family], tmp_path / "q")
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    ours, tok = load_causal_lm(folder)
    plain = _plain_transformers(folder)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.inference_mode():
        a, b = ours(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    # bitsandbytes: plain transformers lets it repack NF4 for its AVX512-BF16 CPU kernel, which Tailor's
    # loader turns off (tailor_runtime.ml.formats.bnb): the same weights, products rounded differently.
    assert (a - b).abs().max().item() <= (2e-2 if method in ("nf4", "llm_int8") else 1e-4)
    assert _greedy(plain, tok) == _greedy(ours, tok)
    if method == "int8_dynamic":
        quant = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "int-quantized"
        assert (
            read_format(folder)["activation_bits"]
            == quant["config_groups"]["group_0"]["input_activations"]["num_bits"]
        )
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in ours.modules())


def test_int8_dynamic_refuses_a_model_without_linear_layers(sources, tmp_path):
    """GPT-2's projections are Conv1D: refused by the registry, and by the format itself when called."""
    from tailor_runtime.ml import architectures
    from tailor_runtime.ml.formats.int8_dynamic import save_quantized

    with pytest.raises(InvalidArgument, match="Conv1D"):
        architectures.require(architectures.get("gpt2"), "quantize/int8_dynamic")
    gpt2 = tiny_model("gpt2", tmp_path / "gpt2")
    model, tok = load_causal_lm(gpt2)
    with pytest.raises(InvalidArgument, match="has none besides its output head"):
        save_quantized(model, tok, tmp_path / "q")
    assert not (tmp_path / "q").exists()
