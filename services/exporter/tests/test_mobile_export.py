"""Mobile exports of the bundled real model (stories260K): ExecuTorch run in ExecuTorch's runtime and LLM
runner; Core ML converted and read back (Core ML itself runs only on Apple's systems)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tailor_exporter import mobile_export
from tailor_exporter.mobile_export import COREML_TOLERANCE, EXECUTORCH_TOLERANCE
from tailor_exporter.registry import ExportJob, get_format
from tailor_runtime.errors import FailedPrecondition, InvalidArgument, VerificationFailed
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.progress import no_progress

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
MAX_SEQ_LEN = 128
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run(name: str, out: Path, source: Path = MODEL, **config) -> dict:
    fmt = get_format(name)
    config.setdefault("max_seq_len", MAX_SEQ_LEN)
    return fmt.run(source, out, fmt.Config(**config), ExportJob(no_progress))


@pytest.fixture(scope="module")
def executorch_export(tmp_path_factory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("executorch") / "stories260K-executorch"
    return out, run("executorch", out)


@pytest.fixture(scope="module")
def coreml_export(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("coreml") / "stories260K-coreml"
    return out, run("coreml", out)


@pytest.mark.slow
def test_executorch_program_runs_in_executorch_and_agrees_with_pytorch(executorch_export):
    out, result = executorch_export
    verification = result["verification"]
    published, runner = verification["checks"]["published"], verification["checks"]["runner"]
    assert verification["ran_converted_artifact"] is True and verification["passed"]
    assert verification["max_abs_diff"] == published["max_abs_diff"] < 1e-4  # measured 1.3e-5
    assert published["top1_agreement"] == 1.0 and published["atol"] == EXECUTORCH_TOLERANCE.atol
    assert published["decode"]["positions"] == 9 and published["prefill"]["positions"] > 60  # 3 sentences
    # ExecuTorch's LLM runner, with the folder's tokenizer, generates the source's greedy tokens.
    assert runner["greedy_agreement"] == 1.0 and runner["tokens"] == 48  # 3 prompts x 16
    assert runner["prompts"][0]["runner"].startswith(", there was a little girl")  # spaces kept
    assert {
        "model.pte",
        "tokenizer.json",
        "runner_tokenizer.json",
        "config.json",
        "tailor_format.json",
        "verification.json",
        "LICENSE",
    } <= set(result["files"])
    fmt = json.loads((out / "tailor_format.json").read_text())
    assert fmt["format"] == "executorch" and fmt["model_file"] == "model.pte" and fmt["backend"] == "xnnpack"
    assert fmt["max_seq_len"] == MAX_SEQ_LEN and fmt["tokenizer"] == "runner_tokenizer.json"
    assert json.loads((out / "verification.json").read_text())["versions"]["executorch"] == "1.5.1"
    assert result["xnnpack_partitions"] > 0
    assert not list(out.parent.glob(".*partial*"))

    # The published file itself, run here independently: a prompt in one call, then one more token.
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(out / "model.pte"))
    assert program.load_method("get_max_seq_len").execute([])[0] == MAX_SEQ_LEN
    forward = program.load_method("forward")
    model, tokenizer = load_causal_lm(MODEL)
    ids = tokenizer("The sun was warm and the sky was blue.")["input_ids"]
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    prefill = forward.execute([torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)])[0][0]
    last = forward.execute([torch.tensor([ids[-1:]]), torch.tensor([len(ids) - 1])])[0][0]
    got = torch.cat([prefill, last])
    assert (got - want).abs().max() < 1e-4 and bool((got.argmax(-1) == want.argmax(-1)).all())


def test_the_decoder_never_reads_cache_memory_it_did_not_write():
    # ExecuTorch leaves a mutable buffer's first contents undefined: caches full of NaN must not matter.
    from tailor_exporter.mobile_decoder import compare_stepwise, decoder_class, sample_sequences

    model, tokenizer = load_causal_lm(MODEL)
    decoder = decoder_class()(model.float().eval(), 64)
    for name, buffer in decoder.named_buffers():
        if "_cache_" in name:
            buffer.fill_(float("nan"))

    def step(ids, pos):
        with torch.inference_mode():
            return decoder(ids, pos)[0].numpy()

    check = compare_stepwise(step, model, sample_sequences(tokenizer, 3, 64))
    assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0


@pytest.mark.slow
def test_executorch_export_is_byte_identical_when_repeated(tmp_path):
    # On the model's first layer only (the same real weights): lowering the whole model again would take
    # half a minute, and what is tested is the toolchain, which gives every layer the same treatment.
    from tailor_runtime.ml.model_io import save_hf_model

    model, tokenizer = load_causal_lm(MODEL)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    save_hf_model(model, tokenizer, tmp_path / "one-layer")
    assert get_format("executorch").deterministic
    run("executorch", tmp_path / "first", source=tmp_path / "one-layer", greedy_tokens=4)
    run("executorch", tmp_path / "again", source=tmp_path / "one-layer", greedy_tokens=4)
    assert file_hashes(tmp_path / "again") == file_hashes(tmp_path / "first")


@pytest.mark.slow
def test_an_impossibly_tight_tolerance_fails_and_publishes_nothing(tmp_path):
    for name in ("executorch", "coreml"):
        with pytest.raises(
            VerificationFailed, match=r"exported check .* max \|logit difference\| .* > atol 1e-09.*nothing"
        ):
            run(name, tmp_path / name, atol=1e-9)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a work folder


@pytest.mark.slow
def test_a_pte_that_computes_something_else_fails_in_the_runtime_check(
    executorch_export, tmp_path, monkeypatch
):
    # The lowering is replayed (the fixture's .pte), and what ExecuTorch returns is shifted by 0.01: the
    # check of the published file against PyTorch must catch it.
    pte = (executorch_export[0] / "model.pte").read_bytes()
    monkeypatch.setattr(mobile_export, "lower_to_executorch", lambda program, metadata: (pte, {}))
    real_step = mobile_export.executorch_step

    def shifted_step(path):
        step = real_step(path)  # one loaded program: its KV cache lives from call to call
        return lambda ids, pos: step(ids, pos) + 0.01

    monkeypatch.setattr(mobile_export, "executorch_step", shifted_step)
    with pytest.raises(
        VerificationFailed, match=r"published check .* 0\.01 > atol 0\.001.*nothing was published"
    ):
        run("executorch", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_coreml_package_is_converted_with_the_decoder_interface(coreml_export):
    import coremltools as ct

    out, result = coreml_export
    verification = result["verification"]
    exported, converted = verification["checks"]["exported"], verification["checks"]["converted"]
    # Verified by conversion, not run: the converted program in PyTorch (float16 cache, as Core ML's states).
    assert verification["ran_converted_artifact"] is False and converted["ran_converted_artifact"] is False
    assert exported["passed"] and exported["max_abs_diff"] < COREML_TOLERANCE.atol  # measured 0.011
    assert exported["top1_agreement"] == 1.0 and exported["decode"]["positions"] == 9
    assert converted["passed"] and converted["problems"] == [] and converted["specification_version"] >= 9

    spec = ct.models.MLModel(str(out / "model.mlpackage"), skip_model_load=True).get_spec()
    inputs = {i.name: i.type.multiArrayType for i in spec.description.input}
    assert sorted(inputs) == ["input_ids", "input_pos"]
    assert [r.upperBound for r in inputs["input_ids"].shapeRange.sizeRanges] == [1, MAX_SEQ_LEN]
    assert inputs["input_pos"].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    assert [o.name for o in spec.description.output] == ["logits"]
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    assert len(states) == 10 and list(states["v_cache_4"].shape) == [1, 4, MAX_SEQ_LEN, 8]
    assert states["k_cache_0"].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert "com.github.apple.coremltools.conversion_date" not in spec.description.metadata.userDefined
    weights = out / "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    assert weights.stat().st_size > 4 * 260_000  # float32 weights
    fmt = json.loads((out / "tailor_format.json").read_text())
    assert fmt["format"] == "coreml" and fmt["model_file"] == "model.mlpackage"
    assert fmt["verified_by"].startswith("conversion") and fmt["minimum_deployment_target"] == "iOS18"
    assert "not run" in get_format("coreml").description
    with pytest.raises(InvalidArgument, match="does not load back"):
        load_causal_lm(out)


@pytest.mark.slow
def test_coreml_export_is_byte_identical_when_repeated(coreml_export, tmp_path):
    assert get_format("coreml").deterministic
    run("coreml", tmp_path / "again")
    assert file_hashes(tmp_path / "again") == file_hashes(coreml_export[0])


@pytest.mark.slow
def test_int8_source_is_exported_dequantized_only_when_asked(tmp_path):
    from tailor_runtime.ml.formats.int8_dynamic import save_quantized

    model, tokenizer = load_causal_lm(MODEL)
    save_quantized(model, tokenizer, tmp_path / "int8")
    for name in ("executorch", "coreml"):
        with pytest.raises(InvalidArgument, match="dequantize=true") as info:
            run(name, tmp_path / "out", source=tmp_path / "int8")
        assert "int8=true" in info.value.message
    result = run("coreml", tmp_path / "int8-coreml", source=tmp_path / "int8", dequantize=True)
    checks = result["verification"]["checks"]
    assert checks["exported"]["passed"] and checks["exported"]["max_abs_diff"] < COREML_TOLERANCE.atol
    assert checks["source"]["enforced"] is False and checks["source"]["top1_agreement"] > 0.8
    assert result["format"]["source_format"] == "int8-dynamic" and not (tmp_path / "out").exists()


def test_nf4_without_dequantize_is_refused_naming_the_path_that_works(tmp_path):
    (tmp_path / "tailor_format.json").write_text('{"format": "bnb-nf4", "dtype": "float32"}')
    for name in ("executorch", "coreml"):
        with pytest.raises(InvalidArgument, match="dequantize=true") as info:
            run(name, tmp_path / "out", source=tmp_path)
        assert "parent" in info.value.message and "NF4" in info.value.message
    assert not (tmp_path / "out").exists()


def test_unsupported_architectures_and_sources_name_what_is_supported(tmp_path):
    mistral = tmp_path / "mistral"
    shutil.copytree(MODEL, mistral)
    config = json.loads((mistral / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(config))
    for name in ("executorch", "coreml"):
        with pytest.raises(InvalidArgument, match="MistralForCausalLM .*supported: LlamaForCausalLM"):
            run(name, tmp_path / "out", source=mistral)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "tailor_format.json").write_text('{"format": "peft-lora"}')
    with pytest.raises(InvalidArgument, match="valid choices: bnb-nf4, hf-safetensors, int8-dynamic"):
        run("coreml", tmp_path / "out", source=lora)
    with pytest.raises(InvalidArgument, match="max_position_embeddings \\(512\\)"):
        run("executorch", tmp_path / "out", max_seq_len=1024)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_conversion_that_crashes_the_tool_fails_with_its_message(tmp_path, monkeypatch):
    import coremltools as ct

    def crash(*args, **kwargs):
        raise RuntimeError("unsupported op: aten::made_up\nmore details")

    monkeypatch.setattr(ct, "convert", crash)
    with pytest.raises(FailedPrecondition, match="coremltools could not convert this model: unsupported op"):
        run("coreml", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_config_is_strict_and_takes_struct_numbers():
    fmt = get_format("executorch")
    assert fmt.Config.model_validate({"max_seq_len": 256.0, "greedy_tokens": 8.0}).max_seq_len == 256
    assert get_format("coreml").Config().max_seq_len is None  # the model's length, at most 512
    for bad in ({"max_seq_len": 4}, {"max_seq_len": 64.5}, {"dtype": "float16"}, {"min_top1_agreement": 2.0}):
        with pytest.raises(ValidationError):
            fmt.Config.model_validate(bad)
    with pytest.raises(ValidationError):
        get_format("coreml").Config.model_validate({"greedy_tokens": 8})  # an ExecuTorch option
