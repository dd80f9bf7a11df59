"""Dispatch past a hung worker: a start call that times out goes to the next worker of the pool, and
a worker found hung is tried last for a while. Every call carries the stack's secret and the project."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tailor.common.v1 import common_pb2 as common
from tailor.common.v1 import common_pb2_grpc as common_grpc
from tailor.quantizer.v1 import quantizer_service_pb2 as quant_pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as quant_grpc
from tailor_gateway.workers import WorkerPools
from tailor_runtime.interceptors import ServerInterceptor, current_principal
from tailor_runtime.settings import ServiceSettings
from tailor_runtime.trust import call_project, worker_auth_check


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


class SeenMetadata(common_grpc.OperationsServiceServicer):
    """Answers with the project the worker's auth check found; a wrong or missing secret is refused."""

    async def GetOperation(self, request, context):
        return common.Operation(id=current_principal.get())

    async def WatchOperation(self, request, context):
        yield common.OperationEvent(operation=common.Operation(id=current_principal.get()))


def test_every_call_to_a_worker_carries_the_secret_and_the_pipelines_project(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("the-stack-secret\n")
    settings = ServiceSettings(service="quantizer", worker_secret_file=secret_file)

    async def main():
        server = grpc.aio.server(interceptors=[ServerInterceptor("quantizer", worker_auth_check(settings))])
        common_grpc.add_OperationsServiceServicer_to_server(SeenMetadata(), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        gateway, stranger = WorkerPools({}, secret="the-stack-secret"), WorkerPools({}, secret="guess")
        try:

            async def as_pipeline_of(project: str, pools: WorkerPools) -> tuple[str, str]:
                call_project.set(project)  # what the engine does for each pipeline's task
                stub = common_grpc.OperationsServiceStub(pools.channel(address))
                unary = await stub.GetOperation(common.GetOperationRequest(), metadata=[("traceparent", "x")])
                streamed = [e.operation.id async for e in stub.WatchOperation(common.WatchOperationRequest())]
                return unary.id, streamed[0]

            assert await asyncio.create_task(as_pipeline_of("team-a", gateway)) == ("team-a", "team-a")
            assert await asyncio.create_task(as_pipeline_of("team-b", gateway)) == ("team-b", "team-b")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.create_task(as_pipeline_of("team-a", stranger))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await gateway.close()
            await stranger.close()
            await server.stop(None)

    asyncio.run(main())
