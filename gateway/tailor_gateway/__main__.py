"""tailor-gateway: `python -m tailor_gateway`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import Field

from tailor.gateway.v1 import gateway_service_pb2 as pb
from tailor.gateway.v1 import gateway_service_pb2_grpc as pb_grpc
from tailor_gateway.engine import Engine
from tailor_gateway.servicer import GatewayServicer
from tailor_gateway.state import StateStore
from tailor_gateway.tokens import TokenFile
from tailor_gateway.workers import WorkerPools, parse_workers
from tailor_runtime.interceptors import bearer_token_check
from tailor_runtime.server import open_service_store, serve
from tailor_runtime.settings import ServiceSettings, load_settings


class GatewaySettings(ServiceSettings):
    state_db: Path = Field(Path(".tailor/gateway.db"), description="SQLite file of the durable state.")
    tokens_file: Path = Field(Path(".tailor/tokens"), description="Lines of '<sha256 of token> <project>'.")
    workers: str = Field("", description="Static worker pools: 'quantizer=host:port,...;trainer=...'.")
    max_upload_mb: int = Field(4096, gt=0)
    wait_for_worker_s: float = Field(600.0, gt=0)


ENV = {
    "state_db": "TAILOR_STATE_DB",
    "tokens_file": "TAILOR_TOKENS_FILE",
    "workers": "TAILOR_WORKERS",
    "max_upload_mb": "TAILOR_MAX_UPLOAD_MB",
    "wait_for_worker_s": "TAILOR_WAIT_FOR_WORKER_S",
}


def main() -> None:
    settings = load_settings(GatewaySettings, "gateway", ENV, port=50051)
    pools = WorkerPools(parse_workers(settings.workers), settings.wait_for_worker_s)
    tokens = TokenFile(settings.tokens_file)
    store = open_service_store(settings)
    state = StateStore(settings.state_db)
    engine = Engine(state, pools, store)

    def register(server, ctx):
        servicer = GatewayServicer(
            engine, store, settings.cache_dir / "uploads", settings.max_upload_mb << 20
        )
        pb_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["GatewayService"].full_name]

    asyncio.run(
        serve(
            settings,
            register,
            auth_check=bearer_token_check(tokens.hashes),
            store=store,
            serve_operations=False,
            on_started=engine.resume,
        )
    )


if __name__ == "__main__":
    main()
