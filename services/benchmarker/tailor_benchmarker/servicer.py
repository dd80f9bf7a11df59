"""BenchmarkerService: proto in, a measurement run as an operation, proto out. No ML here."""

from __future__ import annotations

import json
from typing import Any

from tailor.benchmarker.v1 import benchmarker_service_pb2 as pb
from tailor.benchmarker.v1 import benchmarker_service_pb2_grpc as pb_grpc
from tailor_benchmarker.config import BenchmarkConfig
from tailor_runtime.operations import WorkResult
from tailor_runtime.server import ServiceContext
from tailor_runtime.stage import config_from_struct, dataset_file, require_artifact, workspace


def headline_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the selector and the report compare, under the names the whole platform uses."""
    return {
        "perplexity": result["perplexity"]["perplexity"],
        "latency_ms_per_token": result["latency"]["ms_per_token"],
        "tokens_per_s": result["latency"]["tokens_per_s"],
        "peak_memory_mb": result["memory"]["peak_rss_mb"],
        "model_memory_mb": result["model_memory_mb"],
        "size_mb": result["size_on_disk_mb"],
        "eval_tokens": result["perplexity"].get("tokens_scored", 0),
        "environment": result.get("environment", {}),
    }


class BenchmarkerServicer(pb_grpc.BenchmarkerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def Benchmark(self, request: pb.BenchmarkRequest, context):
        from tailor_benchmarker.run import run_benchmark

        cfg = config_from_struct(BenchmarkConfig, request.config, "benchmark")
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        model_manifest = require_artifact(store, request.model, "model", ("model", "export"))
        eval_manifest = require_artifact(store, request.eval_data, "eval_data", ("dataset",))
        eval_path = dataset_file(eval_manifest)

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "model and evaluation text")
            model_dir = store.materialize(request.model.id, cache_dir)
            eval_dir = store.materialize(request.eval_data.id, cache_dir)
            result = run_benchmark(model_dir, eval_dir / eval_path, cfg, progress)
            metrics = headline_metrics(result)
            with workspace(cache_dir) as out:
                (out / "report.json").write_text(json.dumps({"model": request.model.id, **result}, indent=2))
                # A measurement is not deterministic (timings), so it is never served from the recipe cache.
                manifest = store.publish_directory(
                    out,
                    kind="report",
                    format="tailor-benchmark",
                    name=f"benchmark-{model_manifest.name}",
                    parents=[request.model.id, request.eval_data.id],
                    recipe={
                        "stage": "benchmark",
                        "config": cfg.model_dump(mode="json"),
                        "inputs": [request.model.id, request.eval_data.id],
                    },
                )
            return WorkResult(results=[manifest], metrics=metrics)

        return self.ctx.runner.start("benchmark", work, labels=dict(request.labels))


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_BenchmarkerServiceServicer_to_server(BenchmarkerServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["BenchmarkerService"].full_name]
