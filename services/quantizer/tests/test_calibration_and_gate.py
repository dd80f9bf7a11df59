"""Calibration sets from text and JSONL, and the accuracy gate's verdicts, on the bundled real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailor.quantizer.v1 import quantizer_service_pb2 as pb
from tailor_quantizer.gate import GateSettings, enforce, measure
from tailor_runtime.errors import AccuracyGateFailed, InvalidArgument
from tailor_runtime.ml.calibration import build_calibration_set, read_documents, split_holdout
from tailor_runtime.ml.model_io import load_tokenizer

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
TRAIN = REPO / "examples" / "data" / "tinystories_train.txt"
EVAL = REPO / "examples" / "data" / "tinystories_eval.txt"
ALPACA = REPO.parent / "shared" / "data" / "sft" / "alpaca"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


def test_text_calibration_is_sampled_by_seed(tokenizer):
    docs = read_documents(TRAIN)
    a = build_calibration_set(tokenizer, docs, samples=16, seq_len=64, seed=1, source_sha256="x")
    b = build_calibration_set(tokenizer, docs, samples=16, seq_len=64, seed=1, source_sha256="x")
    c = build_calibration_set(tokenizer, docs, samples=16, seq_len=64, seed=2, source_sha256="x")
    assert a.sequences == b.sequences and a.sequences != c.sequences
    assert len(a.sequences) == 16 and all(len(s) == 64 for s in a.sequences)
    stats = a.manifest_stats()
    assert stats["calibration_samples"] == 16 and stats["calibration_tokens"] == 1024
    assert stats["calibration_seed"] == 1 and stats["calibration_documents"] == len(docs)


def test_jsonl_formats(tmp_path, tokenizer):
    path = tmp_path / "calib.jsonl"
    rows = [
        {"text": "Once upon a time there was a cat."},
        {"instruction": "Tell a story.", "input": "", "output": "The dog ran to the park."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = read_documents(path)
    assert docs == [
        "Once upon a time there was a cat.",
        "Tell a story.\nThe dog ran to the park.",
        "Hi\nHello there.",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "line 2 is not valid JSON"),
        ('{"prompt": "x"}', "line 2 has fields ['prompt']"),
        ('{"messages": [{"role": "user"}]}', "messages[0] needs a string 'content'"),
        ("[1, 2]", "line 2 is a JSON list"),
    ],
)
def test_malformed_jsonl_names_the_line_and_field(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(InvalidArgument, match=expected.replace("[", r"\[").replace("]", r"\]")):
        read_documents(path)


def test_too_little_text_says_the_counts(tokenizer):
    with pytest.raises(InvalidArgument, match=r"too small: 2 documents give \d+ tokens, 0 sequences of 512"):
        build_calibration_set(tokenizer, ["One cat.", "Two dogs."], samples=8, seq_len=512, seed=0)
    with pytest.raises(InvalidArgument, match="at least 8"):
        build_calibration_set(tokenizer, ["x"], samples=2, seq_len=64, seed=0)
    with pytest.raises(InvalidArgument, match="exceeds the model's context of 512"):
        build_calibration_set(tokenizer, ["x"], samples=8, seq_len=1024, seed=0, max_seq_len=512)


@pytest.mark.skipif(not ALPACA.is_dir(), reason="needs ../shared/data (present in CI)")
def test_real_alpaca_json_lines(tmp_path, tokenizer):
    source = next(ALPACA.glob("*.json"))
    records = json.loads(source.read_text())[:200]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    calib = build_calibration_set(tokenizer, read_documents(path), samples=8, seq_len=128, seed=0)
    assert len(calib.sequences) == 8


def test_holdout_keeps_the_last_documents_out():
    docs = [f"story {i} " * 20 for i in range(10)]
    calib, held = split_holdout(docs, holdout_chars=300)
    assert calib + held == docs and held and calib
    assert sum(map(len, held)) >= 300 and sum(map(len, held[1:])) < 300


def test_gate_settings_from_proto_defaults_and_bounds():
    settings = GateSettings.from_proto(pb.AccuracyGate())
    assert settings.max_perplexity_increase_pct == 5.0 and settings.min_top1_agreement is None
    assert (
        GateSettings.from_proto(pb.AccuracyGate(max_perplexity_increase_pct=0)).max_perplexity_increase_pct
        == 0
    )
    with pytest.raises(InvalidArgument, match="min_top1_agreement must be between 0 and 1"):
        GateSettings.from_proto(pb.AccuracyGate(min_top1_agreement=1.5))
    with pytest.raises(InvalidArgument, match="eval_tokens"):
        GateSettings.from_proto(pb.AccuracyGate(eval_tokens=10))


def test_gate_measures_a_model_against_itself_and_rejects_with_numbers():
    text = EVAL.read_text()
    same = measure(MODEL, MODEL, text, eval_tokens=1024)
    assert same["perplexity_increase_pct"] == pytest.approx(0.0, abs=1e-9)
    assert same["top1_agreement"] == 1.0 and same["kl_divergence"] == pytest.approx(0.0, abs=1e-9)
    assert enforce(GateSettings(), same, "bf16")["gate"] == "passed"
    worse = {**same, "perplexity": same["parent_perplexity"] * 1.08, "perplexity_increase_pct": 8.0}
    with pytest.raises(AccuracyGateFailed, match=r"\+8.00% .* \(allowed: \+5%\)") as err:
        enforce(GateSettings(), worse, "nf4")
    assert err.value.metrics["gate"] == "rejected" and err.value.metrics["perplexity_increase_pct"] == 8.0
    with pytest.raises(AccuracyGateFailed, match="top-1 agreement"):
        enforce(GateSettings(min_top1_agreement=0.99), {**same, "top1_agreement": 0.9}, "x")


@pytest.mark.slow
def test_gate_measures_perplexity_on_the_benchmarks_tokens():
    """The gate's parent perplexity is the benchmark's for the same model and text, with the defaults
    and with a pipeline's own benchmark settings: the report can set the two side by side."""
    from tailor_benchmarker.config import BenchmarkConfig
    from tailor_runtime.ml.model_io import load_causal_lm
    from tailor_runtime.ml.perplexity import perplexity

    text = EVAL.read_text()
    model, tok = load_causal_lm(MODEL)
    for cfg in (BenchmarkConfig(), BenchmarkConfig(max_eval_tokens=2048, context_length=128, stride=64)):
        bench = perplexity(model, tok, text, cfg.context_length, cfg.stride, cfg.max_eval_tokens)
        gate = measure(MODEL, MODEL, text, cfg.max_eval_tokens, "cpu", cfg.context_length, cfg.stride)
        assert gate["parent_perplexity"] == pytest.approx(bench["perplexity"], rel=1e-9)
        assert gate["gate_tokens_scored"] == bench["tokens_scored"]
        assert (gate["gate_context_length"], gate["gate_stride"]) == (cfg.context_length, cfg.stride)
    settings = GateSettings.from_proto(pb.AccuracyGate(context_length=128, stride=64, split_documents=False))
    assert (settings.context_length, settings.stride, settings.split_documents) == (128, 64, False)
    assert GateSettings.from_proto(pb.AccuracyGate()).split_documents is True
    with pytest.raises(InvalidArgument, match="gate.stride"):
        GateSettings.from_proto(pb.AccuracyGate(context_length=64, stride=128))


def test_a_pipelines_gate_gets_its_benchmarks_protocol():
    from tailor_gateway.spec import parse_spec
    from tailor_gateway.stage_requests import gate_protocol

    spec = parse_spec(
        f"name: p\nmodel: {{artifact: {'a' * 64}}}\ndata: {{eval: {{artifact: {'b' * 64}}}}}\n"
        "quantize: [{method: nf4}]\nbenchmark: {config: {max_eval_tokens: 4096, context_length: 512, "
        "stride: 256}}\n"
    )
    assert gate_protocol(spec) == {
        "eval_tokens": 4096,
        "context_length": 512,
        "stride": 256,
        "split_documents": True,
    }
    default = parse_spec(
        f"name: p\nmodel: {{artifact: {'a' * 64}}}\ndata: {{eval: {{artifact: {'b' * 64}}}}}\n"
        "quantize: [{method: nf4}]\n"
    )
    assert gate_protocol(default)["eval_tokens"] == 8192
