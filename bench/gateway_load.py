"""Load on the gateway: many concurrent clients submitting, watching and listing pipelines.

The stage services run in the test mode TAILOR_FAKE_WORK=instant (each operation publishes a small marker
artifact at once), so what is measured is the gateway: its RPCs, its durable state, its dispatch.
Each client has its own API token (10 projects); each loop: CreatePipeline (a unique idempotency key,
retried with the same key on error), WatchPipeline to the end, ListPipelines, GetPipeline.
With --kill-every S a random stage worker is SIGKILLed every S seconds and restarted a second later;
at the end every submitted pipeline must have completed exactly once.

    .venv/bin/python bench/gateway_load.py --clients 100 --seconds 120 [--kill-every 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tailor.connection import Connection
from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from tailor.transfer import upload
from tailor_cli.stack import Stack
from tailor_gateway.access import Access
from tailor_gateway.state import StateStore
from tailor_runtime.server import GRPC_OPTIONS
from tailor_runtime.store import open_store
from tailor_runtime.store.manifest import recipe_key

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = 10
TERMINAL = (gw.PIPELINE_STATE_SUCCEEDED, gw.PIPELINE_STATE_FAILED, gw.PIPELINE_STATE_CANCELLED)
LAG_TICK_S = 0.1
KILLABLE = ("quantizer", "quantizer-2", "benchmarker", "benchmarker-2")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included); 0 once it is gone (--kill-every)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (every core, every process, ours or not)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spec_for(inputs: dict, i: int) -> str:
    method = ("bf16", "int8_dynamic", "nf4")[i % 3]
    return yaml.safe_dump({"name": f"load-{i % 50}", **inputs, "quantize": [{"method": method}]})


async def client_loop(address, token, spec, stop_at, out, submitted, get_first=False):
    channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
    stub = gw_grpc.GatewayServiceStub(channel)
    meta = (("authorization", f"Bearer {token}"),)

    async def timed(name, coro):
        start = time.perf_counter()
        try:
            result = await coro
            out["lat"][name].append(time.perf_counter() - start)
            return result
        except grpc.aio.AioRpcError as exc:
            out["errors"][f"{name}:{exc.code().name}"] += 1
            raise

    first_call = True
    while time.monotonic() < stop_at:
        key = uuid.uuid4().hex
        submitted.append(key)
        request = gw.CreatePipelineRequest(spec_yaml=spec, idempotency_key=key)
        for attempt in range(20):
            try:
                started = time.perf_counter()
                p = await timed("CreatePipeline", stub.CreatePipeline(request, metadata=meta, timeout=30))
                if first_call:
                    # Also counted above; apart, because it includes this client's connection setup and
                    # all 100 clients make it at the same moment.
                    out["lat"]["CreatePipeline (each client's first)"].append(time.perf_counter() - started)
                    first_call = False
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt) * random.random())
        else:
            continue
        start, first = time.perf_counter(), None
        try:
            async for event in stub.WatchPipeline(
                gw.WatchPipelineRequest(pipeline_id=p.id), metadata=meta, timeout=600
            ):
                if first is None:
                    first = time.perf_counter() - start
                    out["lat"]["WatchPipeline(first event)"].append(first)
                if event.pipeline.state in TERMINAL:
                    out["states"][gw.PipelineState.Name(event.pipeline.state)] += 1
                    out["lat"]["pipeline end-to-end"].append(time.perf_counter() - start)
        except grpc.aio.AioRpcError as exc:
            out["errors"][f"WatchPipeline:{exc.code().name}"] += 1
        calls = [
            (
                "ListPipelines",
                lambda: stub.ListPipelines(gw.ListPipelinesRequest(page_size=20), metadata=meta),
            ),
            (
                "GetPipeline",
                lambda pid=p.id: stub.GetPipeline(gw.GetPipelineRequest(pipeline_id=pid), metadata=meta),
            ),
        ]
        # --get-first swaps them: whichever comes right after the pipeline's end used to be the slow one.
        for name, call in calls[::-1] if get_first else calls:
            try:
                await timed(name, call())
            except grpc.aio.AioRpcError:
                break
    await channel.close()


def client_process(address, tokens, inputs_by_token, seconds, queue, get_first=False):
    out = {
        "lat": collections.defaultdict(list),
        "errors": collections.Counter(),
        "states": collections.Counter(),
    }
    submitted: list[str] = []

    async def loop_lag(stop_at):
        # How late this client process's own event loop wakes up: time the clients' latencies include
        # that is spent neither in the network nor in the gateway.
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            out["lat"]["client event loop lag"].append(time.perf_counter() - start - LAG_TICK_S)

    async def main():
        stop_at = time.monotonic() + seconds
        await asyncio.gather(
            loop_lag(stop_at),
            *(
                client_loop(address, t, spec_for(inputs_by_token[t], i), stop_at, out, submitted, get_first)
                for i, t in enumerate(tokens)
            ),
        )

    asyncio.run(main())
    queue.put(
        {
            "cpu_s": time.process_time(),
            "lat": dict(out["lat"]),
            "errors": dict(out["errors"]),
            "states": dict(out["states"]),
            "submitted": submitted,
        }
    )


def killer(stack: Stack, every: float, stop: threading.Event, log: list) -> None:
    while not stop.wait(every):
        victim = random.choice(KILLABLE)
        stack.kill(victim)
        log.append((time.time(), victim))
        time.sleep(1.0)
        stack.restart(victim)


def sampler(pid: int, every: float, stop: threading.Event, series: list) -> None:
    """Gateway RSS and the machine's 1-minute load average every `every` seconds."""
    started = time.monotonic()
    while True:
        series.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "rss_mb": round(rss_mb(pid), 1),
                "load1": round(os.getloadavg()[0], 2),
            }
        )
        if stop.wait(every):
            return


def health_prober(address: str, stop: threading.Event, latencies: list) -> None:
    """The gateway's Health/Check (no auth, no database) twice a second from this mostly idle process:
    its latency is the wait for the gateway's event loop and the machine, not any handler's work."""
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while not stop.wait(0.5):
            start = time.perf_counter()
            try:
                check(health_pb2.HealthCheckRequest(), timeout=30)
            except grpc.RpcError:
                continue
            latencies.append(time.perf_counter() - start)


def histograms(metrics_url: str, name: str, label: str) -> dict:
    """One histogram of the gateway's /metrics, per value of `label`: count, mean and the bucket bounds
    that hold the p50 and the p99 (what the gateway itself measured, without the client's side)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    series: dict[str, dict] = collections.defaultdict(lambda: {"buckets": [], "sum": 0.0, "count": 0})
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            key = sample.labels.get(label, "")
            if sample.name.endswith("_bucket"):
                series[key]["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                series[key]["sum"] = sample.value
            elif sample.name.endswith("_count"):
                series[key]["count"] = int(sample.value)

    def bound(buckets, count, q):
        return next((le for le, n in sorted(buckets) if n >= q * count), float("inf"))

    return {
        key: {
            "count": h["count"],
            "mean_ms": round(1000 * h["sum"] / h["count"], 1),
            "p50_le_ms": 1000 * bound(h["buckets"], h["count"], 0.5),
            "p99_le_ms": 1000 * bound(h["buckets"], h["count"], 0.99),
            "over_1s": h["count"] - next((n for le, n in h["buckets"] if le == 1.0), h["count"]),
        }
        for key, h in sorted(series.items())
        if h["count"]
    }


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--processes", type=int, default=4, help="client processes (the clients are split)")
    parser.add_argument("--kill-every", type=float, default=0, help="SIGKILL a random worker every S seconds")
    parser.add_argument("--port", type=int, default=47100)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--get-first", action="store_true", help="GetPipeline before ListPipelines")
    parser.add_argument("--sample-every", type=float, default=10, help="seconds between RSS samples")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="tailor-load-"))
    stack = Stack(
        state,
        base_port=args.port,
        replicas={"quantizer": 2, "benchmarker": 2},
        extra_env={
            "TAILOR_FAKE_WORK": "instant",
            "TAILOR_WORKER_LOST_AFTER_S": "2",
            "TAILOR_GRACE_SECONDS": "2",
            "TAILOR_LOG_LEVEL": "WARNING",
            "TAILOR_MAX_OPERATIONS": "8",  # instant fake stages: worker capacity is not what is measured
        },
    )
    stack.start()
    gateway_pid = stack.processes["gateway"].pid
    try:
        access = Access(StateStore(state / "gateway.db").db)
        tokens, inputs_by_token, project_inputs = [], {}, {}
        for i in range(args.clients):
            project = f"load-{i % PROJECTS}"
            token, _ = access.create_token(project, f"client-{i}")
            if project not in project_inputs:
                conn = Connection(stack.address("gateway"), token)
                model = upload(conn, ROOT / "examples" / "models" / "stories260K").artifact.id
                data = upload(conn, ROOT / "examples" / "data" / "tinystories_eval.txt").artifact.id
                project_inputs[project] = {"model": {"artifact": model}, "data": {"eval": {"artifact": data}}}
            tokens.append(token)
            inputs_by_token[token] = project_inputs[project]
        rss_before = rss_mb(gateway_pid)

        stop, kills, series = threading.Event(), [], []
        load_before = os.getloadavg()
        threading.Thread(
            target=sampler, args=(gateway_pid, args.sample_every, stop, series), daemon=True
        ).start()
        health_latencies: list[float] = []
        threading.Thread(
            target=health_prober, args=(stack.address("gateway"), stop, health_latencies), daemon=True
        ).start()
        if args.kill_every:
            threading.Thread(target=killer, args=(stack, args.kill_every, stop, kills), daemon=True).start()
        queue = mp.Queue()
        shares = [tokens[k :: args.processes] for k in range(args.processes)]
        procs = [
            mp.Process(
                target=client_process,
                args=(stack.address("gateway"), share, inputs_by_token, args.seconds, queue, args.get_first),
            )
            for share in shares
        ]
        # Where the machine's CPU goes during the run: the gateway, the stage workers, the clients, or
        # processes that are not the bench's at all (the box is shared).
        services = {name: proc.pid for name, proc in stack.processes.items()}
        cpu_before = {name: cpu_s(pid) for name, pid in services.items()}
        busy_before = machine_busy_s()
        started = time.monotonic()
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        wall = time.monotonic() - started
        busy = machine_busy_s() - busy_before
        # A worker killed by --kill-every takes its CPU seconds with it: "workers" is then a lower bound.
        service_cpu = {name: max(0.0, cpu_s(pid) - cpu_before[name]) for name, pid in services.items()}
        clients_cpu = sum(r["cpu_s"] for r in results)
        cores = {
            "machine": busy / wall,
            "gateway": service_cpu.pop("gateway") / wall,
            "workers": sum(service_cpu.values()) / wall,
            "clients": clients_cpu / wall,
        }
        cores["other"] = cores["machine"] - cores["gateway"] - cores["workers"] - cores["clients"]
        rss_after = rss_mb(gateway_pid)
        # The gateway's own view: latency inside its handlers and the steps of CreatePipeline. What the
        # clients saw minus this is queueing (gRPC, the event loop, the clients' own processes).
        metrics_url = f"http://127.0.0.1:{stack.metrics_port('gateway')}/metrics"
        server_rpcs = histograms(metrics_url, "tailor_rpc_latency_seconds", "method")
        create_phases = histograms(metrics_url, "tailor_gateway_create_pipeline_phase_seconds", "phase")
        stop.set()
        load_after = os.getloadavg()

        lat, errors, states, submitted = (
            collections.defaultdict(list),
            collections.Counter(),
            collections.Counter(),
            [],
        )
        lat["Health/Check (from an idle process)"] = health_latencies
        for r in results:
            for k, v in r["lat"].items():
                lat[k].extend(v)
            errors.update(r["errors"])
            states.update(r["states"])
            submitted.extend(r["submitted"])

        # Exactly once: one pipeline per idempotency key, each finished, and one artifact per recipe.
        rows = StateStore(state / "gateway.db").db.query("SELECT idempotency_key, state FROM pipelines")
        per_key = collections.Counter(r["idempotency_key"] for r in rows)
        final_states = collections.Counter(r["state"] for r in rows)
        store = open_store(str(state / "store"))
        per_recipe = collections.Counter(
            recipe_key(m.recipe) for _, m in store.list_manifests() if m.recipe.get("stage") != "upload"
        )
        report = {
            "command": " ".join(sys.argv),
            "clients": args.clients,
            "seconds": round(wall, 1),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "cpus": mp.cpu_count(),
            "pipelines_finished": sum(states.values()),
            "pipelines_per_s": round(sum(states.values()) / wall, 2),
            "client_states": dict(states),
            "rpcs": {
                name: {
                    "count": len(v),
                    "per_s": round(len(v) / wall, 1),
                    "p50_ms": round(1000 * statistics.median(v), 1),
                    "p99_ms": round(1000 * percentile(v, 0.99), 1),
                }
                for name, v in sorted(lat.items())
            },
            "server_rpcs": {k.rsplit("/", 1)[-1]: v for k, v in server_rpcs.items() if "Gateway" in k},
            "create_pipeline_phases": create_phases,
            "errors": dict(errors),
            "gateway_rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
            "gateway_rss_series": series,
            "load_average": {
                "before": [round(x, 2) for x in load_before],
                "after": [round(x, 2) for x in load_after],
            },
            "cores_used": {k: round(v, 2) for k, v in cores.items()},
            "kills": len(kills),
            "pipelines_in_db": len(rows),
            "submissions": len(set(submitted)),
            "duplicate_pipelines_per_key": sum(c - 1 for c in per_key.values()),
            "db_states": dict(final_states),
            "duplicate_artifacts_per_recipe": sum(c - 1 for c in per_recipe.values()),
        }
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
