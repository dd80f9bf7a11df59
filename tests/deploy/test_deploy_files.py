"""The chart's values and the Dockerfiles, consistent with each other and with the services.

Rendering, validation and policy: test_chart.py; k8s/: test_k8s.py; skaffold.yaml: test_skaffold.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tailor"
COMPONENTS = ("gateway", "quantizer", "trainer", "benchmarker", "exporter", "selector")
DOCKERFILES = {
    "gateway": REPO / "gateway" / "Dockerfile",
    **{c: REPO / "services" / c / "Dockerfile" for c in COMPONENTS if c != "gateway"},
}
WITHOUT_TORCH = ("gateway", "selector")
WITH_VALUES_BLOCK = (*COMPONENTS, "triton")  # Triton runs NVIDIA's image but has the same values block


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _shape(value) -> object:
    """Keys all the way down, values ignored: two blocks with the same shape compare equal."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("requests", "limits")}
    return None


def test_every_component_has_the_same_values_block():
    values = _values()
    shapes = {c: _shape(values[c]) for c in WITH_VALUES_BLOCK}
    assert all(shape == shapes["gateway"] for shape in shapes.values()), shapes
    expected = {"enabled", "replicaCount", "image", "port", "resources", "gpu", "nodeSelector"}
    expected |= {"tolerations", "affinity", "env", "autoscaling", "pools"}
    assert set(values["gateway"]) == expected


def test_schema_requires_exactly_the_block_and_names_every_component():
    schema = json.loads((CHART / "values.schema.json").read_text())
    component = schema["definitions"]["component"]
    assert set(component["required"]) == set(_values()["gateway"])
    assert component["additionalProperties"] is False
    for name in WITH_VALUES_BLOCK:
        assert schema["properties"][name] == {"$ref": "#/definitions/component"}
    # a pool may set every per-pod setting of the block, and nothing else
    pool = schema["definitions"]["pool"]
    assert set(pool["properties"]) == set(component["properties"]) - {"enabled", "image", "port", "pools"} | {
        "name"
    }
    assert pool["additionalProperties"] is False and pool["required"] == ["name"]


@pytest.mark.parametrize("values_file", sorted((CHART / "ci").glob("*.yaml")), ids=lambda p: p.name)
def test_ci_value_files_only_set_known_keys(values_file):
    known = _values()

    def check(override, base, where):
        for key, value in override.items():
            assert key in base, f"{values_file.name}: unknown key {where}{key}"
            if isinstance(value, dict) and isinstance(base[key], dict) and base[key]:
                check(value, base[key], f"{where}{key}.")

    check(yaml.safe_load(values_file.read_text()), known, "")


def test_ports_match_the_services_defaults():
    values = _values()
    for name in COMPONENTS:
        package = "gateway/tailor_gateway" if name == "gateway" else f"services/{name}/tailor_{name}"
        main = (REPO / package / "__main__.py").read_text()
        assert f"port={values[name]['port']}" in main, f"{name}: chart port differs from __main__.py"


@pytest.mark.parametrize("name", COMPONENTS)
def test_dockerfile_is_slim_non_root_and_pinned(name):
    text = DOCKERFILES[name].read_text()
    assert "python:3.11-slim" in text
    assert re.search(r"^USER 10001", text, re.M), "the image must not run as root"
    assert "-r /tmp/requirements.txt" in text and "requirements.txt" in text  # pins from the one file
    assert f'CMD ["python", "-m", "tailor_{name}"]' in text
    assert f"TAILOR_PORT={_values()[name]['port']}" in text
    if name in WITHOUT_TORCH:
        assert "torch|transformers" in text, f"{name} must not install torch"
        assert "TORCH_INDEX" not in text


@pytest.mark.parametrize("component", ["exporter", "quantizer"])
def test_images_that_write_gguf_carry_llama_cpps_converter(component):
    """GGUF exports and the gguf_* methods run llama.cpp's converter (tailor_runtime.ml.llama_cpp_convert):
    the image extracts it with the same script as `make converter` and says where it is."""
    text = DOCKERFILES[component].read_text()
    assert "RUN tools/llama-cpp-converter.sh /converter" in text
    assert "COPY --from=llamacpp /converter/ /opt/llama.cpp/" in text
    assert "ENV TAILOR_LLAMA_CPP_CONVERTER=/opt/llama.cpp" in text
    assert (REPO / "tools" / "llama-cpp-converter.sh").stat().st_mode & 0o111  # executable in the build


def test_the_image_the_web_front_runs_from_holds_its_package():
    """The chart's web component runs `python -m tailor_web` from the gateway's image (skaffold.yaml
    sets it so): that Dockerfile must copy web/, whose absence setup.py would skip without a word."""
    values = _values()
    assert values["web"]["image"]["repository"] == values["gateway"]["image"]["repository"]
    copies = re.findall(r"^COPY (\S+)", DOCKERFILES["gateway"].read_text(), flags=re.M)
    assert "web/" in copies
