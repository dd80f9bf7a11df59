"""Worker pools and dispatch: an idle worker of the right pool gets the stage.

Locally the pools are a static list (TAILOR_WORKERS); in a cluster they come from Kubernetes
EndpointSlices (discovery.py, TAILOR_DISCOVERY=kubernetes). A busy worker answers RESOURCE_EXHAUSTED
and a dead one UNAVAILABLE: either way the next worker is tried, then the pool is retried with
exponential backoff and jitter, capped.

Every call to a worker carries the gateway's proof (trust.py): its client certificate over mutual TLS
and/or the stack's shared secret, and the project it acts for (`trust.call_project`, which the engine
sets per pipeline). Workers refuse anything else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import grpc
from prometheus_client import Gauge

from tailor_runtime.errors import InvalidArgument, Unavailable
from tailor_runtime.grpc_options import GRPC_OPTIONS
from tailor_runtime.trust import worker_call_interceptors

log = logging.getLogger("tailor.gateway.workers")
T = TypeVar("T")

POOLS = ("trainer", "quantizer", "benchmarker", "exporter", "selector")
STAGE_POOL = {
    "finetune": "trainer",
    "quantize": "quantizer",
    "benchmark": "benchmarker",
    "export": "exporter",
    "select": "selector",
}
# DEADLINE_EXCEEDED: a hung worker (alive socket, no answer). Should it have started the operation after
# all, that operation is orphaned; the recipe cache keeps a deterministic result from being redone.
RETRYABLE = (
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)

# What an autoscaler scales worker pools on.
QUEUE_DEPTH = Gauge("tailor_gateway_queue_depth", "Stages waiting for a worker, per pool", ["pool"])


def parse_workers(text: str) -> dict[str, list[str]]:
    """'quantizer=host:port,host:port;trainer=host:port' -> {pool: [addresses]}."""
    pools: dict[str, list[str]] = {p: [] for p in POOLS}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        pool, _, addresses = part.partition("=")
        pool = pool.strip()
        if pool not in POOLS:
            raise InvalidArgument(f"TAILOR_WORKERS names an unknown pool {pool!r}", choices=POOLS)
        for address in filter(None, (a.strip() for a in addresses.split(","))):
            if ":" not in address:
                raise InvalidArgument(f"worker address {address!r} must be host:port")
            pools[pool].append(address)
    return pools


class Backoff:
    def __init__(self, base: float = 0.5, cap: float = 10.0):
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        # "Full jitter": spreads retries of many stages so they do not hit a pool in lockstep.
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay


class WorkerPools:
    def __init__(
        self,
        pools: Mapping[str, list[str]],
        wait_for_worker_s: float = 600.0,
        credentials: grpc.ChannelCredentials | None = None,
        secret: str = "",
        tls_server_name: str = "",
    ):
        self.pools = pools
        self.wait_for_worker_s = wait_for_worker_s
        self.credentials = credentials  # mutual TLS to the workers when TAILOR_TLS_* are set
        self._interceptors = worker_call_interceptors(secret)  # the stack's secret and the project
        # Over TLS, the name checked in each worker's certificate when its address is an IP (discovery).
        override = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        self._options = [*GRPC_OPTIONS, *override]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cursor = {p: itertools.count() for p in POOLS}
        self._suspect_until: dict[str, float] = {}

    def suspect(self, address: str, for_s: float) -> None:
        """A worker that hung: tried after every other worker of its pool for the next for_s seconds."""
        self._suspect_until[address] = asyncio.get_running_loop().time() + for_s

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            options, interceptors = self._options, self._interceptors
            if self.credentials is not None:
                channel = grpc.aio.secure_channel(
                    address, self.credentials, options=options, interceptors=interceptors
                )
            else:
                channel = grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
            self._channels[address] = channel
        return self._channels[address]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()

    async def dispatch(self, pool: str, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> tuple[str, T]:
        """Run `call` on the first worker of `pool` that accepts it; wait and retry while all are busy."""
        # Discovered pools (discovery.py) change under us and are empty while a pool scales up from
        # nothing: there a stage waits, counted in the queue depth, instead of failing at once.
        dynamic = getattr(self.pools, "dynamic", False)
        if not self.pools.get(pool) and not dynamic:
            raise Unavailable(f"no {pool} workers are configured (TAILOR_WORKERS)")
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_for_worker_s
        QUEUE_DEPTH.labels(pool).inc()
        try:
            while True:
                addresses = list(self.pools.get(pool) or [])
                start = next(self._cursor[pool])
                now = loop.time()
                ordered = [addresses[(start + k) % len(addresses)] for k in range(len(addresses))]
                ordered.sort(key=lambda a: self._suspect_until.get(a, 0.0) > now)  # stable: suspects last
                last_error: grpc.aio.AioRpcError | None = None
                for address in ordered:
                    try:
                        return address, await call(self.channel(address))
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() not in RETRYABLE:
                            raise
                        last_error = exc
                if loop.time() > deadline:
                    detail = last_error.details() if last_error else "no ready worker"
                    raise Unavailable(
                        f"no {pool} worker accepted the stage within {self.wait_for_worker_s:.0f}s "
                        f"(last answer: {detail})"
                    )
                await asyncio.sleep(backoff.next_delay())
        finally:
            QUEUE_DEPTH.labels(pool).dec()
