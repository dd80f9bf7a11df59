"""The llm-compressor methods beyond "it runs" (test_methods.py runs each): checks before any work, GPTQ
and AWQ against round-to-nearest at the same bits and group size, 3-bit GPTQ, and automatic mixed
precision against uniform quantization of at least its size. All on the bundled stories260K model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tailor_quantizer import llm_compressor as lc
from tailor_quantizer.methods import QuantizeJob, get_method, parse_config
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.calibration import build_calibration_set, read_documents
from tailor_runtime.ml.model_io import load_causal_lm, load_tokenizer, read_format, save_hf_model
from tailor_runtime.ml.perplexity import perplexity
from tailor_runtime.progress import no_progress

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
EVAL = REPO / "examples" / "data" / "tinystories_eval.txt"
TRAIN = REPO / "examples" / "data" / "tinystories_train.txt"
EVAL_TOKENS = 4096


@pytest.fixture(scope="module")
def calibration():
    return build_calibration_set(
        load_tokenizer(MODEL), read_documents(TRAIN), samples=32, seq_len=128, seed=0
    )


@pytest.fixture(scope="module")
def eval_text():
    return EVAL.read_text()


def quantize(name: str, config: dict, out: Path, calibration=None) -> dict:
    method = get_method(name)
    data = calibration if method.caps.needs_calibration else None
    return method.run(
        MODEL, out, parse_config(method, config), QuantizeJob(progress=no_progress, calibration=data)
    )


def ppl(folder: Path, text: str) -> float:
    model, tok = load_causal_lm(folder)
    return perplexity(model, tok, text, context_length=256, stride=128, max_tokens=EVAL_TOKENS)["perplexity"]


def test_group_size_that_does_not_divide_fails_before_any_work_and_says_what_works(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        quantize("rtn", {"group_size": 128}, tmp_path / "out")
    message = str(err.value)
    assert "group_size 128 does not divide the input width of 35 of 35 layers" in message
    assert "model.layers.0.self_attn.q_proj (64)" in message
    assert "(2, 4)" in message and "group_size -1" in message
    # 172 % 43 == 0 but 64 % 43 != 0: only the 64-wide layers are named.
    with pytest.raises(InvalidArgument, match=r"30 of 35 layers: model.layers.0.self_attn.q_proj \(64\)"):
        quantize("gptq", {"group_size": 43}, tmp_path / "out", calibration=object())
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidArgument, match="group_size"):
        parse_config(get_method("awq"), {"group_size": 0})


def _random_model(tmp_path: Path, config) -> Path:
    """A tiny randomly initialised model of another architecture, with stories260K's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / config.model_type
    save_hf_model(AutoModelForCausalLM.from_config(config), load_tokenizer(MODEL), folder)
    return folder


@pytest.mark.slow
def test_unsupported_architectures_are_refused_with_what_is_supported(tmp_path, calibration):
    from transformers import GPT2Config, OPTConfig

    gpt2 = _random_model(tmp_path, GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64))
    with pytest.raises(InvalidArgument, match=r"no torch.nn.Linear layer besides its output head.*Conv1D"):
        get_method("rtn").run(
            gpt2, tmp_path / "o1", parse_config(get_method("rtn"), {}), QuantizeJob(no_progress)
        )
    # OPT has Linear layers (RTN and GPTQ take it) but llm-compressor has no AWQ mapping for it.
    opt = _random_model(
        tmp_path,
        OPTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=2,
            vocab_size=512,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
    )
    with pytest.raises(InvalidArgument, match=r"no awq mapping for OPTForCausalLM.*LlamaForCausalLM"):
        quantize_at(opt, "awq", {"group_size": -1}, tmp_path / "o2", calibration)


def quantize_at(model_dir: Path, name: str, config: dict, out: Path, calibration) -> dict:
    method = get_method(name)
    return method.run(
        model_dir, out, parse_config(method, config), QuantizeJob(no_progress, calibration=calibration)
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, calibration, eval_text):
    """{label: (folder, metrics, perplexity)} for the comparisons below."""
    plan = {
        "float": None,
        "rtn_g4": ("rtn", {"bits": 4, "group_size": 4}),
        "gptq_g4": ("gptq", {"bits": 4, "group_size": 4}),
        "gptq3_g4": ("gptq", {"bits": 3, "group_size": 4}),
        "rtn_channel": ("rtn", {"bits": 4, "group_size": -1}),
        "awq_channel": ("awq", {"group_size": -1, "symmetric": True}),
    }
    results = {"float": (MODEL, {}, ppl(MODEL, eval_text))}
    for label, spec in plan.items():
        if spec is None:
            continue
        out = tmp_path_factory.mktemp(label)
        metrics = quantize(spec[0], spec[1], out, calibration)
        results[label] = (out, metrics, ppl(out, eval_text))
    for label, (_, _, value) in results.items():
        print(f"{label}: perplexity {value:.4f}")
    return results


@pytest.mark.slow
def test_gptq_beats_round_to_nearest_at_the_same_bits_and_group_size(runs):
    # Measured: float 3.500, RTN 3.733 (+6.6%), GPTQ 3.641 (+4.0%).
    assert runs["gptq_g4"][2] < runs["rtn_g4"][2] - 0.05
    assert runs["gptq_g4"][1]["weight_bytes"] == runs["rtn_g4"][1]["weight_bytes"]


@pytest.mark.slow
def test_awq_beats_round_to_nearest_at_the_same_bits_and_group_size(runs):
    """Symmetric 4-bit, one scale per output channel. Measured: RTN 3.973 (+13.5%), AWQ 3.894. AWQ does
    not win everywhere on this tiny model: with zero points, per channel or in groups of 4, RTN is as
    good or better (bench/quantize_methods.py shows those rows side by side)."""
    assert runs["awq_channel"][2] < runs["rtn_channel"][2] - 0.02
    assert runs["awq_channel"][1]["weight_bytes"] == runs["rtn_channel"][1]["weight_bytes"]


@pytest.mark.slow
def test_three_bit_gptq_packs_saves_and_loads(runs):
    folder, metrics, value = runs["gptq3_g4"]
    fmt = read_format(folder)
    assert fmt["format"] == "compressed-tensors" and fmt["bits"] == 3 and fmt["scheme"] == "W3A16"
    assert metrics["weight_bytes"] < runs["gptq_g4"][1]["weight_bytes"]
    # Measured 4.49: a 3-bit 64-wide model loses far more than a 4-bit one, but stays a language model.
    assert runs["gptq_g4"][2] < value < runs["float"][2] * 1.4


@pytest.mark.slow
def test_outputs_are_compressed_tensors_that_vllm_reads(runs):
    import json

    config = json.loads((runs["gptq_g4"][0] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 4, "group")
    assert config["ignore"] == ["lm_head"]
    model, _ = load_causal_lm(runs["gptq_g4"][0])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head stays float


def test_fp8_lists_as_unavailable_without_an_fp8_gpu():
    import torch

    ok, why = get_method("fp8").availability()
    if not torch.cuda.is_available():
        assert not ok and "compute capability 8.9" in why and "this worker has no GPU" in why
    elif torch.cuda.get_device_capability() < (8, 9):
        assert not ok and "compute capability 8.9" in why
    else:
        assert ok


@pytest.mark.slow
def test_auto_mixed_precision_beats_uniform_of_at_least_its_size(tmp_path, calibration, eval_text):
    """auto at the size of uniform 5-bit (per channel, RTN) against the uniform width whose size is
    closest without being smaller. Measured: auto 3.655 vs uniform 5-bit 3.671 (float 3.500)."""
    model, _ = load_causal_lm(MODEL)
    layers = lc.quantizable_linears(model)
    bf16 = sum(layer.weight.numel() * 2 for layer in layers.values())

    def uniform_fraction(bits: int) -> float:
        return sum(lc.stored_bytes(layer, lc.int_weights(bits, -1, True)) for layer in layers.values()) / bf16

    common = {"group_size": -1, "algorithm": "rtn", "sensitivity_samples": 32}
    auto_cfg = {
        **common,
        "candidate_bits": [3, 4, 5, 6, 8],
        "granularity": "layer",
        "max_size_fraction": uniform_fraction(5),
    }
    auto = quantize("auto", auto_cfg, tmp_path / "auto", calibration)
    assert auto["size_fraction_of_bf16"] <= uniform_fraction(5)
    assert len(set(auto["layer_bits"].values())) > 1, "auto chose one width for every layer"
    assert set(auto["sensitivity_kl"]) == set(layers)
    # The uniform width whose size is closest to auto's without being smaller.
    bits = min(
        (b for b in range(2, 9) if uniform_fraction(b) >= auto["size_fraction_of_bf16"]), key=uniform_fraction
    )
    uniform_cfg = {**common, "candidate_bits": [bits], "max_size_fraction": uniform_fraction(bits)}
    uniform = quantize("auto", uniform_cfg, tmp_path / "uniform", calibration)
    assert set(uniform["layer_bits"].values()) == {bits}
    assert auto["weight_bytes"] <= uniform["weight_bytes"]

    auto_ppl, uniform_ppl = ppl(tmp_path / "auto", eval_text), ppl(tmp_path / "uniform", eval_text)
    print(
        f"auto {auto['mean_weight_bits']:.2f} bits ({auto['weight_bytes']} bytes): perplexity {auto_ppl:.4f}; "
        f"uniform {bits}-bit ({uniform['weight_bytes']} bytes): {uniform_ppl:.4f}"
    )
    assert auto_ppl < uniform_ppl
    shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_auto_refuses_a_budget_below_its_smallest_width(tmp_path, calibration):
    with pytest.raises(InvalidArgument, match=r"max_size_fraction 0.1 is below .*\(4 bits.*0\.279"):
        quantize("auto", {"group_size": -1, "max_size_fraction": 0.1}, tmp_path / "out", calibration)


@pytest.mark.parametrize("label", ["rtn_g4", "gptq_g4", "rtn_channel", "awq_channel"])
@pytest.mark.slow
def test_four_bit_outputs_run_as_packed_int4_layers_with_the_same_logits(runs, label, eval_text):
    """What a GPU benchmark does with a 4-bit output (formats.compressed_tensors.to_packed_int4): the
    layers of Tailor's Triton GEMV kernel, holding exactly the stored values. Checked here on CPU against
    the model transformers decompresses, for the prefill (dequantized matmul) and the one-row product."""
    import torch

    from tailor_runtime.ml.formats.compressed_tensors import to_packed_int4
    from tailor_runtime.ml.packed_int4 import PackedInt4Linear

    folder = runs[label][0]
    reference, tokenizer = load_causal_lm(folder)
    packed, _ = load_causal_lm(folder)
    assert to_packed_int4(packed) == {"packed_layers": 35}
    assert sum(isinstance(m, PackedInt4Linear) for m in packed.modules()) == 35
    assert not hasattr(packed, "ct_decompress_hook")
    ids = torch.tensor([tokenizer(eval_text[:400])["input_ids"][:48]])
    with torch.no_grad():
        for window in (ids, ids[:, :1]):
            expected = reference(window).logits
            assert torch.allclose(packed(window).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_other_compressed_schemes_are_left_as_they_are_with_the_reason(runs):
    from tailor_runtime.ml.formats.compressed_tensors import packed_int4_refusal, to_packed_int4

    model, _ = load_causal_lm(runs["gptq3_g4"][0])
    result = to_packed_int4(model)
    assert result["packed_layers"] == 0 and "3-bit int, not 4-bit int" in result["not_packed"]
    assert hasattr(model, "ct_decompress_hook")  # untouched: transformers still decompresses it

    def config(**weights):
        base = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "actorder": None}
        return {"config_groups": {"group_0": {"weights": {**base, **weights}}}}

    assert packed_int4_refusal(config()) == ""
    assert "zero points" in packed_int4_refusal(config(symmetric=False))
    assert "actorder 'group'" in packed_int4_refusal(config(actorder="group"))
    assert "4-bit int" in packed_int4_refusal(config(type="float", num_bits=8))
