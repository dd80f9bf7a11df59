"""The local stack: every service as its own process on localhost, sharing one artifact store, and the
web front (`python -m tailor_web`: the HTTP/JSON API and the dashboard) in front of the gateway.

Workers take calls from the gateway only: `start()` writes a fresh per-stack secret to
`<state>/worker-secret` (0600) and hands its path to every process (TAILOR_WORKER_SECRET_FILE).
`supervise()` restarts a process that died (bounded, with backoff), logging each restart to
`<state>/logs/supervisor.log` and recording it in `<state>/stack.json`; the others keep running.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tailor.connection import Connection, open_channel
from tailor.errors import ClientError
from tailor_gateway.tokens import issue_token
from tailor_runtime.trust import SyncWorkerCallInterceptor

SERVICES = ("quantizer", "trainer", "benchmarker", "exporter", "selector")
MODULES = {
    "gateway": "tailor_gateway",
    "quantizer": "tailor_quantizer",
    "trainer": "tailor_trainer",
    "benchmarker": "tailor_benchmarker",
    "exporter": "tailor_exporter",
    "selector": "tailor_selector",
    "web": "tailor_web",
}
OFFSETS = {"gateway": 0, "quantizer": 1, "trainer": 2, "benchmarker": 3, "exporter": 4, "selector": 5}
# The web front (HTTP/JSON API and dashboard, web/tailor_web): an HTTP server, not a gRPC service; its
# "address" is the URL a person opens (so `tailor up`'s table prints it).
WEB_OFFSET = 6
# A process that dies more often than this within RESTART_WINDOW_S is left down (and said so): a crash
# loop (bad settings, a port taken) would otherwise restart forever.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
SECRET_FILE = "worker-secret"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StackError(ClientError, RuntimeError):
    """Why a local stack cannot start (or stop) here, and what to do instead."""


def _alive(pid: int) -> bool:
    """Running (a zombie is not: a container's init may never reap the orphans of a killed `tailor up`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc (not Linux): kill(0) is all there is
    return "\nState:\tZ" not in status


def running_stack(state_dir: Path) -> dict | None:
    """stack.json of the stack running from `state_dir`, or None. A stack.json whose processes are all
    gone (its `tailor up` was SIGKILLed, the machine rebooted) is stale and removed."""
    info_file = Path(state_dir) / "stack.json"
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):
        return None
    pids = [info.get("supervisor_pid"), *(info.get("pids") or {}).values()]
    if any(isinstance(pid, int) and _alive(pid) for pid in pids):
        return info
    info_file.unlink(missing_ok=True)
    return None


def stop_running_stack(state_dir: Path, grace: float = 20.0) -> list[str]:
    """`tailor down`: ask the stack's `tailor up` to stop it (SIGTERM), then SIGTERM and at last SIGKILL
    any of its services still there; returns what it stopped. StackError when none is running."""
    info = running_stack(state_dir)
    if info is None:
        raise StackError(f"no local stack is running from {state_dir}")
    supervisor = info.get("supervisor_pid")
    services = {name: pid for name, pid in (info.get("pids") or {}).items() if _alive(pid)}
    if isinstance(supervisor, int) and _alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)  # it stops its services and removes stack.json itself
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in [*services.values(), supervisor or 0] if p):
        time.sleep(0.2)
    for pid in services.values():
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)  # each service leads its own process group (start_new_session)
    (Path(state_dir) / "stack.json").unlink(missing_ok=True)
    return sorted(services)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (`tailor up`) dies, even by SIGKILL (Linux)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):  # not Linux: `tailor down` still stops them
        pass


@dataclass
class Stack:
    state_dir: Path
    base_port: int = 50051
    store_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    token: str = ""
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    # Extra workers per pool, e.g. {"quantizer": 2}: named quantizer-2, quantizer-3 (ports from base+10).
    replicas: dict[str, int] = field(default_factory=dict)
    # Supervision: restart times per process, processes given up on, and the due time of a restart.
    restarts: dict[str, list[float]] = field(default_factory=dict)
    given_up: set[str] = field(default_factory=set)
    store: str = ""
    # Services get SIGTERM when the process that started them dies (`tailor up`, quickstart). Off for
    # stacks started by tests and benches from a helper thread: the signal follows the starting thread.
    die_with_parent: bool = False
    # The web front as one more process (a gRPC client of this gateway, like any other client).
    web: bool = True
    _restart_due: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    def instances(self) -> dict[str, int]:
        """Every process of the stack -> its port offset."""
        found = dict(OFFSETS)
        for service in SERVICES:
            for i in range(2, self.replicas.get(service, 1) + 1):
                found[f"{service}-{i}"] = 10 + len(found) - len(OFFSETS)
        if self.web:
            found["web"] = WEB_OFFSET
        return found

    def address(self, service: str) -> str:
        if service == "web":
            return self.web_url
        return f"127.0.0.1:{self.base_port + self.instances()[service]}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.base_port + WEB_OFFSET}/"

    def metrics_port(self, service: str) -> int:
        return self.base_port + 1000 + self.instances()[service]

    @property
    def info_file(self) -> Path:
        return self.state_dir / "stack.json"

    def check_can_start(self) -> None:
        """StackError when a stack already runs from this state directory or a port is taken: starting
        anyway would report the other stack's services as this one's, then exit."""
        running = running_stack(self.state_dir)
        if running is not None:
            raise StackError(
                f"a local stack is already running from {self.state_dir} (gateway {running.get('gateway')}); "
                "use it, see it with `tailor status`, or stop it with `tailor down`"
            )
        ports = {port: name for name, offset in self.instances().items()
                 for port in (self.base_port + offset, self.base_port + 1000 + offset)}  # fmt: skip
        taken = [f"{port} ({name})" for port, name in sorted(ports.items()) if not _port_is_free(port)]
        if taken:
            raise StackError(
                f"port {', '.join(taken)} already in use by another process; stop it (`tailor down` if it is "
                f"a Tailor stack from another state directory), or choose other ports with --port N "
                f"(the gateway's; services use the next five, metrics 1000 above)"
            )

    def start(self, timeout: float = 180.0) -> None:
        self.state_dir = self.state_dir.resolve()
        self.check_can_start()
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        store = self.store_url or str(self.state_dir / "store")
        tokens_file = self.state_dir / "tokens"
        self.token = issue_token(tokens_file, "default")
        token_file = self.state_dir / "token"
        token_file.write_text(self.token + "\n")
        os.chmod(token_file, 0o600)
        secret_file = self.write_worker_secret()
        instances = self.instances()
        workers = ";".join(
            f"{s}=" + ",".join(self.address(i) for i in instances if i.split("-")[0] == s) for s in SERVICES
        )
        for service in instances:
            env = {
                **os.environ,
                "TAILOR_PORT": str(self.base_port + instances[service]),
                "TAILOR_METRICS_PORT": str(self.metrics_port(service)),
                "TAILOR_STORE_URL": store,
                "TAILOR_CACHE_DIR": str(self.state_dir / "cache" / service),
                "TAILOR_TRACE_FILE": str(self.state_dir / "traces.jsonl"),
                "TAILOR_STATE_DB": str(self.state_dir / "gateway.db"),
                "TAILOR_TOKENS_FILE": str(tokens_file),
                "TAILOR_WORKERS": workers,
                "TAILOR_WORKER_SECRET_FILE": str(secret_file),
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
            if service == "web":
                env |= {
                    "TAILOR_GATEWAY": self.address("gateway"),
                    "TAILOR_WEB_PORT": str(self.base_port + WEB_OFFSET),
                }
            self.envs[service] = env
            self._spawn(service)
        self.store = store
        self.write_info()
        self.wait_healthy(timeout)

    def write_worker_secret(self) -> Path:
        """A fresh secret per stack start, readable by this user only (created 0600, never world-readable)."""
        path = self.state_dir / SECRET_FILE
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        return path

    def write_info(self) -> None:
        """stack.json: addresses, pids and restarts, for the CLI and for `tailor up`'s report."""
        with self._lock:
            info = {
                "gateway": self.address("gateway"),
                "services": {s: self.address(s) for s in SERVICES},
                **({"web": self.web_url} if self.web else {}),
                "replicas": {s: self.address(s) for s in self.instances() if "-" in s},
                "pids": {s: p.pid for s, p in self.processes.items()},
                "restarts": {s: len(t) for s, t in self.restarts.items() if t},
                "down": sorted(self.given_up),
                "store": self.store,
                # `tailor down` stops the stack through the process that supervises it.
                "supervisor_pid": os.getpid(),
            }
            tmp = self.info_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info, indent=2))
            tmp.replace(self.info_file)

    def ports(self) -> list[int]:
        """Every port the stack listens on: gRPC per process, and Prometheus 1000 above it."""
        return [
            self.base_port + extra + offset for offset in self.instances().values() for extra in (0, 1000)
        ]

    def connection(self) -> Connection:
        """A client connection to this stack's gateway."""
        return Connection(self.address("gateway"), self.token)

    def worker_channel(self, address: str, project: str = "default") -> grpc.Channel:
        """A channel to one of this stack's workers that calls as the gateway does (for tests, tools)."""
        channel = open_channel(address)
        return grpc.intercept_channel(channel, SyncWorkerCallInterceptor(self.worker_secret(), project))

    def worker_secret(self) -> str:
        path = self.state_dir / SECRET_FILE
        return path.read_text().strip() if path.exists() else ""

    def wait_healthy(self, timeout: float, services: set[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = set(services or self.instances())
        while pending:
            for service in sorted(pending):
                proc = self.processes.get(service)
                if proc is not None and proc.poll() is not None:
                    self.stop()
                    tail = (self.state_dir / "logs" / f"{service}.log").read_text()[-2000:]
                    raise RuntimeError(
                        f"{service} exited with code {proc.returncode} while starting:\n{tail}"
                    )
                ready = (
                    web_ready(self.web_url)
                    if service == "web"
                    else health_status(self.address(service)) == "SERVING"
                )
                if ready:
                    pending.discard(service)
            if pending and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"services not healthy after {timeout:.0f}s: {', '.join(sorted(pending))}")
            time.sleep(0.3)

    def stop(self, grace: float = 15.0) -> None:
        with self._lock:
            self._stopping = True  # the supervisor restarts nothing from now on
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.info_file.unlink(missing_ok=True)

    def _spawn(self, service: str) -> None:
        with open(self.state_dir / "logs" / f"{service}.log", "ab") as log:
            self.processes[service] = subprocess.Popen(
                [sys.executable, "-m", MODULES[service.split("-")[0]]],
                env=self.envs[service],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )

    def kill(self, service: str) -> None:
        """SIGKILL one service: what a crash looks like."""
        proc = self.processes[service]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self, service: str) -> None:
        """Start a killed service again with the same settings and wait until it serves."""
        self._spawn(service)
        self.wait_healthy(120, {service})

    # --- supervision ----------------------------------------------------------------------------
    def supervise_once(self, report: Callable[[str], object] = print) -> list[str]:
        """Restart each process that died (after a backoff of 1, 2, 4... s); returns what it did."""
        events: list[str] = []
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return events
            for service, proc in list(self.processes.items()):
                if proc.poll() is None or service in self.given_up:
                    continue
                recent = [t for t in self.restarts.get(service, []) if now - t < RESTART_WINDOW_S]
                self.restarts[service] = recent
                if service not in self._restart_due:
                    if len(recent) >= MAX_RESTARTS:
                        self.given_up.add(service)
                        events.append(
                            f"{service} exited (code {proc.returncode}) {len(recent) + 1} times within "
                            f"{RESTART_WINDOW_S:.0f}s: not restarted again, the other services keep "
                            f"running; see {self.state_dir / 'logs' / (service + '.log')}"
                        )
                        continue
                    self._restart_due[service] = now + min(30.0, 2.0 ** len(recent) / 2)
                    events.append(f"{service} exited (code {proc.returncode}); restarting it")
                    continue
                if now >= self._restart_due[service]:
                    del self._restart_due[service]
                    self.restarts[service].append(now)
                    self._spawn(service)
                    events.append(
                        f"{service} restarted (pid {self.processes[service].pid}, restart "
                        f"{len(self.restarts[service])} of at most {MAX_RESTARTS} per {RESTART_WINDOW_S:.0f}s)"
                    )
            if events:
                self.write_info()
        for event in events:
            self._log_supervisor(event)
            report(event)
        return events

    def supervise(
        self, stopping: Callable[[], bool], report: Callable[[str], object] = print, interval: float = 0.5
    ) -> None:
        """`tailor up`'s loop: supervise until `stopping()` says so."""
        while not stopping():
            self.supervise_once(report)
            time.sleep(interval)

    def _log_supervisor(self, event: str) -> None:
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event})
        with open(self.state_dir / "logs" / "supervisor.log", "a") as log:
            log.write(line + "\n")


def health_status(address: str, timeout: float = 1.0) -> str:
    try:
        with open_channel(address) as channel:  # TLS when TAILOR_TLS_CA is set
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "DOWN"


def web_ready(url: str, timeout: float = 1.0) -> bool:
    """The web front answers its own health path (it says nothing about the gateway behind it)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "healthz", timeout=timeout) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


def free_base_port(replicas: dict[str, int] | None = None, start: int = 44000, stop: int = 60000) -> int:
    """A base port at which every port of a stack with these replicas is free (for tests and benches)."""
    for base in range(start, stop, 37):
        ports = Stack(Path("."), base_port=base, replicas=replicas or {}).ports()
        if all(_port_is_free(port) for port in ports):
            return base
    raise RuntimeError(f"no free range of ports for a local stack between {start} and {stop}")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
