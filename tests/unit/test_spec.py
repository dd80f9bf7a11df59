"""Pipeline specs: every shipped YAML validates; mistakes are named by their field path."""

from pathlib import Path

import pytest

from tailor_gateway.spec import parse_spec, plan
from tailor_runtime.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "examples").glob("*.yaml"))
ID = "a" * 64


def test_there_are_shipped_specs():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_validates_and_inputs_exist(path):
    spec = parse_spec(path.read_text(), require_artifacts=False)
    for name, ref in spec.inputs().items():
        assert ref.path is not None and (path.parent / ref.path).exists(), name
    stages = plan(spec)
    assert stages[-1].name == "report"


def _spec(extra: str = "") -> str:
    return f"""
name: t
model: {{artifact: {ID}}}
data: {{train: {{artifact: {ID}}}, eval: {{artifact: {ID}}}}}
finetune: {{method: lora}}
quantize: [{{method: bf16}}, {{method: nf4}}]
export: {{format: onnx}}
{extra}
"""


def test_dag_fans_out_and_in():
    stages = {s.name: s for s in plan(parse_spec(_spec()))}
    assert stages["quantize/nf4"].depends_on == ["finetune"]
    assert stages["benchmark/nf4"].depends_on == ["quantize/nf4"]
    assert stages["benchmark/original"].depends_on == ["finetune"]
    assert stages["select"].depends_on == [
        "benchmark/base",
        "benchmark/original",
        "benchmark/bf16",
        "benchmark/nf4",
    ]
    assert stages["benchmark/base"].depends_on == []  # the base model, measured beside the fine-tuned one
    assert stages["export"].depends_on == ["select"]
    assert stages["report"].depends_on == ["export"]


@pytest.mark.parametrize(
    "extra, path",
    [
        ("colour: blue", "colour"),
        ("select: {constraints: {max_memory_mb: -1}}", "select.constraints.max_memory_mb"),
        ("select: {constraints: {max_ram: 3}}", "select.constraints.max_ram"),
        ("benchmark: {config: {}, repeat: 2}", "benchmark.repeat"),
    ],
)
def test_errors_name_the_field(extra, path):
    with pytest.raises(InvalidArgument) as err:
        parse_spec(_spec(extra))
    assert path in err.value.message


def test_local_paths_are_refused_by_the_gateway():
    text = _spec().replace(f"model: {{artifact: {ID}}}", "model: {path: /etc}")
    with pytest.raises(InvalidArgument, match="upload them first"):
        parse_spec(text)


def test_duplicate_candidates_and_bad_yaml():
    with pytest.raises(InvalidArgument, match="unique names"):
        parse_spec(_spec().replace("{method: nf4}", "{method: bf16}"))
    with pytest.raises(InvalidArgument, match="not valid YAML"):
        parse_spec("name: [")


def test_oversized_specs_are_refused_before_parsing():
    many = "\n".join(f"  - {{method: bf16, name: c{i}}}" for i in range(20_003))
    text = _spec().split("quantize:")[0] + "quantize:\n" + many + "\n"
    with pytest.raises(InvalidArgument, match="at most"):
        parse_spec(text)
    small = "\n".join(f"  - {{method: bf16, name: c{i}}}" for i in range(65))
    with pytest.raises(InvalidArgument, match="65 candidates; at most 64"):
        parse_spec(_spec().split("quantize:")[0] + "quantize:\n" + small + "\n")
