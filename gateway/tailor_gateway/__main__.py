"""tailor-gateway: `python -m tailor_gateway`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Literal

import grpc
from pydantic import Field

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tailor_gateway.access import Access
from tailor_gateway.artifacts import MAX_UPLOAD_FILES
from tailor_gateway.auth import gateway_auth_check
from tailor_gateway.engine import Engine
from tailor_gateway.ratelimit import RateLimiter
from tailor_gateway.servicer import GatewayServicer
from tailor_gateway.state import StateStore
from tailor_gateway.tokens import TokenFile
from tailor_gateway.workers import WorkerPools, parse_workers
from tailor_runtime.server import channel_credentials, open_service_store, serve
from tailor_runtime.settings import ServiceSettings, SettingsError, load_settings


class GatewaySettings(ServiceSettings):
    # Mutual TLS to the workers with the gateway's own client certificate, apart from TAILOR_TLS_* (which
    # is how users reach the gateway); unset: TAILOR_TLS_* serve for both, as on the local stack.
    worker_tls_cert: Path | None = Field(None, description="PEM client certificate for calls to workers.")
    worker_tls_key: Path | None = Field(None, description="PEM private key of worker_tls_cert.")
    worker_tls_ca: Path | None = Field(None, description="PEM CA that signed the workers' certificates.")
    worker_tls_server_name: str = Field(
        "", description="The name verified in every worker's certificate (discovered workers are pod IPs)."
    )
    state_db: Path = Field(Path(".tailor/gateway.db"), description="SQLite file of the durable state.")
    tokens_file: Path = Field(Path(".tailor/tokens"), description="Lines of '<sha256 of token> <project>'.")
    workers: str = Field("", description="Static worker pools: 'quantizer=host:port,...;trainer=...'.")
    max_upload_mb: int = Field(
        262_144,
        gt=0,
        description="Largest upload in MiB (default 256 GiB: a sharded 70B in bf16 is about 140 GB).",
    )
    max_upload_files: int = Field(
        MAX_UPLOAD_FILES, gt=0, description="Most files in one upload (each costs an open and a check)."
    )
    wait_for_worker_s: float = Field(600.0, gt=0)
    discovery: Literal["static", "kubernetes"] = Field(
        "static", description="static: TAILOR_WORKERS; kubernetes: the pools' EndpointSlices."
    )
    discovery_namespace: str | None = Field(None, description="Default: the pod's own namespace.")
    discovery_selector: str = Field(
        "app.kubernetes.io/name=tailor", description="Labels of the pool Services."
    )
    discovery_refresh_s: float = Field(5.0, gt=0, description="Seconds between two EndpointSlice lists.")
    state_url: str = Field("", description="postgresql://... for clusters; empty: SQLite at state_db.")
    rate_limit_rps: float = Field(50.0, ge=0, description="Requests/s per API token; 0: unlimited.")
    rate_limit_burst: float = Field(100.0, ge=1, description="Requests a token may make at once.")
    worker_lost_after_s: float = Field(30.0, gt=0, description="Unreachable this long: re-dispatch.")
    worker_stall_s: float = Field(
        120.0, gt=0, description="No progress this long and no health answer: hung, re-dispatch."
    )


ENV = {
    "worker_tls_cert": "TAILOR_WORKER_TLS_CERT",
    "worker_tls_key": "TAILOR_WORKER_TLS_KEY",
    "worker_tls_ca": "TAILOR_WORKER_TLS_CA",
    "worker_tls_server_name": "TAILOR_WORKER_TLS_SERVER_NAME",
    "state_db": "TAILOR_STATE_DB",
    "tokens_file": "TAILOR_TOKENS_FILE",
    "workers": "TAILOR_WORKERS",
    "max_upload_mb": "TAILOR_MAX_UPLOAD_MB",
    "max_upload_files": "TAILOR_MAX_UPLOAD_FILES",
    "wait_for_worker_s": "TAILOR_WAIT_FOR_WORKER_S",
    "discovery": "TAILOR_DISCOVERY",
    "discovery_namespace": "TAILOR_DISCOVERY_NAMESPACE",
    "discovery_selector": "TAILOR_DISCOVERY_SELECTOR",
    "discovery_refresh_s": "TAILOR_DISCOVERY_REFRESH_S",
    "state_url": "TAILOR_STATE_URL",
    "rate_limit_rps": "TAILOR_RATE_LIMIT_RPS",
    "rate_limit_burst": "TAILOR_RATE_LIMIT_BURST",
    "worker_lost_after_s": "TAILOR_WORKER_LOST_AFTER_S",
    "worker_stall_s": "TAILOR_WORKER_STALL_S",
}


def worker_credentials(settings: GatewaySettings) -> grpc.ChannelCredentials | None:
    """How the gateway proves itself to workers over TLS: TAILOR_WORKER_TLS_*, else TAILOR_TLS_*."""
    files = (settings.worker_tls_ca, settings.worker_tls_key, settings.worker_tls_cert)
    if not any(files):
        return channel_credentials(settings)
    if not all(files):
        raise SettingsError(
            "tailor-gateway: TAILOR_WORKER_TLS_CA, TAILOR_WORKER_TLS_CERT and TAILOR_WORKER_TLS_KEY go together"
        )
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise SettingsError(f"tailor-gateway: TAILOR_WORKER_TLS_* file(s) do not exist: {', '.join(missing)}")
    ca, key, cert = (path.read_bytes() for path in files)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def worker_addresses(settings: GatewaySettings):
    """TAILOR_DISCOVERY: the static TAILOR_WORKERS list, or the pools' EndpointSlices, followed live."""
    if settings.discovery == "static":
        return parse_workers(settings.workers)
    from tailor_gateway.discovery import EndpointSliceDiscovery, default_namespace  # noqa: PLC0415

    namespace = settings.discovery_namespace or default_namespace()
    return EndpointSliceDiscovery(
        namespace, settings.discovery_selector, settings.discovery_refresh_s
    ).start()


def main() -> None:
    settings = load_settings(GatewaySettings, "gateway", ENV, port=50051)
    secret = settings.worker_secret_value()
    if not secret and settings.tls_ca is None and settings.worker_tls_ca is None:
        # Workers refuse unauthenticated calls: stages would fail with UNAUTHENTICATED.
        logging.getLogger("tailor.gateway").warning(
            "no TAILOR_WORKER_SECRET_FILE and no mutual TLS (TAILOR_TLS_CA): workers will refuse this "
            "gateway unless they run with TAILOR_INSECURE_OPEN_WORKER=true"
        )
    pools = WorkerPools(
        worker_addresses(settings),
        settings.wait_for_worker_s,
        worker_credentials(settings),
        secret,
        tls_server_name=settings.worker_tls_server_name,
    )
    tokens = TokenFile(settings.tokens_file)
    store = open_service_store(settings)
    state = StateStore(settings.state_url or settings.state_db)
    state.hold_exclusive()  # one gateway drives a state: a second stands by here until the first stops
    access = Access(state.db, tokens.hashes)
    engine = Engine(
        state,
        pools,
        store,
        access,
        settings.worker_lost_after_s,
        worker_stall_s=settings.worker_stall_s,
        staging_dir=settings.cache_dir / "imports",
    )

    def register(server, ctx):
        servicer = GatewayServicer(
            engine,
            store,
            settings.cache_dir / "uploads",
            settings.max_upload_mb << 20,
            max_upload_files=settings.max_upload_files,
        )
        pb_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["GatewayService"].full_name]

    asyncio.run(
        serve(
            settings,
            register,
            auth_check=gateway_auth_check(
                access, RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
            ),
            store=store,
            serve_operations=False,
            on_started=engine.resume,
        )
    )


if __name__ == "__main__":
    main()
