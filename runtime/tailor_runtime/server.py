"""One `serve()` for every service: grpc.aio, health, reflection, interceptors, metrics, graceful stop.

Health reports NOT_SERVING until the service's readiness check passes (the store answers and the
service's warm-ups, such as building its method listing, have run) and again as soon as SIGTERM arrives; then the server stops taking new calls, running operations get the grace period to finish,
and whatever is still running is cancelled (publishing nothing).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tailor.common.v1 import common_pb2, common_pb2_grpc
from tailor_runtime.grpc_options import GRPC_OPTIONS
from tailor_runtime.interceptors import AuthCheck, ServerInterceptor, current_principal
from tailor_runtime.logs import setup_logging
from tailor_runtime.operations import OperationRunner
from tailor_runtime.settings import ServiceSettings
from tailor_runtime.store import ArtifactStore, open_store
from tailor_runtime.telemetry import setup_tracing, start_metrics_server
from tailor_runtime.trust import worker_auth_check

log = logging.getLogger("tailor.server")


class OperationsServicer(common_pb2_grpc.OperationsServiceServicer):
    """tailor.common.v1.OperationsService, served beside every stage service. Each call sees only the
    operations of the project it names (the auth check put it in `current_principal`)."""

    def __init__(self, runner: OperationRunner):
        self.runner = runner

    async def GetOperation(self, request, context):
        return self.runner.snapshot(request.operation_id, current_principal.get())

    async def WatchOperation(self, request, context):
        async for snapshot in self.runner.watch(request.operation_id, current_principal.get()):
            yield common_pb2.OperationEvent(operation=snapshot)

    async def CancelOperation(self, request, context):
        operation = self.runner.cancel(request.operation_id, current_principal.get())
        return common_pb2.CancelOperationResponse(operation=operation)

    async def ListOperations(self, request, context):
        return common_pb2.ListOperationsResponse(operations=self.runner.list(current_principal.get()))


@dataclass
class ServiceContext:
    settings: ServiceSettings
    store: ArtifactStore
    runner: OperationRunner
    # (what, call): each run on a thread before the service reports SERVING (see CachedListing).
    warm_ups: list[tuple[str, Callable[[], object]]] = field(default_factory=list)


class CachedListing:
    """A listing reply that is slow to build once and constant after: ListMethods imports every method's
    libraries to say which are available (6.8 s for the quantizer on an idle core). Built on a thread, so
    the event loop never stalls on it, and registered as a warm-up, so the worker reports SERVING (and
    the gateway sends it work or asks its capabilities) only once it is built: the first submissions
    after start-up no longer wait out the capability check's deadline on a cold worker."""

    def __init__(self, ctx: ServiceContext, what: str, build: Callable[[], object]):
        self._build, self._value = build, None
        self._lock = threading.Lock()  # a call during the warm-up waits for it rather than building again
        ctx.warm_ups.append((what, self.built))

    def built(self):
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value

    async def get(self):
        return self._value if self._value is not None else await asyncio.to_thread(self.built)


# A service's register function: adds its servicers, returns their full names for health/reflection.
Register = Callable[[grpc.aio.Server, ServiceContext], list[str]]


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS when TAILOR_TLS_CERT/KEY are set; with TAILOR_TLS_CA, clients must present a certificate it signed."""
    if not settings.tls:
        return None
    ca = settings.tls_ca.read_bytes() if settings.tls_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(settings: ServiceSettings) -> grpc.ChannelCredentials | None:
    """For calls to other services: verify them against TAILOR_TLS_CA and present our own certificate."""
    if not settings.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca.read_bytes() if settings.tls_ca else None,
        private_key=settings.tls_key.read_bytes(),
        certificate_chain=settings.tls_cert.read_bytes(),
    )


async def _start_probe_server(settings: ServiceSettings, health_servicer) -> grpc.aio.Server | None:
    """TAILOR_HEALTH_PORT: gRPC health alone, in plaintext, because kubelet's gRPC probes cannot do TLS.
    Nothing else is served there: the stage services stay behind mutual TLS on the main port."""
    if not settings.health_port:
        return None
    probes = grpc.aio.server(options=GRPC_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
    address = f"{settings.host}:{settings.health_port}"
    if probes.add_insecure_port(address) == 0:
        raise SystemExit(
            f"tailor-{settings.service}: cannot listen on {address} (TAILOR_HEALTH_PORT in use?)"
        )
    await probes.start()
    return probes


def open_service_store(settings: ServiceSettings) -> ArtifactStore:
    return open_store(settings.store_url, **settings.store_options())


async def serve(
    settings: ServiceSettings,
    register: Register,
    *,
    auth_check: AuthCheck | None = None,
    store: ArtifactStore | None = None,
    serve_operations: bool = True,
    on_started: Callable[[], object] | None = None,
) -> None:
    """Serve `register`'s services. Without an `auth_check` (every worker) callers are checked by
    trust.worker_auth_check: the gateway's certificate or the stack's secret, else no start."""
    setup_logging(settings.service, settings.log_level)
    if auth_check is None:
        auth_check = worker_auth_check(settings)
    setup_tracing(settings.service, settings.trace_file, settings.otlp_endpoint)
    start_metrics_server(settings.metrics_port, settings.host)
    store = store or open_service_store(settings)
    runner = OperationRunner(
        settings.service,
        store,
        settings.max_operations,
        settings.fake_work,
        settings.fake_work_seconds,
        require_project=auth_check is not None,
    )
    if settings.fake_work:
        from tailor_runtime.fake_work import WARNING

        log.warning(WARNING)
    ctx = ServiceContext(settings=settings, store=store, runner=runner)

    server = grpc.aio.server(
        interceptors=[ServerInterceptor(settings.service, auth_check, tls=settings.tls)], options=GRPC_OPTIONS
    )
    names = list(register(server, ctx))
    if serve_operations:
        common_pb2_grpc.add_OperationsServiceServicer_to_server(OperationsServicer(runner), server)
        names.append(common_pb2.DESCRIPTOR.services_by_name["OperationsService"].full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)

    async def set_health(status) -> None:
        for name in ["", *names]:
            await health_servicer.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"tailor-{settings.service}: cannot listen on {address} (port in use?)")
    await server.start()
    probes = await _start_probe_server(settings, health_servicer)

    # Ready once the store answers; until then probes say NOT_SERVING and the gateway sends nothing.
    while True:
        try:
            await asyncio.to_thread(store.check_ready)
            break
        except Exception as exc:  # noqa: BLE001
            log.warning("artifact store not ready: %s", exc)
            await asyncio.sleep(2.0)
    for what, warm_up in ctx.warm_ups:
        started = time.monotonic()
        await asyncio.to_thread(warm_up)
        log.info("warmed up: %s in %.1f s", what, time.monotonic() - started)
    await set_health(health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s", address, extra={"fields": {"services": names}})
    if on_started:
        on_started()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()

    log.info("shutting down: NOT_SERVING, grace %.1fs", settings.grace_seconds)
    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    runner.draining.set()  # long work (training) checkpoints now, while the grace period runs
    stop = asyncio.create_task(server.stop(settings.grace_seconds))
    await runner.wait_idle(settings.grace_seconds * 0.8)
    runner.cancel_all()
    await runner.wait_idle(settings.grace_seconds * 0.2)
    await stop
    if probes is not None:
        await probes.stop(0)
    log.info("stopped")


def run(settings: ServiceSettings, register: Register, **kwargs) -> None:
    asyncio.run(serve(settings, register, **kwargs))
