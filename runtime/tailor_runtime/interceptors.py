"""The one place where domain errors become gRPC status codes; also metrics, tracing and auth per RPC."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from tailor_runtime.errors import TailorError, Unauthenticated
from tailor_runtime.telemetry import RPC_LATENCY, RPC_REQUESTS, extract_context, tracer

log = logging.getLogger("tailor.rpc")

# Standard services every client may call without credentials (probes, reflection).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# (method, metadata) -> the caller's project, or an awaitable of it (a check that must read a database
# does so off the event loop); raises Unauthenticated.
AuthCheck = Callable[[str, dict[str, str]], str | Awaitable[str]]

# The project of the authenticated caller, for servicers that scope data to it.
current_principal: contextvars.ContextVar[str] = contextvars.ContextVar("current_principal", default="")
# The names in the caller's verified client certificate (mutual TLS: CN and SANs), for auth checks; empty
# without one. gRPC verified the certificate against TAILOR_TLS_CA before the call reached us.
current_peer: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "current_peer", default=frozenset()
)


def peer_names(context) -> frozenset[str]:
    auth = context.auth_context() or {}
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    return frozenset(n.decode() if isinstance(n, bytes) else str(n) for n in names)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, TailorError):
        # An error may carry hints for the client (e.g. retry-after-ms on a rate limit).
        await context.abort(exc.code, exc.message, trailing_metadata=tuple(getattr(exc, "trailers", ())))
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s (incident %s)", method, incident, exc_info=exc)
    # No stack trace to clients: the incident id finds it in the server's logs.
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the server logs"
    )


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, auth_check: AuthCheck | None = None, *, tls: bool = True):
        self.service = service
        self.auth_check = auth_check
        # Peer certificate names exist only on a TLS port; asking grpc for them on every call costs
        # 4% of the gateway's event loop under the load bench, so a plaintext server skips it.
        self.tls = tls

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        guarded = self.auth_check is not None and not method.startswith(OPEN_PREFIXES)
        wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary

        def adapt(behavior):
            return wrap(behavior, method, metadata, guarded) if behavior else None

        return handler._replace(
            unary_unary=adapt(handler.unary_unary),
            unary_stream=adapt(handler.unary_stream),
            stream_unary=adapt(handler.stream_unary),
            stream_stream=adapt(handler.stream_stream),
        )

    async def _authenticate(self, method: str, metadata: dict[str, str], context) -> None:
        if self.tls:
            current_peer.set(peer_names(context))
        project = self.auth_check(method, metadata)
        if inspect.isawaitable(project):
            project = await project
        current_principal.set(project)

    def _enter(self, method: str, metadata: dict[str, str]):
        parent = extract_context(metadata.items())
        token = otel_context.attach(parent)
        span = tracer().start_span(f"{self.service} {method}", kind=trace.SpanKind.SERVER)
        span_token = otel_context.attach(trace.set_span_in_context(span))
        return span, (token, span_token)

    def _exit(self, method, start, span, tokens, code: grpc.StatusCode):
        RPC_REQUESTS.labels(self.service, method, code.name).inc()
        RPC_LATENCY.labels(self.service, method).observe(time.perf_counter() - start)
        span.set_attribute("rpc.grpc.status_code", code.name)
        if code != grpc.StatusCode.OK:
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        span.end()
        for token in reversed(tokens):
            otel_context.detach(token)

    @contextlib.asynccontextmanager
    async def _rpc_scope(self, method, metadata, guarded, context):
        """Auth, a server span, metrics, and the mapping of any exception to a status code, around one RPC."""
        start, code = time.perf_counter(), grpc.StatusCode.OK
        span, tokens = None, ()
        try:
            if guarded:
                await self._authenticate(method, metadata, context)
            span, tokens = self._enter(method, metadata)
            yield
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            code = exc.code if isinstance(exc, TailorError) else _code_of(context, exc)
            if _is_abort(exc):
                raise
            await _abort_for(exc, context, method)
        finally:
            if span is not None:
                self._exit(method, start, span, tokens, code)
            else:
                RPC_REQUESTS.labels(self.service, method, code.name).inc()

    def _wrap_unary(self, behavior, method, metadata, guarded):
        async def wrapper(request, context):
            async with self._rpc_scope(method, metadata, guarded, context):
                return await behavior(request, context)

        return wrapper

    def _wrap_stream(self, behavior, method, metadata, guarded):
        async def wrapper(request, context):
            async with self._rpc_scope(method, metadata, guarded, context):
                async for item in behavior(request, context):
                    yield item

        return wrapper


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises grpc.aio.AbortError; let it through untouched.
    return isinstance(exc, grpc.aio.AbortError)


def _code_of(context, exc) -> grpc.StatusCode:
    if _is_abort(exc):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


def bearer_token_check(valid_tokens: Callable[[], dict[str, str]]) -> AuthCheck:
    """Checks `authorization: Bearer <token>` against sha256 hashes -> principal (project)."""
    import hashlib
    import hmac

    def check(method: str, metadata: dict[str, str]) -> str:
        header = metadata.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        digest = hashlib.sha256(header[7:].strip().encode()).hexdigest()
        for token_hash, project in valid_tokens().items():
            if hmac.compare_digest(token_hash, digest):
                return project
        raise Unauthenticated("invalid token")

    return check
