"""The one place where gRPC status codes become HTTP status codes.

Every refusal the API answers with has the body `{"error": {"code": "NOT_FOUND", "message": "..."}}`:
the gateway's code name and message, passed through unchanged, so an HTTP caller reads what a gRPC
caller reads. The table follows google.rpc.Code's documented HTTP equivalents.
"""

from __future__ import annotations

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,  # the caller went away (nginx's "client closed request")
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# The gateway's rate limiter says how long to wait in this trailing metadata (gateway/ratelimit.py).
RETRY_AFTER_MS = "retry-after-ms"


class ApiError(Exception):
    """A refusal with a gRPC code: from the gateway, or from this process before any call (a body that
    is not the request message), so both read the same to the caller."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> ApiError:
        trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
        return cls(exc.code(), exc.details() or "", str(trailers.get(RETRY_AFTER_MS, "")))


def error_body(code: grpc.StatusCode, message: str) -> dict:
    return {"error": {"code": code.name, "message": message}}


def error_response(error: ApiError) -> JSONResponse:
    headers = {}
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    if error.retry_after_ms:
        # HTTP's Retry-After counts whole seconds; the exact wait stays in the message.
        headers["Retry-After"] = str(max(1, -(-int(error.retry_after_ms) // 1000)))
    return JSONResponse(error_body(error.code, error.message), HTTP_STATUS[error.code], headers=headers)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def rpc_error_handler(request: Request, exc: grpc.RpcError) -> JSONResponse:
    return error_response(ApiError.from_rpc(exc))


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422 for a malformed body or query, in the same shape as the gateway's refusals."""
    said = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', '')}"
        for e in exc.errors()
    )
    return error_response(ApiError(grpc.StatusCode.INVALID_ARGUMENT, said))
