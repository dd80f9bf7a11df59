"""Span export leaves the caller's thread (the gateway's event loop) and still writes every span."""

import json
import threading

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from tailor_runtime.telemetry import JsonLinesSpanExporter, trace_file_processor


class RecordingExporter(JsonLinesSpanExporter):
    """The real file exporter, noting which thread wrote each batch."""

    def __init__(self, path):
        super().__init__(path)
        self.threads: set[int] = set()

        self.written = threading.Event()

    def export(self, spans):
        self.threads.add(threading.get_ident())
        result = super().export(spans)
        self.written.set()
        return result


def _provider(exporter):
    provider = TracerProvider(
        resource=Resource.create({"service.name": "tailor-test"}), shutdown_on_exit=False
    )
    provider.add_span_processor(trace_file_processor(exporter))
    return provider


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_spans_are_written_by_a_background_thread(tmp_path):
    exporter = RecordingExporter(tmp_path / "traces.jsonl")
    provider = _provider(exporter)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root", kind=trace.SpanKind.SERVER) as root:
        root.set_attribute("tailor.pipeline_id", "p1")
        with tracer.start_as_current_span("child"):
            pass
    # No flush from this thread: the processor's own thread writes on its schedule.
    assert exporter.written.wait(timeout=30)
    worker_threads = set(exporter.threads)
    provider.force_flush()  # in case the worker woke between the two ends
    spans = {s["name"]: s for s in _lines(exporter.path)}
    assert set(spans) == {"root", "child"}
    assert spans["child"]["parent_id"] == spans["root"]["span_id"]
    assert spans["child"]["trace_id"] == spans["root"]["trace_id"]
    assert spans["root"]["attributes"] == {"tailor.pipeline_id": "p1"}
    assert spans["root"]["service"] == "tailor-test" and spans["root"]["status"] == "UNSET"
    assert worker_threads and threading.get_ident() not in worker_threads
    provider.shutdown()


def test_shutdown_writes_what_is_still_queued(tmp_path):
    exporter = RecordingExporter(tmp_path / "traces.jsonl")
    provider = _provider(exporter)
    tracer = provider.get_tracer("t")
    for i in range(300):
        tracer.start_span(f"s{i}").end()
    provider.shutdown()  # what a clean exit does (TracerProvider's atexit hook)
    assert sorted(s["name"] for s in _lines(exporter.path)) == sorted(f"s{i}" for i in range(300))
