"""Dispatch past a hung worker: a start call that times out goes to the next worker of the pool, and
a worker found hung is tried last for a while."""

from __future__ import annotations

import asyncio

import grpc

from tailor.common.v1 import common_pb2 as common
from tailor.quantizer.v1 import quantizer_service_pb2 as quant_pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as quant_grpc
from tailor_gateway.workers import WorkerPools


class Quantizer(quant_grpc.QuantizerServiceServicer):
    def __init__(self, name: str, hang: bool):
        self.name, self.hang, self.calls = name, hang, 0

    async def Quantize(self, request, context):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(30)
        return common.Operation(id=self.name)


async def _serve(servicer):
    server = grpc.aio.server()
    quant_grpc.add_QuantizerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_a_hung_worker_is_passed_over_then_tried_last():
    async def main():
        hung, ok = Quantizer("hung", True), Quantizer("ok", False)
        (s1, a1), (s2, a2) = await _serve(hung), await _serve(ok)
        pools = WorkerPools({"quantizer": [a1, a2]}, wait_for_worker_s=5)

        def call(ch):
            return quant_grpc.QuantizerServiceStub(ch).Quantize(quant_pb.QuantizeRequest(), timeout=0.3)

        try:
            for _ in range(2):  # round robin: one of the two starts at the hung worker
                worker, op = await pools.dispatch("quantizer", call)
                assert (worker, op.id) == (a2, "ok")
            assert hung.calls == 1
            pools.suspect(a1, 60)
            for _ in range(4):
                assert (await pools.dispatch("quantizer", call))[0] == a2
            assert hung.calls == 1  # suspected: tried only after the others, which accepted
        finally:
            await pools.close()
            await s1.stop(None)
            await s2.stop(None)

    asyncio.run(main())
