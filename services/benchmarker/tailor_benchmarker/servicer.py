"""BenchmarkerService: proto in, a measurement run as an operation, proto out. No ML here."""

from __future__ import annotations

from typing import Any

from tailor.benchmarker.v1 import benchmarker_service_pb2 as pb
from tailor.benchmarker.v1 import benchmarker_service_pb2_grpc as pb_grpc
from tailor_benchmarker.config import BenchmarkConfig
from tailor_runtime.benchmark_report import FORMAT as REPORT_FORMAT
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.operations import WorkResult
from tailor_runtime.server import ServiceContext
from tailor_runtime.stage import (
    config_from_struct,
    dataset_file,
    require_architecture,
    require_artifact,
    workspace,
)


def choice_file(manifest: Any) -> str:
    """The one .tsv file of a multiple-choice dataset artifact."""
    tables = [f.path for f in manifest.files if f.path.endswith(".tsv")]
    if len(tables) != 1:
        raise InvalidArgument(
            f"choice_data must hold exactly one .tsv file (sentence, label); it holds {[f.path for f in manifest.files]}"
        )
    return tables[0]


class BenchmarkerServicer(pb_grpc.BenchmarkerServiceServicer):
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx

    async def Benchmark(self, request: pb.BenchmarkRequest, context):
        from tailor_benchmarker.run import benchmark

        cfg = config_from_struct(BenchmarkConfig, request.config, "benchmark")
        store, cache_dir = self.ctx.store, self.ctx.settings.cache_dir
        model_manifest = require_artifact(store, request.model, "model", ("model", "export"))
        require_architecture(store, request.model.id, "benchmark")
        eval_manifest = require_artifact(store, request.eval_data, "eval_data", ("dataset",))
        eval_path = dataset_file(eval_manifest)
        inputs = [request.model.id, request.eval_data.id]
        reference_id = request.reference_model.id
        if reference_id:
            require_artifact(store, request.reference_model, "reference_model", ("model", "export"))
            inputs.append(reference_id)
        choice_id = request.choice_data.id
        if choice_id:
            choice_path = choice_file(
                require_artifact(store, request.choice_data, "choice_data", ("dataset",))
            )
            inputs.append(choice_id)

        def work(progress) -> WorkResult:
            progress(1.0, "fetching", "model and evaluation text")
            model_dir = store.materialize(request.model.id, cache_dir)
            eval_dir = store.materialize(request.eval_data.id, cache_dir)
            reference_dir = store.materialize(reference_id, cache_dir) if reference_id else None
            choices = store.materialize(choice_id, cache_dir) / choice_path if choice_id else None
            report = benchmark(model_dir, eval_dir / eval_path, cfg, progress, reference_dir, choices)
            ids = {
                "model_id": request.model.id,
                **({"reference_model": reference_id} if reference_id else {}),
            }
            report = report.model_copy(update=ids)
            with workspace(cache_dir) as out:
                (out / "report.json").write_text(report.dump_json())
                # A measurement is not deterministic (timings), so it is never served from the recipe cache.
                manifest = store.publish_directory(
                    out,
                    kind="report",
                    format=REPORT_FORMAT,
                    name=f"benchmark-{model_manifest.name}",
                    parents=inputs,
                    recipe={"stage": "benchmark", "config": cfg.model_dump(mode="json"), "inputs": inputs},
                )
            return WorkResult(results=[manifest], metrics=report.headline())

        return self.ctx.runner.start("benchmark", work, labels=dict(request.labels))


def register(server, ctx: ServiceContext) -> list[str]:
    pb_grpc.add_BenchmarkerServiceServicer_to_server(BenchmarkerServicer(ctx), server)
    return [pb.DESCRIPTOR.services_by_name["BenchmarkerService"].full_name]
