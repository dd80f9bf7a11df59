"""Domain errors become status codes in one place, over a real gRPC server; auth guards the gateway."""

import asyncio
import hashlib

import grpc
import pytest

from tailor.selector.v1 import selector_service_pb2 as pb
from tailor.selector.v1 import selector_service_pb2_grpc as pb_grpc
from tailor_runtime.errors import IntegrityError, NotFound, WorkerBusy
from tailor_runtime.interceptors import ServerInterceptor, bearer_token_check, current_principal

ERRORS = {
    "missing": (NotFound("artifact x not found"), grpc.StatusCode.NOT_FOUND),
    "busy": (WorkerBusy("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "corrupt": (IntegrityError("hash mismatch"), grpc.StatusCode.DATA_LOSS),
    "bug": (ZeroDivisionError("division by zero at line 12"), grpc.StatusCode.INTERNAL),
}


class Raising(pb_grpc.SelectorServiceServicer):
    async def Select(self, request, context):
        if request.candidates and request.candidates[0].id == "who":
            return pb.SelectResponse(rationale=current_principal.get())
        raise ERRORS[request.candidates[0].id][0]


async def _call(auth: bool, candidate_id: str, metadata=()):
    token_hash = hashlib.sha256(b"s3cret").hexdigest()
    check = bearer_token_check(lambda: {token_hash: "team-a"}) if auth else None
    server = grpc.aio.server(interceptors=[ServerInterceptor("test", check)])
    pb_grpc.add_SelectorServiceServicer_to_server(Raising(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SelectorServiceStub(channel)
            return await stub.Select(
                pb.SelectRequest(candidates=[pb.Candidate(id=candidate_id)]), metadata=metadata
            )
    finally:
        await server.stop(0)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_domain_errors_map_to_codes(name):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_call(False, name))
    assert err.value.code() == ERRORS[name][1]
    if name == "bug":
        assert "line 12" not in err.value.details() and "incident" in err.value.details()


def test_auth_required_and_principal_passed():
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_call(True, "who"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_call(True, "who", [("authorization", "Bearer nope")]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = asyncio.run(_call(True, "who", [("authorization", "Bearer s3cret")]))
    assert reply.rationale == "team-a"
