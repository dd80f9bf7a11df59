"""Trust between services: a worker takes calls from the gateway only, and each call names its project.

The gateway proves itself to a worker in one of two ways (docs/architecture.md, "Trust between services"):
- mutual TLS: its certificate, signed by the stack's CA (TAILOR_TLS_CA), names an identity listed in the
  worker's TAILOR_GATEWAY_IDENTITIES (a DNS name or CN; a worker's own certificate is not in that list, so
  one worker cannot call another);
- a per-stack shared secret (TAILOR_WORKER_SECRET_FILE, or TAILOR_WORKER_SECRET) sent as
  `authorization: Bearer <secret>` and compared in constant time. It is never logged.
A worker with neither refuses to start, unless TAILOR_INSECURE_OPEN_WORKER=true (development only).

The project travels as `x-tailor-project` metadata; a worker's operations are scoped to it
(operations.py). Health and reflection stay open for probes (interceptors.OPEN_PREFIXES).
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc

from tailor_runtime.errors import Unauthenticated
from tailor_runtime.interceptors import AuthCheck, current_peer

if TYPE_CHECKING:
    from tailor_runtime.settings import ServiceSettings

log = logging.getLogger("tailor.trust")
PROJECT_KEY = "x-tailor-project"
REFUSED = (
    "this worker takes calls from the Tailor gateway only: send the stack's worker secret "
    "('authorization: Bearer <secret>') or present the gateway's certificate over mutual TLS"
)
INSECURE_WARNING = (
    "TAILOR_INSECURE_OPEN_WORKER=true: this worker accepts calls from ANYONE who reaches its port "
    "(development only; never in a shared network)"
)

# The project the gateway acts for in the current task: workers.py sends it with every call.
call_project: contextvars.ContextVar[str] = contextvars.ContextVar("call_project", default="")


class WorkerAuthNotConfigured(SystemExit):
    """Exits a worker at start with what to set, instead of serving everyone."""


def worker_auth_check(settings: ServiceSettings) -> AuthCheck | None:
    """The check every worker call passes; None (open) only with the explicit insecure dev flag."""
    secret = settings.worker_secret_value()
    identities = frozenset(settings.gateway_identity_list())
    if not secret and not identities:
        if settings.insecure_open_worker:
            log.warning(INSECURE_WARNING)
            return None
        raise WorkerAuthNotConfigured(
            f"tailor-{settings.service}: refusing to start without a way to authenticate the gateway: set "
            "TAILOR_WORKER_SECRET_FILE (a file holding the stack's shared secret; `tailor up` and the "
            "chart create it), or TAILOR_TLS_CERT/KEY/CA with TAILOR_GATEWAY_IDENTITIES (mutual TLS); "
            "TAILOR_INSECURE_OPEN_WORKER=true serves anyone (development only)"
        )
    expected = f"Bearer {secret}".encode() if secret else b""

    def check(method: str, metadata: dict[str, str]) -> str:
        peer = current_peer.get()
        by_certificate = bool(identities) and not identities.isdisjoint(peer)
        header = metadata.get("authorization", "").encode()
        # compare_digest: the time taken does not tell how much of a guessed secret was right.
        by_secret = bool(secret) and hmac.compare_digest(header, expected)
        if not (by_certificate or by_secret):
            raise Unauthenticated(REFUSED)
        return metadata.get(PROJECT_KEY, "")

    return check


def worker_call_metadata(secret: str, project: str) -> list[tuple[str, str]]:
    metadata = [(PROJECT_KEY, project)] if project else []
    if secret:
        metadata.append(("authorization", f"Bearer {secret}"))
    return metadata


def _with_metadata(details, extra: Iterable[tuple[str, str]]):
    own = [(k, v) for k, v in (details.metadata or ()) if k not in ("authorization", PROJECT_KEY)]
    return [*own, *extra]


class _AddsWorkerMetadata:
    def __init__(self, secret: str):
        self._secret = secret

    def _details(self, details):
        metadata = _with_metadata(details, worker_call_metadata(self._secret, call_project.get()))
        return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _UnaryUnary(_AddsWorkerMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddsWorkerMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddsWorkerMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_AddsWorkerMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def worker_call_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    """For the gateway's channels to workers: the secret and the current `call_project` on every call.
    One object per call type: grpc.aio files an interceptor under the first type it is an instance of."""
    return [cls(secret) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
        self.metadata = metadata


class SyncWorkerCallInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
):
    """The same for blocking channels (the CLI's direct stage commands on the local stack)."""

    def __init__(self, secret: str, project: str):
        self._extra = worker_call_metadata(secret, project)

    def _details(self, details):
        return _SyncDetails(details, _with_metadata(details, self._extra))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)
