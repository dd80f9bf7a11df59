"""Bringing a model: spec `model:` forms, pytorch_model.bin -> safetensors on the client, and the Hub path
through huggingface_hub's own code against an offline cache laid out as the library lays it out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.families import tiny_model
from support.hf_cache import write_hub_cache

from tailor.convert import ConversionError, convert_folder, needs_conversion, safetensors_name
from tailor.errors import ClientError
from tailor.transfer import guess_format
from tailor_gateway.spec import parse_spec, plan
from tailor_gateway.stage_requests import base_model_id
from tailor_runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from tailor_runtime.ml import hub
from tailor_runtime.ml.model_io import read_format
from tailor_runtime.store.local import LocalStore

ID = "a" * 64


def _spec(model: str) -> str:
    return f"""
name: t
model: {model}
data: {{train: {{artifact: {ID}}}, eval: {{artifact: {ID}}}}}
finetune: {{method: lora}}
quantize: [{{method: bf16}}]
"""


# --- the spec ----------------------------------------------------------------------------------------
def test_hub_model_is_imported_first_and_feeds_the_finetune():
    spec = parse_spec(_spec("{hub: Qwen/Qwen2.5-0.5B, revision: v1.0}"))
    stages = {s.name: s for s in plan(spec)}
    assert stages["import"].kind == "import" and stages["import"].depends_on == []
    assert stages["import"].params == {"hub": "Qwen/Qwen2.5-0.5B", "revision": "v1.0"}
    assert stages["finetune"].depends_on == ["import"]
    # The hub model is not an artifact the gateway checks for at create(): the import stage makes it.
    assert "model" not in spec.inputs()


def test_hub_revision_defaults_to_main_and_no_import_stage_without_hub():
    spec = parse_spec(_spec("{hub: org/name}"))
    assert plan(spec)[0].params["revision"] == "main"
    assert all(s.kind != "import" for s in plan(parse_spec(_spec(f"{{artifact: {ID}}}"))))


def test_benchmark_of_a_hub_model_without_finetune_depends_on_the_import():
    text = _spec("{hub: org/name}").replace("finetune: {method: lora}\n", "")
    stages = {s.name: s for s in plan(parse_spec(text))}
    assert stages["benchmark/original"].depends_on == ["import"]
    assert stages["quantize/bf16"].depends_on == ["import"]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (f"{{hub: org/name, artifact: {ID}}}", "exactly one of"),
        ("{}", "exactly one of"),
        (f"{{artifact: {ID}, revision: main}}", "'revision' goes with 'hub'"),
        ("{hub: no-slash}", "not a Hugging Face model id"),
        ("{hub: ../../etc}", "not a Hugging Face model id"),
        ("{hub: org/name, revision: ../x}", "not a branch, tag or commit"),
        ("{hub: org/name, revision: ''}", "not a branch, tag or commit"),
    ],
)
def test_bad_model_inputs_are_named(model, message):
    with pytest.raises(InvalidArgument, match=message) as err:
        parse_spec(_spec(model))
    assert "model" in err.value.message


def test_base_model_id_is_the_import_result():
    spec = parse_spec(_spec("{hub: org/name}"))

    class Stage:
        results = [{"id": "b" * 64}]

    assert base_model_id(spec, {"import": Stage()}) == "b" * 64
    with pytest.raises(FailedPrecondition, match="not imported yet"):
        base_model_id(spec, {})
    assert base_model_id(parse_spec(_spec(f"{{artifact: {ID}}}")), {}) == ID


# --- pytorch_model.bin -> safetensors ------------------------------------------------------------------
def _state_dict(folder: Path):
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return {k: v for s in sorted(shards) for k, v in load_file(folder / s).items()}
    return load_file(folder / "model.safetensors")


def _bin_folder(src: Path, dest: Path, shards: int) -> dict:
    """`src`'s weights as torch.save'd pytorch_model*.bin (the tied head shares its storage), the rest copied."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    state = model.state_dict()  # lm_head.weight and embed_tokens.weight are one tensor (tied)
    dest.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model.safetensors") and f.name != "model.safetensors":
            shutil.copyfile(f, dest / f.name)
    names = sorted(state)
    if shards == 1:
        torch.save(state, dest / "pytorch_model.bin")
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            shard = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: state[k] for k in part}, dest / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (dest / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
        )
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_folder_converts_to_equal_safetensors_that_transformers_loads(tmp_path, shards):
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama", tmp_path / "src")  # tied embeddings, as stories260K
    binf = tmp_path / "bin"
    original = _bin_folder(src, binf, shards)
    assert needs_conversion(binf)
    with pytest.raises(InvalidArgument, match="tailor models import"):
        read_format(binf)  # the refusal names the command that converts it

    out = convert_folder(binf, tmp_path / "out")
    assert not list(out.glob("*.bin")) and not needs_conversion(out)
    converted = _state_dict(out)
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor), name
    if shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {
            f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)
        }
    assert guess_format(out) == ("model", "hf-safetensors")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(a, b)


def test_conversion_refuses_a_pickle_that_is_not_only_tensors(tmp_path):
    import pickle

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_folder(folder, tmp_path / "out")


def test_shard_names_follow_transformers():
    assert safetensors_name("pytorch_model.bin") == "model.safetensors"
    assert safetensors_name("pytorch_model-00001-of-00003.bin") == "model-00001-of-00003.safetensors"
    with pytest.raises(ConversionError):
        safetensors_name("../x.bin")


def test_guess_format_reads_config_json_quantization(tmp_path):
    folder = tiny_model("qwen2", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (folder / "config.json").write_text(json.dumps(config))
    assert guess_format(folder) == ("model", "compressed-tensors")
    config["quantization_config"] = {"quant_method": "gptq"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClientError, match="does not load"):
        guess_format(folder)


# --- the Hub, offline, through huggingface_hub's own code ---------------------------------------------
@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE in a temp dir (the library reads both at import: set on it too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def test_hub_import_from_the_cache_publishes_once(tmp_path, offline_cache):
    model = tiny_model("qwen2", tmp_path / "model")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x02never downloaded")  # not in the allow patterns
    commit = write_hub_cache(offline_cache, "acme/tiny-qwen2", model)
    store = LocalStore(tmp_path / "store")

    manifest, cached = hub.import_from_hub(store, "acme/tiny-qwen2", None, tmp_path / "staging")
    assert not cached
    assert manifest.kind == "model" and manifest.format == "hf-safetensors"
    assert manifest.name == "acme/tiny-qwen2"
    assert manifest.recipe == {"stage": "import", "hub": "acme/tiny-qwen2", "commit": commit}
    paths = {f.path for f in manifest.files}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= paths
    assert "pytorch_model.bin" not in paths
    assert list((tmp_path / "staging").iterdir()) == []  # the linked copy is gone
    # The stored bytes are the snapshot's, verified on read.
    got = store.download(manifest.id, tmp_path / "got")
    assert (tmp_path / "got" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert got.id == manifest.id

    # By commit: answered from the recipe index, before huggingface_hub is asked anything.
    again, cached = hub.import_from_hub(store, "acme/tiny-qwen2", commit, tmp_path / "staging")
    assert cached and again.id == manifest.id
    # By branch (offline: the cache's refs/main names the commit): the same artifact.
    again, cached = hub.import_from_hub(store, "acme/tiny-qwen2", "main", tmp_path / "staging")
    assert cached and again.id == manifest.id

    assert hub.read_config("acme/tiny-qwen2", "main")["model_type"] == "qwen2"


def test_hub_repo_not_in_the_offline_cache_says_what_to_do(tmp_path, offline_cache):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(Unavailable) as err:
        hub.import_from_hub(store, "acme/absent", "main", tmp_path / "staging")
    message = err.value.message
    assert "HF_HUB_OFFLINE is set" in message and str(offline_cache) in message
    assert "artifact:" in message and "path:" in message
    with pytest.raises(Unavailable, match="acme/absent@main"):
        hub.read_config("acme/absent", "main")


def test_hub_repo_with_only_pickled_weights_is_refused(tmp_path, offline_cache):
    folder = tmp_path / "binonly"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    write_hub_cache(offline_cache, "acme/bin-only", folder)
    with pytest.raises(FailedPrecondition, match="tailor models import DIR"):
        hub.import_from_hub(LocalStore(tmp_path / "store"), "acme/bin-only", None, tmp_path / "staging")


def test_hub_errors_become_domain_errors_without_the_token(monkeypatch):
    import httpx
    from huggingface_hub import errors as hf

    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/api/models/a/b"))
    cases = [
        (hf.GatedRepoError("gated", response=response), FailedPrecondition, "is gated"),
        (hf.RepositoryNotFoundError("nope", response=response), InvalidArgument, "not found"),
        (hf.RevisionNotFoundError("nope", response=response), InvalidArgument, "does not exist"),
        (hf.HfHubHTTPError("denied", response=response), FailedPrecondition, "refused the gateway's token"),
        (httpx.ConnectError("down"), Unavailable, "cannot reach"),
    ]
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecret")
    for raised, expected, message in cases:
        with pytest.raises(expected, match=message) as err:
            with hub._translated("a/b", "main"):
                raise raised
        assert "hf_secretsecret" not in err.value.message
