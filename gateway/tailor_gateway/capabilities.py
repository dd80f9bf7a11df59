"""Method and format names in a spec checked at submit, against what the worker pools offer.

CreatePipeline asks each pool the spec needs (quantizer ListMethods, trainer ListMethods, exporter
ListFormats) with a short deadline, and caches the answer for a few seconds, so a burst of submissions
costs one round of calls. A name that no answering worker lists is INVALID_ARGUMENT, with the field
path and the valid choices. When no worker of a pool answers (none running yet, all busy restarting,
a pool scaling up from zero), the spec is accepted: dispatch checks the name again on the worker and
fails the stage with the same INVALID_ARGUMENT, so nothing is lost by not knowing now.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from tailor.exporter.v1 import exporter_service_pb2 as export_pb
from tailor.exporter.v1 import exporter_service_pb2_grpc as export_grpc
from tailor.quantizer.v1 import quantizer_service_pb2 as quant_pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as quant_grpc
from tailor.trainer.v1 import trainer_service_pb2 as train_pb
from tailor.trainer.v1 import trainer_service_pb2_grpc as train_grpc
from tailor_gateway.spec import PipelineSpec
from tailor_gateway.workers import WorkerPools
from tailor_runtime.errors import InvalidArgument

log = logging.getLogger("tailor.gateway.capabilities")

# pool -> the call that lists its names on one worker's channel.
_LISTERS = {
    "quantizer": lambda ch, t: quant_grpc.QuantizerServiceStub(ch).ListMethods(
        quant_pb.ListMethodsRequest(), timeout=t
    ),
    "trainer": lambda ch, t: train_grpc.TrainerServiceStub(ch).ListMethods(
        train_pb.ListMethodsRequest(), timeout=t
    ),
    "exporter": lambda ch, t: export_grpc.ExporterServiceStub(ch).ListFormats(
        export_pb.ListFormatsRequest(), timeout=t
    ),
}
# kind of name -> (the pool that lists it, what the names are, the reply's field). The exporter's one
# reply lists both its formats and its targets.
_KINDS = {
    "quantizer": ("quantizer", "quantization method", "methods"),
    "trainer": ("trainer", "fine-tuning method", "methods"),
    "exporter": ("exporter", "export format", "formats"),
    "export-target": ("exporter", "export target", "targets"),
}


class Capabilities:
    def __init__(self, pools: WorkerPools, timeout_s: float = 2.0, ttl_s: float = 5.0):
        self.pools, self.timeout_s, self.ttl_s = pools, timeout_s, ttl_s
        # pool -> (when asked, the replies of the workers that answered, or None when none did)
        self._cache: dict[str, tuple[float, list | None]] = {}
        self._inflight: dict[str, asyncio.Future] = {}

    async def offered(self, kind: str) -> frozenset[str] | None:
        """Names of a kind the pool's workers list (the union over those that answered); None if none
        answered."""
        pool, _, field = _KINDS[kind]
        replies = await self._replies(pool)
        if replies is None:
            return None
        return frozenset(item.name for reply in replies for item in getattr(reply, field))

    async def _replies(self, pool: str) -> list | None:
        cached = self._cache.get(pool)
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        # Concurrent submissions (and several kinds of name of one pool) share one round of calls.
        if pool not in self._inflight:
            self._inflight[pool] = asyncio.ensure_future(self._ask(pool))
            self._inflight[pool].add_done_callback(lambda _f: self._inflight.pop(pool, None))
        return await asyncio.shield(self._inflight[pool])

    async def _ask(self, pool: str) -> list | None:
        call = _LISTERS[pool]
        addresses = list(self.pools.pools.get(pool) or [])
        replies = await asyncio.gather(
            *(call(self.pools.channel(a), self.timeout_s) for a in addresses), return_exceptions=True
        )
        answered = []
        for address, reply in zip(addresses, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                log.info("%s %s did not list its names: %s", pool, address, reply.code().name)
                continue
            if isinstance(reply, BaseException):
                log.warning("%s %s: listing failed", pool, address, exc_info=reply)
                continue
            answered.append(reply)
        result = answered or None
        self._cache[pool] = (time.monotonic(), result)
        return result

    async def check(self, spec: PipelineSpec) -> None:
        """INVALID_ARGUMENT for the first name in the spec that its pool does not offer."""
        wanted: list[tuple[str, str, str]] = []  # (field path, kind of name, name)
        if spec.finetune is not None:
            wanted.append(("finetune.method", "trainer", spec.finetune.method))
        wanted += [(f"quantize.{i}.method", "quantizer", q.method) for i, q in enumerate(spec.quantize)]
        if spec.export is not None and spec.export.format is not None:
            wanted.append(("export.format", "exporter", spec.export.format))
        if spec.export is not None and spec.export.target is not None:
            wanted.append(("export.target", "export-target", spec.export.target))
        kinds = sorted({kind for _, kind, _ in wanted})
        offered = dict(zip(kinds, await asyncio.gather(*(self.offered(k) for k in kinds)), strict=True))
        for path, kind, name in wanted:
            names = offered[kind]
            if names is None:
                continue  # no worker of the pool answered: accepted; dispatch checks it on the worker
            if name not in names:
                what = _KINDS[kind][1]
                raise InvalidArgument(f"{path}: unknown {what} {name!r}", choices=names)
