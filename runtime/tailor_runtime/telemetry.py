"""Prometheus metrics and OpenTelemetry tracing, shared by every service.

Traces: the gateway starts one trace per pipeline and sends its context in gRPC metadata
(W3C traceparent); every service continues it. Spans go to a JSON-lines file (TAILOR_TRACE_FILE,
used locally and by the tests) and/or an OTLP endpoint. Both are written by a background thread:
ending a span only queues it, so the event loop never serializes spans or touches the file (that was
14% of the gateway's loop under load, issue 23).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter("tailor_rpc_requests_total", "gRPC requests handled", ["service", "method", "code"])
RPC_LATENCY = Histogram("tailor_rpc_latency_seconds", "gRPC request latency", ["service", "method"])
OPERATIONS = Gauge("tailor_operations", "Operations by state", ["service", "kind", "state"])
STAGE_SECONDS = Histogram(
    "tailor_stage_duration_seconds",
    "Wall time of finished operations",
    ["service", "kind", "method", "outcome"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file; several processes may share it (one line per write)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(parent.span_id, "016x") if parent else None,
                        "service": span.resource.attributes.get("service.name"),
                        "start": span.start_time,
                        "end": span.end_time,
                        "attributes": dict(span.attributes or {}),
                        "status": span.status.status_code.name,
                    }
                )
            )
        with self._lock, open(self.path, "a") as handle:
            handle.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


# The trace file's writer wakes this often: a SIGKILLed process loses at most the spans of its last
# ~0.1 s (a clean exit flushes everything: TracerProvider shuts its processors down at exit).
TRACE_FILE_DELAY_MS = 100
# Room for bursts between two writes; past it the SDK drops spans (and logs it) rather than grow.
TRACE_QUEUE_SPANS = 8192


def trace_file_processor(exporter: SpanExporter) -> BatchSpanProcessor:
    """Spans queued on end, written by the SDK's worker thread every TRACE_FILE_DELAY_MS."""
    return BatchSpanProcessor(
        exporter, schedule_delay_millis=TRACE_FILE_DELAY_MS, max_queue_size=TRACE_QUEUE_SPANS
    )


def setup_tracing(service: str, trace_file: Path | None, otlp_endpoint: str | None) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": f"tailor-{service}"}))
    if trace_file:
        trace_file.parent.mkdir(parents=True, exist_ok=True)
        provider.add_span_processor(trace_file_processor(JsonLinesSpanExporter(trace_file)))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise SystemExit(
                "TAILOR_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not installed"
            ) from exc
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    trace.set_tracer_provider(provider)


def start_metrics_server(port: int, host: str) -> None:
    if port:
        start_http_server(port, addr=host)


def inject_metadata(context=None) -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata, for outgoing calls."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return list(carrier.items())


def extract_context(metadata) -> object:
    return propagate.extract({k: v for k, v in (metadata or ())})


def tracer():
    return trace.get_tracer("tailor")
