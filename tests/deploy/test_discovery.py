"""EndpointSlice discovery (gateway/tailor_gateway/discovery.py) against recorded API responses.

tests/fixtures/k8s/endpointslices-page{1,2}.json are EndpointSliceList responses of
GET /apis/discovery.k8s.io/v1/namespaces/tailor/endpointslices, written in the API's wire format (no live
cluster was run: every item is checked against the Kubernetes 1.32 schema below). They hold several slices
per Service, ready, not-ready, terminating and condition-less endpoints, an endpoint listed in two slices,
an IPv6 slice, an empty slice (endpoints: null), the gateway's own slice and a continue token. A local
HTTP server answers as the API server would, so the real `kubernetes` client makes the calls.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
import pytest
from deploy_support import KUBE_VERSION, REPO

from tailor_gateway.discovery import EndpointSliceDiscovery, pools_from_slices
from tailor_gateway.workers import WorkerPools
from tailor_runtime.errors import Unavailable

FIXTURES = REPO / "tests" / "fixtures" / "k8s"
PAGES = [json.loads((FIXTURES / f"endpointslices-page{n}.json").read_text()) for n in (1, 2)]
SELECTOR = "app.kubernetes.io/name=tailor,app.kubernetes.io/instance=tailor"
EXPECTED = {
    "quantizer": ["10.244.1.17:50052", "10.244.2.31:50052", "10.244.4.12:50052"],
    "trainer": ["10.244.5.4:50053"],
    "benchmarker": ["[fd00:10:244::2a]:50054"],
    "exporter": [],
    "selector": ["10.244.1.40:50056"],
}


class FakeApiServer:
    """Serves the recorded pages at the API's path, following `continue`; records each request's query."""

    def __init__(self):
        self.requests: list[dict] = []
        self.status = 200
        self.pages = PAGES
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                server.requests.append({"path": url.path, **query})
                if server.status != 200:
                    body = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "code": server.status,
                        "reason": "Forbidden",
                        "message": "endpointslices.discovery.k8s.io is forbidden",
                    }
                else:
                    assert url.path == "/apis/discovery.k8s.io/v1/namespaces/tailor/endpointslices"
                    body = server.pages[1] if query.get("continue") else server.pages[0]
                data = json.dumps(body).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def api_client(self):
        from kubernetes import client

        config = client.Configuration()
        config.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return client.ApiClient(config)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_server():
    server = FakeApiServer()
    yield server
    server.close()


def _items() -> list[dict]:
    return [item for page in PAGES for item in page["items"]]


def test_fixtures_are_valid_endpointslices():
    for item in _items():
        kubernetes_validate.validate(
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", **item}, KUBE_VERSION, strict=True
        )


def test_pools_join_slices_keep_ready_endpoints_and_skip_the_rest():
    assert pools_from_slices(_items()) == EXPECTED


def test_not_ready_terminating_and_foreign_endpoints_are_left_out():
    addresses = {a for pool in pools_from_slices(_items()).values() for a in pool}
    assert "10.244.3.9:50052" not in addresses  # ready: false (starting)
    assert "10.244.4.13:50052" not in addresses  # terminating, though still serving
    assert "[fd00:10:244::2b]:50054" not in addresses  # ready: false
    assert "10.244.1.41:50051" not in addresses  # the gateway's own Service is no pool


def test_pool_comes_from_the_label_and_port_from_the_grpc_port():
    item = json.loads(json.dumps(PAGES[0]["items"][2]))  # the trainer slice
    item["metadata"]["labels"]["app.kubernetes.io/component"] = "selector"
    item["ports"] = [{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 6000}]
    assert pools_from_slices([item])["selector"] == ["10.244.5.4:6000"]
    item["ports"] = [{"name": "metrics", "port": 9090}]
    assert pools_from_slices([item])["selector"] == []


def test_the_kubernetes_client_lists_every_page_with_the_selector(api_server):
    discovery = EndpointSliceDiscovery("tailor", SELECTOR, api_client=api_server.api_client(), page_size=4)
    assert discovery.refresh() == EXPECTED
    assert dict(discovery) == EXPECTED
    first, second = api_server.requests
    assert first["labelSelector"] == SELECTOR and first["limit"] == "4" and "continue" not in first
    assert second["continue"] == PAGES[0]["metadata"]["continue"]


def test_a_failed_list_keeps_the_last_known_workers(api_server, caplog):
    discovery = EndpointSliceDiscovery("tailor", SELECTOR, refresh_s=0.05, api_client=api_server.api_client())
    discovery.start()
    try:
        assert discovery["quantizer"] == EXPECTED["quantizer"]
        api_server.status = 403
        time.sleep(0.3)
        assert discovery["quantizer"] == EXPECTED["quantizer"]
        assert "needs list on discovery.k8s.io/endpointslices" in caplog.text
        api_server.status = 200
        api_server.pages = [dict(PAGES[0], metadata={}, items=PAGES[0]["items"][:1]), PAGES[1]]
        deadline = time.monotonic() + 5
        while discovery["quantizer"] != ["10.244.1.17:50052", "10.244.2.31:50052"]:
            assert time.monotonic() < deadline, "a scale-down was never seen"
            time.sleep(0.05)
    finally:
        discovery.stop()


class _Growing(dict):
    """A discovered pool that is empty until the autoscaler's pod turns ready."""

    dynamic = True


def test_a_stage_waits_for_an_empty_discovered_pool_to_fill():
    pools = _Growing({"exporter": []})

    async def scenario():
        workers = WorkerPools(pools, wait_for_worker_s=5.0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, pools.__setitem__, "exporter", ["10.244.9.9:50055"])
        seen = []

        async def call(channel):
            seen.append(channel)
            return "op-1"

        try:
            return await workers.dispatch("exporter", call), seen
        finally:
            await workers.close()

    (address, result), seen = asyncio.run(scenario())
    assert (address, result) == ("10.244.9.9:50055", "op-1") and len(seen) == 1


def test_static_pools_still_fail_at_once_when_empty():
    """An empty static pool refuses at once instead of waiting for a worker: with an hour to wait, the
    refusal must come before a 60 s deadline (a deadline, not a timing claim)."""

    async def scenario():
        pools = WorkerPools({"exporter": []}, wait_for_worker_s=3600.0)
        await asyncio.wait_for(pools.dispatch("exporter", None), timeout=60)

    with pytest.raises(Unavailable, match="no exporter workers are configured"):
        asyncio.run(scenario())
