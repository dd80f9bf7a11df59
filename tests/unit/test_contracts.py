"""Every generated stub imports, and the protos follow the house rules (versioned, UNSPECIFIED = 0)."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def _module(proto: Path, suffix: str) -> str:
    rel = proto.relative_to(ROOT / "protos").with_suffix("")
    return ".".join(rel.parts) + suffix


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_stubs_import_and_follow_conventions(proto):
    messages = importlib.import_module(_module(proto, "_pb2"))
    importlib.import_module(_module(proto, "_pb2_grpc"))
    descriptor = messages.DESCRIPTOR
    assert descriptor.package.startswith("tailor.") and descriptor.package.split(".")[-1] == "v1"
    for enum in descriptor.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
    for service in descriptor.services_by_name.values():
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request", f"{service.name}.{method.name}"


def test_every_service_has_a_proto():
    packages = {p.parent.parent.name for p in PROTOS}
    assert {"common", "quantizer", "trainer", "benchmarker", "exporter", "selector", "gateway"} <= packages
