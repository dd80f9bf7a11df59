"""Peak memory of the gateway and of the CLI while a 7B-sized sharded model is uploaded and imported.

Writes a bf16-sized sharded Hugging Face folder (valid safetensors shards of random bytes, an index, a
Llama-7B config.json; 13.5 GB by default, streamed to disk), starts a gateway process on its own (no
workers; a local-directory store unless --store), runs the real `tailor models import FOLDER` as a child
process, and reports: the CLI's peak RSS (ru_maxrss from wait4), the gateway's peak RSS (VmHWM from
/proc/<pid>/status) and its growth over the idle gateway, wall time, bytes, and both per byte uploaded.
Disk: about 3x the model (the folder, the gateway's staging copy, the store); the store is deleted at the end.

    .venv/bin/python bench/upload_memory.py --gb 13.5 --json bench/results_upload_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.big_model import GatewayProcess, rss_kb, write_sharded_model  # noqa: E402

GB = 1e9


def machine() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import grpc
    import huggingface_hub

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1e6, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "kernel": platform.release(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, default=13.5, help="model size in GB (1e9 bytes)")
    parser.add_argument(
        "--shard-gb", type=float, default=4.95, help="shard size (Hugging Face's default 5 GB)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir (deleted at the end)")
    parser.add_argument("--store", default=None, help="artifact store URL (default: a directory in workdir)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="tailor-upload-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    need = 3.1 * args.gb * GB
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(
            f"{work}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed (the folder, staging, the store)"
        )
    folder = work / "model-7b-shaped"
    try:
        started = time.monotonic()
        written = write_sharded_model(folder, int(args.gb * GB), int(args.shard_gb * GB))
        print(
            f"wrote {written / GB:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards "
            f"({time.monotonic() - started:.0f}s)",
            flush=True,
        )
        gateway = GatewayProcess(
            work / "gateway", store_url=args.store, extra_env={"TAILOR_GRACE_SECONDS": "2"}
        )
        gateway.start()
        idle = rss_kb(gateway.proc.pid)
        env = {**os.environ, "TAILOR_GATEWAY": gateway.address, "TAILOR_TOKEN": gateway.token}
        command = [str(Path(sys.executable).parent / "tailor"), "models", "import", str(folder)]
        started = time.monotonic()
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.monotonic() - started
        out, err = child.stdout.read().decode(), child.stderr.read().decode()
        peak = rss_kb(gateway.proc.pid)
        gateway.stop()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"tailor models import failed:\n{out}\n{err}\n{gateway.log.read_text()[-3000:]}")
        artifact_id = out.strip().splitlines()[-1]
        result = {
            "bench": "upload_memory",
            "command": " ".join(sys.argv),
            "model_bytes": written,
            "shards": len(list(folder.glob("*.safetensors"))),
            "store": args.store or "local directory",
            "artifact_id": artifact_id,
            "wall_s": round(wall, 1),
            "throughput_mb_s": round(written / wall / 1e6, 1),
            "cli_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "gateway_idle_rss_mb": round(idle["VmRSS"] / 1024, 1),
            "gateway_peak_rss_mb": round(peak["VmHWM"] / 1024, 1),
            "gateway_peak_growth_mb": round((peak["VmHWM"] - idle["VmRSS"]) / 1024, 1),
            "machine": machine(),
        }
        result["gateway_peak_rss_per_gb_uploaded_mb"] = round(
            result["gateway_peak_growth_mb"] / (written / GB), 3
        )
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "gateway", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
