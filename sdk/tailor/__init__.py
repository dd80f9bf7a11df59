"""Tailor's Python SDK: fine-tune, quantize, benchmark, export and select through the gateway.

    import tailor

    client = tailor.Client()                      # TAILOR_GATEWAY / TAILOR_TOKEN, or the local stack
    pipeline = client.submit("examples/quickstart.yaml")
    for snapshot in client.watch(pipeline.id):    # or client.wait(pipeline.id, on_update=print)
        print(snapshot.state, [(s.name, s.state) for s in snapshot.stages])
    client.download(client.pipeline(pipeline.id).report_id, "report/")

This package also holds the generated gRPC stubs (`tailor.gateway.v1`, `tailor.common.v1`, ...), which the
services import; so nothing heavy is imported here until a name below is first used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Client": "tailor.client",
    "Pipeline": "tailor.client",
    "Stage": "tailor.client",
    "ResourcePlan": "tailor.client",
    "Artifact": "tailor.client",
    "ClientError": "tailor.errors",
    "RequestRefused": "tailor.errors",
    "PipelineFailed": "tailor.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tailor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
