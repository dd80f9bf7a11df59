"""The shared ONNX decoder (tailor_runtime.ml.onnx) on the bundled real model: export with past
key/values, run through load_causal_lm like a PyTorch model, static INT8 calibration."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from tailor_benchmarker.latency import decode_latency
from tailor_runtime.errors import FailedPrecondition
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.ml.onnx import MODEL_FILE, folder, optimize, past_names, present_names, verify
from tailor_runtime.ml.onnx.export import export_optimized, kv_shape
from tailor_runtime.ml.onnx.session import OnnxCausalLM
from tailor_runtime.ml.perplexity import perplexity

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "examples" / "models" / "stories260K"
EVAL = REPO / "examples" / "data" / "tinystories_eval.txt"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def source():
    torch.set_num_threads(1)
    return load_causal_lm(MODEL)


@pytest.fixture(scope="module")
def onnx_folder(source, tmp_path_factory) -> tuple[Path, dict]:
    """stories260K exported, checked and optimized, as an `onnx` model folder."""
    model, tokenizer = source
    work = tmp_path_factory.mktemp("onnx")
    folder.write_config(work, MODEL, tokenizer)
    graph, info = export_optimized(model, work, 18, verify.sample_batches(tokenizer, 2))
    graph.rename(work / MODEL_FILE)
    folder.write_format(work, "onnx", MODEL_FILE, "float32", opset=18, source_format="hf-safetensors")
    return work, info


@pytest.mark.slow
def test_graph_has_past_key_values_dynamic_axes_and_opset_18(onnx_folder):
    work, info = onnx_folder
    graph = onnx.load(str(work / MODEL_FILE), load_external_data=False)
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input
    }
    outputs = [o.name for o in graph.graph.output]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *past_names(5)]
    assert outputs == ["logits", *present_names(5)]
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["past_key_values.4.value"] == ["batch", 4, "past_sequence", 8]  # 4 kv heads of 8
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    # ONNX Runtime's optimizer fused every RMSNorm (5 layers x 2, plus the final one).
    assert info["fused_operators"] == {
        "SimplifiedLayerNormalization": 1,
        "SkipSimplifiedLayerNormalization": 10,
    }
    exported = info["exported"]
    assert (
        exported["passed"] and exported["max_abs_diff"] < 1e-3 and exported["decode"]["positions"] == 15
    )  # 5 rows x 3 steps


@pytest.mark.slow
def test_loads_like_a_pytorch_model_and_greedy_decoding_uses_the_cache(onnx_folder, source):
    model, tokenizer = source
    onnx_model, onnx_tokenizer = load_causal_lm(onnx_folder[0])
    assert isinstance(onnx_model, torch.nn.Module) and isinstance(onnx_model, OnnxCausalLM)
    assert (
        onnx_model.config.vocab_size == 512
        and onnx_tokenizer("Once")["input_ids"] == tokenizer("Once")["input_ids"]
    )

    lengths = []
    real_run = onnx_model.session.run

    class Recording:  # records how many new tokens each call computes
        def run(self, names, feeds):
            lengths.append(feeds["input_ids"].shape[1])
            return real_run(names, feeds)

    onnx_model.session = Recording()
    kwargs = dict(prompt="Once upon a time", new_tokens=40, warmup=0, repetitions=1)
    got = decode_latency(onnx_model, onnx_tokenizer, **kwargs)
    want = decode_latency(model, tokenizer, **kwargs)
    assert got["kv_cache"] is True
    assert got["sample"] == want["sample"] and len(got["sample"]) > 100  # the same 40 greedy tokens
    assert lengths == [5] + [1] * 39  # the prompt once, then one token per call


@pytest.mark.slow
def test_perplexity_and_logits_equal_pytorch(onnx_folder, source):
    model, tokenizer = source
    onnx_model, _ = load_causal_lm(onnx_folder[0])
    text = EVAL.read_text()
    kwargs = dict(context_length=128, stride=64, max_tokens=1024)
    got = perplexity(onnx_model, tokenizer, text, **kwargs)["perplexity"]
    want = perplexity(model, tokenizer, text, **kwargs)["perplexity"]
    assert got == pytest.approx(want, rel=1e-5)
    # A left-padded batch with past, against PyTorch on the whole sequence (verify.compare's decode check).
    check = verify.compare(onnx_model, model, verify.sample_batches(tokenizer, 3), decode_steps=4)
    assert check["decode"]["positions"] == 24 and check["decode"]["max_abs_diff"] < 1e-3
    assert check["prefill"]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_static_int8_calibrators_choose_different_ranges(onnx_folder, source, tmp_path):
    model, tokenizer = source
    ids = tokenizer(EVAL.read_text()[:20000])["input_ids"]
    sequences = [ids[i : i + 64] for i in range(0, 64 * 12, 64)]
    stats, graphs = {}, {}
    for calibrator in ("minmax", "entropy", "percentile"):
        out = tmp_path / f"{calibrator}.onnx"
        reader = optimize.TokenReader(sequences, *kv_shape(model.config))
        stats[calibrator] = optimize.quantize_int8_static(
            onnx_folder[0] / MODEL_FILE, out, reader, calibrator, 99.9, per_channel=True
        )
        graphs[calibrator] = out.read_bytes()
        counts = optimize.op_counts(out)
        # Activations: per layer the q/k/v input, o's, gate/up's and down's; plus lm_head's (5 x 4 + 1).
        # Each is dequantized once, and so is each of the 36 int8 weights.
        assert counts["QuantizeLinear"] == 21 and counts["DequantizeLinear"] == 21 + 36
    assert {s["quantized_matmuls"] for s in stats.values()} == {36}  # 7 per layer x 5 + lm_head
    assert stats["minmax"]["calibrated_tensors"] > 36  # the MatMul inputs the calibrator saw
    assert {s["calibrated_tensors"] for s in stats.values()} == {stats["minmax"]["calibrated_tensors"]}
    # ONNX Runtime's entropy calibrator with its default histogram gives exactly min-max; ours must not.
    assert len(set(graphs.values())) == 3


def test_a_graph_without_past_inputs_is_refused(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)
    graph = helper.make_graph(
        [node],
        "no-cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(model, str(tmp_path / MODEL_FILE))
    (tmp_path / "config.json").write_text((MODEL / "config.json").read_text())
    (tmp_path / "tailor_format.json").write_text(json.dumps({"format": "onnx"}))
    with pytest.raises(FailedPrecondition, match="export the model again"):
        load_causal_lm(tmp_path)
