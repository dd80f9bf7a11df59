"""Worker pools from Kubernetes EndpointSlices (TAILOR_DISCOVERY=kubernetes).

Each pool is a Service of the chart (label app.kubernetes.io/component=<pool>); the EndpointSlice
controller copies a Service's labels onto its slices, so one labelled list call in the gateway's namespace
returns every slice of every pool. A pool's addresses are the ready, not terminating endpoints of all its
slices (a Service with many pods has several slices, and an endpoint can sit in two while they are
rebalanced), on the slice port named `grpc`.

The slices are listed again every `refresh_s` seconds in a daemon thread; a failed list keeps the last
known pools. The `kubernetes` client is imported only here, and only when this mode is chosen.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tailor_gateway.workers import POOLS

log = logging.getLogger("tailor.gateway.discovery")

POOL_LABEL = "app.kubernetes.io/component"
PORT_NAME = "grpc"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _address(host: str, port: int, address_type: str) -> str:
    return f"[{host}]:{port}" if address_type == "IPv6" else f"{host}:{port}"


def _usable(endpoint: dict[str, Any]) -> bool:
    conditions = endpoint.get("conditions") or {}
    # The API says a missing `ready` means ready; a terminating pod is draining (NOT_SERVING) either way.
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def pools_from_slices(
    slices: list[dict[str, Any]], pool_label: str = POOL_LABEL, port_name: str = PORT_NAME
) -> dict[str, list[str]]:
    """EndpointSlice objects (API JSON) -> {pool: sorted 'host:port' of its usable endpoints}."""
    found: dict[str, set[str]] = {pool: set() for pool in POOLS}
    for item in slices:
        pool = ((item.get("metadata") or {}).get("labels") or {}).get(pool_label)
        if pool not in found:
            continue
        ports = [p.get("port") for p in item.get("ports") or [] if p.get("name") == port_name]
        if not ports or ports[0] is None:
            continue
        for endpoint in item.get("endpoints") or []:
            if _usable(endpoint):
                for host in endpoint.get("addresses") or []:
                    found[pool].add(_address(host, ports[0], item.get("addressType", "IPv4")))
    return {pool: sorted(addresses) for pool, addresses in found.items()}


def default_namespace() -> str:
    """The pod's own namespace (mounted with its service account token), else `default`."""
    try:
        return NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def kubernetes_api_client():
    """In a pod: its service account; elsewhere: the current kubeconfig context."""
    from kubernetes import client, config  # noqa: PLC0415 - only the kubernetes mode needs it

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class EndpointSliceDiscovery(Mapping[str, list[str]]):
    """A read-only {pool: [address]} that follows the cluster; WorkerPools reads it on every dispatch."""

    dynamic = True  # WorkerPools: an empty pool may fill up later, so wait for it

    def __init__(
        self,
        namespace: str,
        label_selector: str,
        refresh_s: float = 5.0,
        api_client=None,
        page_size: int = 500,
    ):
        self.namespace = namespace
        self.label_selector = label_selector
        self.refresh_s = refresh_s
        self.page_size = page_size
        self._api_client = api_client
        self._pools: dict[str, list[str]] = {pool: [] for pool in POOLS}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Mapping: the dict is replaced whole, so a reader never sees half an update.
    def __getitem__(self, pool: str) -> list[str]:
        return self._pools[pool]

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def list_slices(self) -> list[dict[str, Any]]:
        """Every matching EndpointSlice of the namespace, page by page, as the API's JSON."""
        from kubernetes import client  # noqa: PLC0415

        if self._api_client is None:
            self._api_client = kubernetes_api_client()
        api = client.DiscoveryV1Api(self._api_client)
        items: list[dict[str, Any]] = []
        token = None
        while True:
            kwargs = {"label_selector": self.label_selector, "limit": self.page_size}
            if token:
                kwargs["_continue"] = token
            # Raw JSON: the same shape as `kubectl get endpointslices -o json` and the recorded fixtures.
            response = api.list_namespaced_endpoint_slice(self.namespace, _preload_content=False, **kwargs)
            page = json.loads(response.data)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def refresh(self) -> dict[str, list[str]]:
        pools = pools_from_slices(self.list_slices())
        if pools != self._pools:
            log.info("worker pools: %s", {p: len(a) for p, a in pools.items()})
        self._pools = pools
        return pools

    def start(self) -> EndpointSliceDiscovery:
        """List once now (errors logged, not raised), then keep listing in a daemon thread."""
        self._refresh_logged()
        self._thread = threading.Thread(target=self._run, name="endpointslice-discovery", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=self.refresh_s + 1)

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # the API server can be away for a while; keep the last known pools
            log.warning(
                "listing EndpointSlices in %s (%s) failed, keeping the last known workers: %s "
                "(the gateway's ServiceAccount needs list on discovery.k8s.io/endpointslices)",
                self.namespace,
                self.label_selector,
                exc,
            )

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self._refresh_logged()
