"""Benchmark one model folder: run the measurement in a child process and label it with the machine.

The child (tailor_benchmarker.child) does the work; this side follows it, forwards its progress, and
kills it when the operation is cancelled (the ProgressFn raises Cancelled) or anything else goes
wrong here, so a benchmark can never outlive its operation.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any

from tailor_benchmarker.child import PROGRESS_PREFIX
from tailor_benchmarker.config import BenchmarkConfig
from tailor_runtime import errors
from tailor_runtime.benchmark_report import SCHEMA_VERSION, BenchmarkReport
from tailor_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, TailorError
from tailor_runtime.hardware import cpu_model, memory_gb
from tailor_runtime.progress import ProgressFn

# Progress (and with it the cancellation check) is called at least this often while the child runs.
POLL_S = 0.25
# No line (progress or heartbeat) from the child for this long: it is stopped or frozen; kill it, retry once.
STALL_S = float(os.environ.get("TAILOR_BENCH_STALL_S", "60"))
STALL_RETRIES = 1


class ChildStalled(Exception):
    pass


STDERR_TAIL_LINES = 8
_VERSIONED = (
    "torch",
    "transformers",
    "onnxruntime",
    "llama-cpp-python",
    "tokenizers",
    "bitsandbytes",
    "compressed-tensors",
    "triton",
    "numpy",
)


def run_benchmark(
    model_dir: Path,
    eval_text: Path,
    cfg: BenchmarkConfig,
    progress: ProgressFn,
    reference_dir: Path | None = None,
    choice_file: Path | None = None,
) -> dict[str, Any]:
    """`benchmark()` as the stored report's JSON-ready dict."""
    return benchmark(model_dir, eval_text, cfg, progress, reference_dir, choice_file).dump()


def benchmark(
    model_dir: Path,
    eval_text: Path,
    cfg: BenchmarkConfig,
    progress: ProgressFn,
    reference_dir: Path | None = None,
    choice_file: Path | None = None,
) -> BenchmarkReport:
    """Perplexity, latency and memory of the model in `model_dir`, measured in a child process.

    With `reference_dir` (the parent model), also its agreement with the parent; with `choice_file`
    (an SST-2 TSV), multiple-choice accuracy. The child's result is checked against the report's schema
    here, so a measurement that does not match it fails this stage, not a reader later.
    """
    from tailor_runtime.ml.model_io import folder_size_bytes

    model_dir, eval_text = Path(model_dir), Path(eval_text)
    if not model_dir.is_dir():
        raise NotFound(f"model folder {model_dir} does not exist")
    if not eval_text.is_file():
        raise NotFound(f"evaluation text {eval_text} does not exist")
    _check_format(model_dir)
    if reference_dir is not None:
        reference_dir = Path(reference_dir)
        if not reference_dir.is_dir():
            raise NotFound(f"reference model folder {reference_dir} does not exist")
        _check_format(reference_dir)
    if choice_file is not None and not Path(choice_file).is_file():
        raise NotFound(f"multiple-choice data {choice_file} does not exist")
    extra = [] if reference_dir is None else ["--reference", str(reference_dir)]
    extra += [] if choice_file is None else ["--choices", str(choice_file)]

    progress(0.0, "starting", f"benchmarking {model_dir.name}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tailor-bench-") as tmp:
        out = Path(tmp) / "result.json"
        stderr_path = Path(tmp) / "stderr.txt"
        for attempt in range(STALL_RETRIES + 1):
            try:
                with stderr_path.open("wb") as stderr:
                    command = _child_command(model_dir, eval_text, cfg, out) + extra
                    returncode = _follow(command, stderr, progress)
                result = _read_result(out, returncode, stderr_path, model_dir)
                break
            except (ChildStalled, FailedPrecondition) as exc:
                # A stalled child, or one killed by a signal (not a domain error it reported): once more.
                killed = isinstance(exc, FailedPrecondition) and "was killed by" in str(exc)
                if attempt == STALL_RETRIES or not (isinstance(exc, ChildStalled) or killed):
                    if isinstance(exc, ChildStalled):
                        raise FailedPrecondition(
                            f"benchmark of {model_dir.name}: the measuring process stalled twice "
                            f"(no heartbeat for {STALL_S:.0f}s); it was killed"
                        ) from None
                    raise
                progress(0.0, "retrying", f"the measuring process {exc}; starting it again")

    result["size_on_disk_mb"] = folder_size_bytes(model_dir) / 2**20
    result["wall_s"] = time.monotonic() - started
    result["config"] = cfg.model_dump()
    result["environment"] = environment(result.get("threads", {}), result.get("gpu"))
    report = BenchmarkReport.parse(
        {"schema_version": SCHEMA_VERSION, **result}, f"benchmark of {model_dir.name}"
    )
    progress(100.0, "done", f"perplexity {report.perplexity.perplexity:.3f}")
    return report


def _check_format(model_dir: Path) -> None:
    """Fail before starting a child (seconds of imports) on a folder no child could load."""
    from tailor_runtime.ml.formats import GGUF, loadable_formats
    from tailor_runtime.ml.model_io import read_format

    declared = read_format(model_dir)["format"]
    measurable = loadable_formats()
    if declared not in measurable:
        raise InvalidArgument(f"cannot benchmark a model in format {declared!r}", choices=measurable)
    if declared == GGUF:
        from tailor_runtime.ml.gguf_io import require_llama_cpp

        require_llama_cpp(f"benchmarking {model_dir.name} (format 'gguf', measured in llama.cpp)")


def _child_command(model_dir: Path, eval_text: Path, cfg: BenchmarkConfig, out: Path) -> list[str]:
    command = [sys.executable, "-m", "tailor_benchmarker.child"]
    command += ["--model", str(model_dir), "--eval", str(eval_text)]
    return command + ["--config", cfg.model_dump_json(), "--out", str(out)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child imports the same packages as this process, whether or not they are installed.
    roots = {str(Path(m.__file__).resolve().parents[1]) for m in (sys.modules[__package__], errors)}
    env["PYTHONPATH"] = os.pathsep.join([*sorted(roots), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def _follow(command: list[str], stderr: Any, progress: ProgressFn) -> int:
    """Run the child to its end, forwarding its progress; kill it if anything (a cancel) interrupts."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr, env=_child_env(), encoding="utf-8", errors="replace"
    )
    latest: dict[str, Any] = {"percent": 0.0, "phase": "starting", "message": "", "beat": time.monotonic()}
    # A thread reads stdout so a chatty child never blocks on a full pipe.
    reader = threading.Thread(target=_read_progress, args=(proc.stdout, latest), daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            if time.monotonic() - latest["beat"] > STALL_S:
                raise ChildStalled(f"sent no heartbeat for {STALL_S:.0f}s (stopped or frozen)")
            progress(min(float(latest["percent"]), 99.0), str(latest["phase"]), str(latest["message"]))
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(timeout=5)
    return proc.returncode


def _read_progress(stream: Any, latest: dict[str, Any]) -> None:
    for line in stream:
        latest["beat"] = time.monotonic()
        if line.startswith(PROGRESS_PREFIX):
            try:
                latest.update(json.loads(line[len(PROGRESS_PREFIX) :]))
            except json.JSONDecodeError:
                continue


def _read_result(out: Path, returncode: int, stderr_path: Path, model_dir: Path) -> dict[str, Any]:
    data = json.loads(out.read_text()) if out.is_file() else None
    if returncode == 0 and data is not None and "error" not in data:
        return data
    if data is not None and "error" in data:
        # A domain error in the child (an invalid config, an unknown format) keeps its class and code.
        err = data["error"]
        cls = getattr(errors, err.get("type", ""), None)
        if isinstance(cls, type) and issubclass(cls, TailorError):
            raise cls(f"benchmark of {model_dir.name} failed: {err.get('message')}")
        raise FailedPrecondition(
            f"benchmark of {model_dir.name} failed: {err.get('type')}: {err.get('message')}"
        )
    if returncode < 0:
        how = f"was killed by {signal.Signals(-returncode).name}"
        if returncode == -signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exited with status {returncode}"
    tail = _tail(stderr_path)
    raise FailedPrecondition(
        f"benchmark of {model_dir.name} {how} without a result" + (f"; last output: {tail}" if tail else "")
    )


def _tail(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(deque(lines, maxlen=STDERR_TAIL_LINES))


def environment(child_threads: dict[str, Any], gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine and software a result was measured with, so every figure is labelled (`gpu`: the
    CUDA device the child measured on, None on CPU)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),  # what a container or taskset actually allows
        "memory_total_mb": memory_gb() * 1024,
        "gpu": gpu,
        "threads": child_threads,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }
