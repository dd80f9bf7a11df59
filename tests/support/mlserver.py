"""MLServer as a real, separate KServe v2 server process for the Triton client tests (Triton itself cannot
be installed here). It runs from .venv-mlserver (requirements-mlserver.txt; `make .venv-mlserver/.installed`)
with tests/support/mlserver_triton, which reads a Triton model repository (see that module).

Without .venv-mlserver the tests that need it skip, saying why; with TAILOR_REQUIRE_MLSERVER=1 (CI) its
absence fails them instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.optional import require
from support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-mlserver"
MLSERVER = VENV / "bin" / "mlserver"
RUNTIME = Path(__file__).resolve().parent / "mlserver_triton"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class MLServer:
    grpc_url: str  # host:port, what tritonclient.grpc takes
    http_url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def require_mlserver() -> None:
    why = f"MLServer is not installed in {VENV.name}"
    require(MLSERVER.is_file(), why, "TAILOR_REQUIRE_MLSERVER", f"make {VENV.name}/.installed")


@contextmanager
def mlserver(repositories: list[Path], log_dir: Path) -> Iterator[MLServer]:
    """MLServer serving the Triton model repositories on free loopback ports, models loaded only when
    asked (like Triton's --model-control-mode=explicit); stopped on exit."""
    require_mlserver()
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "PYTHON"))},
        "PYTHONPATH": str(RUNTIME),
        "MLSERVER_HOST": "127.0.0.1",
        "MLSERVER_HTTP_PORT": str(http),
        "MLSERVER_GRPC_PORT": str(grpc_port),
        "MLSERVER_METRICS_PORT": str(metrics),
        "MLSERVER_PARALLEL_WORKERS": "0",
        "MLSERVER_LOAD_MODELS_AT_STARTUP": "false",
        "MLSERVER_MODEL_REPOSITORY_IMPLEMENTATION": "triton_layout.TritonLayoutRepository",
        "MLSERVER_DEBUG": "false",
    }
    log = log_dir / "mlserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(MLSERVER), "start", os.pathsep.join(str(r) for r in repositories)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MLServer(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http}", process, log)
    try:
        _wait_until_live(server)
        yield server
    finally:
        _stop(process)


def _wait_until_live(server: MLServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"MLServer exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                if client.is_server_live(client_timeout=2) and client.is_server_ready(client_timeout=2):
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.3)
        raise RuntimeError(f"MLServer did not start in {START_TIMEOUT_S} s:\n{server.log_tail()}")
    finally:
        client.close()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)
