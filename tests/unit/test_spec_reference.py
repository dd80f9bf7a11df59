"""docs/spec-reference.md is what tools/spec_reference.py generates from the code's own models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("spec_reference", REPO / "tools" / "spec_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_the_generated_one():
    generated = _generator().render()
    committed = (REPO / "docs" / "spec-reference.md").read_text()
    assert committed == generated, (
        "docs/spec-reference.md is stale: run .venv/bin/python tools/spec_reference.py"
    )


def test_the_reference_names_every_method_and_its_settings():
    from tailor_quantizer.methods.registry import list_methods

    text = (REPO / "docs" / "spec-reference.md").read_text()
    for method in list_methods():
        assert f"`quantize[].method: {method.name}` config" in text
    assert "| `steps` | integer |" in text and "| `threads` |" in text  # fine-tune and benchmark keys
