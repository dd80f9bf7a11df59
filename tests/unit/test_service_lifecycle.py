"""A real service process: bad settings stop it with a clear message; SIGTERM stops it gracefully."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.ports import free_port

from tailor_cli.stack import health_status


def _env(tmp_path, **extra):
    return {
        **os.environ,
        "TAILOR_STORE_URL": str(tmp_path / "store"),
        "TAILOR_CACHE_DIR": str(tmp_path / "c"),
        "TAILOR_INSECURE_OPEN_WORKER": "true",  # called directly, not through a gateway
        **extra,
    }


def test_bad_settings_name_the_variable(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tailor_selector"],
        env=_env(tmp_path, TAILOR_PORT="not-a-port", TAILOR_LOG_LEVEL="LOUD"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "TAILOR_PORT" in proc.stderr and "TAILOR_LOG_LEVEL" in proc.stderr
    assert "Traceback" not in proc.stderr


@contextlib.contextmanager
def serving(tmp_path, module: str, timeout: float):
    """A real `python -m module` on a free port, once it reports SERVING: (process, port); killed after."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        env=_env(tmp_path, TAILOR_PORT=str(port), TAILOR_GRACE_SECONDS="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while health_status(f"127.0.0.1:{port}") != "SERVING":
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "never became SERVING"
            time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_stops_within_the_grace_period(tmp_path):
    with serving(tmp_path, "tailor_selector", timeout=60) as (proc, port):
        # Reflection lists the service, so grpcurl-style tools work without the protos.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "tailor.selector.v1.SelectorService" in services and "grpc.health.v1.Health" in services
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0  # a deadline well past the 3 s grace, not a timing claim
        logs = proc.stdout.read()
        assert '"msg": "shutting down: NOT_SERVING' in logs and '"msg": "stopped"' in logs


def test_a_quantizer_reports_serving_only_after_its_method_listing_is_built(tmp_path):
    """Otherwise the gateway's first capability check after start-up waits out its deadline on the
    quantizer's first ListMethods, which imports every method's libraries."""
    with serving(tmp_path, "tailor_quantizer", timeout=120) as (proc, _port):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        logs = proc.stdout.read()
        warmed, serving_at = logs.find('"msg": "warmed up'), logs.find('"msg": "serving on')
        assert 0 <= warmed < serving_at, logs
