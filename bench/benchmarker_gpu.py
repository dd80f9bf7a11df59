"""The benchmarker service's own GPU measurement of artifacts the quantizer wrote, against the memory
bandwidth ceiling measured in the same run.

Model: the Llama-2-7B architecture with RANDOM weights (bf16): speed and memory only; its perplexity
means nothing. Artifacts, each written by Tailor's own quantizer method, then measured by
`tailor_benchmarker.run.run_benchmark` (a child process per artifact, exactly what a Benchmark RPC runs):
  bf16   the hf-safetensors folder itself
  rtn    quantizer method `rtn`, 4-bit symmetric, group 128 (compressed-tensors W4A16, what GPTQ and AWQ
         write too); on the GPU it runs as packed int4 layers with Tailor's Triton GEMV kernel; the
         output head stays bf16 (llm-compressor leaves lm_head unquantized)
  nf4    quantizer method `nf4` (bitsandbytes)
Benchmark config: device cuda (static KV cache, compiled step), prompt "Once upon a time", 128 new
tokens, 1 warm-up + 3 timed runs, batch 1 (--batch-sizes adds more), perplexity on 1024 tokens. Both decode
rates the benchmarker reports: streamed (each token waited for) and pipelined (no wait between tokens).
Ceiling: device-to-device copy bandwidth (bytes read + written per second) / the artifact's weight bytes
as the benchmarker counts them, the issue's definition; `fraction_of_bf16_ceiling` divides by the bf16
model's ceiling (the issue's bar: at least 60% in bf16, and a 4-bit path faster than bf16).

Usage (device machine, one H100; carry gen/ and .whl, see gpu_session.sh):
  python3 bench/benchmarker_gpu.py --out $OUT/benchmarker_gpu.json
  python3 bench/benchmarker_gpu.py --small --out /tmp/b.json   # smoke test, CPU or GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("runtime", "services/quantizer", "services/benchmarker", "gen", "bench"):
    sys.path.insert(0, str(ROOT / sub))

EVAL = ROOT / "examples" / "data" / "tinystories_eval.txt"
ARTIFACTS = {"bf16": None, "rtn": {"bits": 4, "group_size": 128, "symmetric": True}, "nf4": {}}


def quantize(method: str, config: dict, model_dir: Path, out: Path, device: str) -> float:
    from tailor_quantizer.methods import QuantizeJob, get_method, parse_config
    from tailor_runtime.progress import no_progress

    m = get_method(method)
    ok, why = m.availability()
    if not ok:
        raise RuntimeError(f"{method} unavailable: {why}")
    start = time.perf_counter()
    m.run(model_dir, out, parse_config(m, config), QuantizeJob(no_progress, device=device))
    return time.perf_counter() - start


def main() -> int:
    import torch
    from gpu_decode import copy_bandwidth
    from quantize_7b_gpu import LLAMA2_7B, build_model

    from tailor_benchmarker.config import BenchmarkConfig
    from tailor_benchmarker.run import run_benchmark
    from tailor_runtime.roofline import decode_estimate, get_profile

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/benchmarker_gpu"))
    parser.add_argument("--small", action="store_true", help="a 2-layer, 256-wide model (smoke test)")
    parser.add_argument("--only", default=",".join(ARTIFACTS), help="artifacts to measure")
    parser.add_argument("--batch-sizes", default="1", help="decode batch sizes (each compiles its own step)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    shape = dict(LLAMA2_7B)
    if args.small:
        shape.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512)  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / "bf16"
    if not (source / "tailor_format.json").is_file():
        t0 = time.perf_counter()
        build_model(source, shape, device)
        print(f"built the bf16 folder in {time.perf_counter() - t0:.0f} s", flush=True)
    bandwidth = copy_bandwidth(torch.device(device)) if on_gpu else None

    cfg = BenchmarkConfig(
        device="cuda" if on_gpu else "cpu",
        max_eval_tokens=1024,
        context_length=256,
        stride=256,
        latency_new_tokens=128 if not args.small else 16,
        warmup=1,
        repetitions=3,
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
    )
    rows = []
    for name in args.only.split(","):
        folder = source
        quantize_s = None
        if ARTIFACTS[name] is not None:
            folder = args.work / name
            if not (folder / "tailor_format.json").is_file():
                quantize_s = quantize(name, ARTIFACTS[name], source, folder, device)
        t0 = time.perf_counter()
        try:
            result = run_benchmark(folder, EVAL, cfg, lambda *a, **k: None)
        except Exception as exc:  # one artifact failing must not lose the others' rows
            rows.append({"artifact": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: {rows[-1]['error']}", flush=True)
            continue
        lat = result["latency"]
        weight_bytes = result["model_memory_mb"] * 2**20
        row = {
            "artifact": name,
            "format": result["model"]["format"],
            "packed_int4": result["model"].get("packed_int4"),
            "tokens_per_s": lat["tokens_per_s"],
            "pipelined_tokens_per_s": lat.get("pipelined_tokens_per_s"),
            "per_token_ms": {k: lat["per_token_ms"][k] for k in ("p50", "p95", "p99", "iqr")},
            "ttft_ms_median": lat["ttft_ms"]["median"],
            "throughput": lat["throughput"],
            "compiled": lat["compiled"],
            "compile_error": lat.get("compile_error"),
            "kv_cache": lat["kv_cache_kind"],
            "weight_gb": weight_bytes / 1e9,
            "size_on_disk_gb": result["size_on_disk_mb"] * 2**20 / 1e9,
            "gpu_peak_allocated_gb": result["memory"].get("gpu_peak_allocated_mb", 0) * 2**20 / 1e9,
            "ceiling_tokens_per_s": bandwidth / weight_bytes if bandwidth else None,
            "quantize_s": quantize_s,
            "benchmark_wall_s": time.perf_counter() - t0,
            "gpu": result["environment"].get("gpu"),
        }
        # The roofline estimator's figure for an H100 (what a selector shows for that target), against
        # what this machine measured: the estimator is an upper bound.
        row["roofline_h100_tokens_per_s"] = decode_estimate(get_profile("h100"), weight_bytes)["tokens_per_s"]
        rows.append(row)
        write(args.out, rows, bandwidth, cfg, args.small)  # after each row: a time-out keeps what was done
        print(json.dumps({k: row[k] for k in ("artifact", "tokens_per_s", "pipelined_tokens_per_s", "compiled")}),
              flush=True)  # fmt: skip
    write(args.out, rows, bandwidth, cfg, args.small)
    for row in rows:
        print(row)
    return 0


def write(path: Path, rows: list[dict], bandwidth: float | None, cfg, small: bool) -> None:
    import torch

    bf16 = next((r for r in rows if r["artifact"] == "bf16" and "error" not in r), None)
    for row in rows:
        if bf16 and bf16["ceiling_tokens_per_s"] and "error" not in row:
            row["fraction_of_bf16_ceiling"] = row["tokens_per_s"] / bf16["ceiling_tokens_per_s"]
            row["speed_vs_bf16"] = row["tokens_per_s"] / bf16["tokens_per_s"]
            if row["pipelined_tokens_per_s"] and bf16["pipelined_tokens_per_s"]:
                row["pipelined_fraction_of_bf16_ceiling"] = (
                    row["pipelined_tokens_per_s"] / bf16["ceiling_tokens_per_s"]
                )
                row["pipelined_speed_vs_bf16"] = (
                    row["pipelined_tokens_per_s"] / bf16["pipelined_tokens_per_s"]
                )
    out = {
        "model": "small Llama, RANDOM weights" if small else "Llama-2-7B architecture, RANDOM weights",
        "copy_bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        "config": cfg.model_dump(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rows": rows,
    }
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
