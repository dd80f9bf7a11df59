"""Triton model repositories of the bundled real model (stories260K): built from the verified ONNX graph,
config.pbtxt validated as Triton's ModelConfig against the graph, and served through tritonclient by a
real KServe v2 server (MLServer with tests/support/mlserver_triton; Triton itself is not installable here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from pydantic import ValidationError
from support.mlserver import mlserver
from tritonclient.grpc import model_config_pb2 as mc

from tailor_cli.main import main as cli
from tailor_exporter import triton_export
from tailor_exporter.registry import ExportJob, get_format
from tailor_exporter.triton_export import TritonExportConfig, build_config, check_model_folder, graph_io
from tailor_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    VerificationFailed,
)
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.ml.onnx import export as onnx_export_core
from tailor_runtime.ml.onnx import verify
from tailor_runtime.ml.onnx.session import OnnxCausalLM
from tailor_runtime.progress import no_progress
from tailor_runtime.serving.triton import TritonClient, model_repository_url
from tailor_runtime.store.local import LocalStore
from tailor_runtime.store.s3 import S3Store

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
NAME = "stories260K"
PROMPT = [[1, 403, 407, 261, 378, 267], [1, 333, 9, 400, 280, 311]]
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"
)


def run(out: Path, **config) -> dict:
    fmt = get_format("triton")
    return fmt.run(MODEL, out, fmt.Config(**config), ExportJob(no_progress))


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """stories260K's real torch.onnx.export, done once; every export below starts from a copy of it."""
    torch.set_num_threads(1)
    model, _ = load_causal_lm(MODEL)
    graph = tmp_path_factory.mktemp("traced") / "exported.onnx"
    return graph, onnx_export_core.export_decoder(model, graph, 18)


@pytest.fixture(scope="module")
def replay(traced):
    graph, scopes = traced

    def export_decoder(model, path, opset):
        shutil.copyfile(graph, path)
        return scopes

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export_core, "export_decoder", export_decoder)
        yield


@pytest.fixture(scope="module")
def repository(replay, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("triton") / "repository"
    return out, run(out, model_name=NAME)


@pytest.mark.slow
def test_the_repository_is_laid_out_verified_and_loadable(repository):
    out, result = repository
    assert {
        f"{NAME}/config.pbtxt",
        f"{NAME}/1/model.onnx",
        "tailor_format.json",
        "verification.json",
        "config.json",
        "tokenizer.json",
        "LICENSE",
    } <= set(result["files"])
    assert sorted(p.name for p in (out / NAME).iterdir()) == ["1", "config.pbtxt"]  # nothing else for Triton
    verification = result["verification"]
    assert (
        verification["passed"]
        and verification["max_abs_diff"] < 1e-3
        and verification["top1_agreement"] >= 0.99
    )
    assert verification["positions"] > 100
    checks = verification["checks"]
    assert checks["published"]["decode"]["positions"] == 18  # with past key/values too
    assert checks["repository"]["matches_graph"] and checks["repository"]["inputs"] == 13
    assert checks["repository"]["outputs"] == 11 and checks["repository"]["instance_kind"] == "KIND_CPU"
    fmt = result["format"]
    assert fmt["format"] == "triton-repository" and fmt["model_file"] == f"{NAME}/1/model.onnx"
    assert fmt["triton"]["model_name"] == NAME and fmt["weights"] == "float32" and fmt["variant"] == "onnx"
    saved = (out / "verification.json").read_text()
    assert '"tritonclient": "2.73.0"' in saved and '"protobuf"' in saved and '"onnxruntime"' in saved
    assert not list(out.parent.glob(".*partial*"))
    # The folder is also a Tailor model: the same graph, run by ONNX Runtime through tailor_format.json.
    model, _ = load_causal_lm(out)
    assert isinstance(model, OnnxCausalLM) and model.path == out / NAME / "1" / "model.onnx"


@pytest.mark.slow
def test_config_pbtxt_is_a_triton_model_config_that_matches_the_graph(repository):
    out, _ = repository
    text = (out / NAME / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    assert config.name == NAME and config.backend == "onnxruntime" and "\nmax_batch_size: 0\n" in text
    assert config.default_model_filename == "model.onnx" and config.version_policy.latest.num_versions == 1
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    tensors = {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in (*config.input, *config.output)}
    assert tensors["input_ids"] == ("TYPE_INT64", [-1, -1])
    assert tensors["past_key_values.4.value"] == ("TYPE_FP32", [-1, 4, -1, 8])
    assert tensors["logits"] == ("TYPE_FP32", [-1, -1, 512])
    assert tensors["present.0.key"] == ("TYPE_FP32", [-1, 4, -1, 8])
    inputs, outputs = graph_io(out / NAME / "1" / "model.onnx")
    assert tensors == {**inputs, **outputs} and len(config.input) == 13 and len(config.output) == 11
    assert not config.HasField("optimization")  # no TensorRT on a CPU instance


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace(
                'name: "logits"\n  data_type: TYPE_FP32', 'name: "logits"\n  data_type: TYPE_FP16'
            ),
            r"output 'logits' is TYPE_FP16, the graph's is TYPE_FP32",
        ),
        (lambda t: _drop_block(t, "output", "logits"), r"output 'logits' of the graph is missing"),
        (lambda t: _drop_block(t, "input", "position_ids"), r"input 'position_ids' of the graph is missing"),
        (
            lambda t: t.replace("dims: 512", "dims: 513"),
            r"output 'logits' has dims \[-1, -1, 513\], the graph's are \[-1, -1, 512\]",
        ),
        (lambda t: t.replace('name: "input_ids"', 'name: "tokens"'), r"input 'tokens' is not in the graph"),
        (lambda t: t.replace(f'name: "{NAME}"', 'name: "other"'), r"name 'other' is not the folder's name"),
        (lambda t: t.replace("max_batch_size: 0", "max_batch_size: 8"), r"max_batch_size 8 is not 0"),
        (lambda t: t.replace("backend:", "backends:"), r"not a valid Triton ModelConfig"),
        (lambda t: t.replace("TYPE_INT64", "TYPE_LONG", 1), r"not a valid Triton ModelConfig"),
    ],
    ids=[
        "dtype",
        "missing-output",
        "missing-input",
        "dims",
        "unknown-input",
        "name",
        "batch",
        "field",
        "enum",
    ],
)
@pytest.mark.slow
def test_a_config_that_disagrees_with_the_graph_is_refused_naming_it(repository, tmp_path, edit, message):
    out, _ = repository
    folder = tmp_path / NAME
    shutil.copytree(out / NAME, folder)
    config = folder / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    assert config.read_text() != (out / NAME / "config.pbtxt").read_text()
    with pytest.raises(InvalidArgument, match=message):
        check_model_folder(folder, 1)


def _drop_block(text: str, kind: str, name: str) -> str:
    start = text.index(f'{kind} {{\n  name: "{name}"')
    end = text.index("\n}\n", start) + 3
    return text[:start] + text[end:]


@pytest.mark.slow
def test_repository_bytes_are_identical_when_repeated(repository, replay, tmp_path):
    out, _ = repository
    run(tmp_path / "again", model_name=NAME)
    assert file_hashes(tmp_path / "again") == file_hashes(out)


@pytest.mark.slow
def test_fp16_variant_takes_its_types_from_the_graph(replay, tmp_path):
    result = run(tmp_path / "fp16", model_name="tiny-fp16", variant="onnx-fp16", device="gpu", instances=2)
    assert (
        result["format"]["weights"] == "float16" and result["verification"]["checks"]["published"]["passed"]
    )
    config = text_format.Parse((tmp_path / "fp16/tiny-fp16/config.pbtxt").read_text(), mc.ModelConfig())
    types = {t.name: mc.DataType.Name(t.data_type) for t in (*config.input, *config.output)}
    assert types["past_key_values.0.key"] == "TYPE_FP16" and types["input_ids"] == "TYPE_INT64"
    inputs, outputs = graph_io(tmp_path / "fp16/tiny-fp16/1/model.onnx")
    assert types == {name: dtype for name, (dtype, _) in {**inputs, **outputs}.items()}
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]


@pytest.mark.slow
def test_gpu_config_asks_for_the_tensorrt_accelerator(repository):
    out, _ = repository
    cfg = TritonExportConfig(model_name=NAME, device="gpu", tensorrt=True, tensorrt_precision="FP32")
    config = text_format.Parse(build_config(out / NAME / "1" / "model.onnx", cfg), mc.ModelConfig())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP32"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


@pytest.mark.slow
def test_an_export_that_computes_something_else_fails_and_publishes_nothing(replay, tmp_path, monkeypatch):
    real_reference = verify.reference_logits
    monkeypatch.setattr(verify, "reference_logits", lambda *args: real_reference(*args) + 0.01)
    with pytest.raises(VerificationFailed, match=r"max \|logit difference\| 0\.01 > atol 0\.001"):
        run(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_destination_is_never_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FailedPrecondition, match="not empty"):
        run(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_config_is_strict_and_names_are_triton_safe():
    fmt = get_format("triton")
    assert fmt.output_format == "triton-repository" and fmt.deterministic and fmt.Config is TritonExportConfig
    assert {"tritonclient", "protobuf", "onnxruntime"} <= set(fmt.libraries)
    assert TritonExportConfig.model_validate({"version": 2.0, "instances": 3.0}).version == 2  # from a Struct
    for bad in (
        {"model_name": "../up"},
        {"model_name": "a/b"},
        {"model_name": ""},
        {"model_name": ".hidden"},
        {"model_name": "graphs"},
        {"model_name": "x" * 129},
        {"variant": "ort"},
        {"device": "tpu"},
        {"tensorrt": True},  # needs device=gpu
        {"version": 0},
        {"instances": 0},
        {"format": "triton"},
    ):
        with pytest.raises(ValidationError):
            TritonExportConfig(**bad)
    assert triton_export.check_model_name("Stories_260K-v1.0") == "Stories_260K-v1.0"


def test_model_repository_url_is_tritons_form_for_each_store(tmp_path, capsys):
    artifact = "ab" * 32
    local = LocalStore(tmp_path / "store")
    assert model_repository_url(local, artifact) == f"{tmp_path}/store/artifacts/{artifact}/files"
    assert cli(["triton", "repository-url", artifact, "--store", str(tmp_path / "store")]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path}/store/artifacts/{artifact}/files"

    def s3(endpoint, prefix="tailor"):
        return S3Store("models", prefix, client=None, endpoint_url=endpoint)

    assert model_repository_url(s3(None), artifact) == f"s3://models/tailor/artifacts/{artifact}/files"
    assert model_repository_url(s3("http://minio:9000", ""), artifact) == (
        f"s3://minio:9000/models/artifacts/{artifact}/files"
    )
    assert model_repository_url(s3("https://s3.example.com"), artifact) == (
        f"s3://https://s3.example.com:443/models/tailor/artifacts/{artifact}/files"
    )
    with pytest.raises(InvalidArgument, match="with a path"):
        model_repository_url(s3("http://gateway:8080/s3"), artifact)
    with pytest.raises(InvalidArgument, match="artifact id"):
        model_repository_url(local, "../../etc")


# --- served by a real KServe v2 server through tritonclient ---------------------------------------------
@pytest.fixture(scope="module")
def published(repository, tmp_path_factory) -> Path:
    """The export published to an artifact store: its files/ prefix is the repository Triton is given."""
    out, _ = repository
    store = LocalStore(tmp_path_factory.mktemp("store"))
    manifest = store.publish_directory(out, kind="export", format="triton-repository")
    return Path(model_repository_url(store, manifest.id))


@pytest.fixture(scope="module")
def server(repository, published, tmp_path_factory):
    """MLServer on the published export and on a second repository holding a model `broken`, the same
    graph with a config.pbtxt that says its logits are FP16."""
    out, _ = repository
    assert file_hashes(published) == file_hashes(out)
    second = tmp_path_factory.mktemp("second")
    shutil.copytree(out / NAME, second / "broken")
    config = second / "broken" / "config.pbtxt"
    text = config.read_text().replace(f'name: "{NAME}"', 'name: "broken"')
    config.write_text(
        text.replace('name: "logits"\n  data_type: TYPE_FP32', 'name: "logits"\n  data_type: TYPE_FP16')
    )
    with mlserver([published, second], tmp_path_factory.mktemp("mlserver")) as running:
        yield running


@pytest.mark.integration
def test_deploy_infer_and_undeploy_through_tritonclient(server, repository, capsys):
    out, _ = repository
    with TritonClient(server.grpc_url) as client:
        assert client.live() and client.ready()
        assert sorted(m["name"] for m in client.index()) == ["broken", NAME]
        assert not client.ready(NAME)  # explicit control: nothing is loaded until deployed
        assert cli(["triton", "deploy", "--url", server.grpc_url, "--model", NAME]) == 0
        assert client.ready(NAME)
        assert cli(["triton", "status", "--url", server.grpc_url]) == 0
        assert "live=True ready=True" in capsys.readouterr().out
        metadata = client.metadata(NAME)
        assert metadata["versions"] == ["1"] and len(metadata["inputs"]) == 13
        shapes = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"] + metadata["outputs"]}
        assert shapes["past_key_values.0.key"] == ("FP32", [-1, 4, -1, 8]) and shapes["logits"][1] == [
            -1,
            -1,
            512,
        ]

        # The served logits are ONNX Runtime's own on the published graph, here in this process.
        local = OnnxCausalLM(out, f"{NAME}/1/model.onnx", threads=1)
        served = client.logits(NAME, PROMPT)
        expected = local(torch.tensor(PROMPT)).logits.numpy()
        assert served.shape == (2, 6, 512) and np.abs(served - expected).max() < 1e-4
        # Greedy decoding over the protocol, the KV cache sent back as past, is the local greedy decoding.
        tokens = client.generate(NAME, PROMPT, 5)
        assert tokens.tolist() == _greedy(local, PROMPT, 5)

        infer = ["triton", "infer", "--url", server.grpc_url, "--model", NAME]
        capsys.readouterr()
        assert cli([*infer, "--ids", "1,403,407,261", "--max-new-tokens", "3", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["new_ids"] == _greedy(local, [[1, 403, 407, 261]], 3)[0]

        client.undeploy(NAME)
        assert not client.ready(NAME)
        with pytest.raises(
            NotFound, match=f"'{NAME}': the Triton server at .* has no such model loaded.*deploy it first"
        ):
            client.logits(NAME, PROMPT)
    assert cli([*infer, "--ids", "1,2"]) == 2
    assert "deploy it first" in capsys.readouterr().out


@pytest.mark.integration
def test_unknown_models_and_unreachable_servers_are_clear_errors(server):
    with TritonClient(server.grpc_url) as client:
        with pytest.raises(NotFound, match="cannot load 'nope'"):
            client.deploy("nope")
        with pytest.raises(NotFound, match="cannot read the metadata of 'nope'"):
            client.metadata("nope")
        # The stand-in, like Triton's ONNX Runtime backend when it loads a model, refuses a config.pbtxt that disagrees with the graph.
        with pytest.raises(
            InvalidArgument, match=r"cannot load 'broken'.*'logits' is TYPE_FP16 in config\.pbtxt"
        ):
            client.deploy("broken")
        assert not client.ready("broken")
    with TritonClient("127.0.0.1:1", timeout_s=5) as client:
        with pytest.raises(Unavailable, match=r"127\.0\.0\.1:1 is unreachable"):
            client.live()
        with pytest.raises(Unavailable, match="unreachable"):
            client.deploy(NAME)


def _greedy(model: OnnxCausalLM, prompt: list[list[int]], steps: int) -> list[list[int]]:
    ids = torch.tensor(prompt)
    for _ in range(steps):
        next_ids = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, len(prompt[0]) :].tolist()
