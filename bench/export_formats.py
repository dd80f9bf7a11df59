"""Size and parity of every export format on the bundled real model (stories260K), issue 6.

    .venv/bin/python bench/export_formats.py [--json bench/results_export_formats_cpu.json] [--only a,b]

Runs each registered export format's own `run()` (the exporter service's code) on
examples/models/stories260K, a real trained Llama (260K parameters, 512-token vocabulary), with each
format's default config (GGUF: every type; Triton: its default variant), calibration text from
examples/data/tinystories_train.txt where a format needs it, and records what the export's verification
measured against the PyTorch source (max |logit difference|, top-1 agreement, greedy agreement where the
format generates), its size on disk, the source's size and the export time. Formats that need a GPU or a
missing library are listed as not run, with the reason. The CPU speed of the exports against PyTorch FP32
is bench/cpu_speed.py (a 110M-parameter model: on 260K parameters every runtime's fixed costs dominate).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples/models/stories260K"
CALIBRATION = REPO / "examples/data/tinystories_train.txt"
# Format -> the configs to run (default: one run with the format's defaults).
VARIANTS = {"gguf": [{"type": t} for t in ("F16", "Q8_0", "Q4_0", "Q4_K_M")]}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def run_one(fmt, config: dict, out: Path) -> dict:
    from tailor_exporter.registry import ExportJob
    from tailor_runtime.progress import no_progress

    cfg = fmt.Config(**config)
    started = time.perf_counter()
    result = fmt.run(MODEL, out, cfg, ExportJob(no_progress, calibration_file=CALIBRATION))
    seconds = time.perf_counter() - started
    v = result.get("verification", {})
    checks = v.get("checks", {})
    # GGUF reports two checks: its weights dequantized in PyTorch, and llama.cpp running the file; the
    # second is the artifact itself, so it is the one shown where it ran.
    in_runtime = "llama_cpp_max_abs_diff" in v
    return {
        "format": fmt.name,
        "config": config,
        "size_mb": folder_mb(out),
        "max_abs_diff": v["llama_cpp_max_abs_diff"] if in_runtime else v.get("max_abs_diff"),
        "top1_agreement": v["llama_cpp_top1_agreement"] if in_runtime else v.get("top1_agreement"),
        "greedy_agreement": v.get("llama_cpp_greedy_agreement", v.get("greedy_agreement")),
        "ran_converted_artifact": v.get("ran_converted_artifact", checks.get("ran_converted_artifact", True)),
        "verification": {k: x for k, x in v.items() if k != "checks"},
        "deterministic": fmt.deterministic,
        "export_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--only", default="", help="comma-separated format names")
    args = parser.parse_args(argv)

    import torch

    from tailor_exporter.registry import list_formats
    from tailor_runtime.stage import library_versions

    torch.set_num_threads(1)
    only = set(filter(None, args.only.split(",")))
    rows, not_run = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in list_formats():
            if only and fmt.name not in only:
                continue
            if "cpu" not in fmt.devices:
                not_run.append({"format": fmt.name, "why": f"needs {', '.join(fmt.devices)}"})
                continue
            for i, config in enumerate(VARIANTS.get(fmt.name, [{}])):
                label = f"{fmt.name} {json.dumps(config)}" if config else fmt.name
                try:
                    rows.append(run_one(fmt, config, Path(tmp) / f"{fmt.name}-{i}"))
                    print(json.dumps(rows[-1]), flush=True)
                except Exception as exc:  # noqa: BLE001 - recorded as not run, with the tool's message
                    not_run.append({"format": label, "why": f"{type(exc).__name__}: {exc}"[:400]})
                    print(f"{label}: not run: {not_run[-1]['why']}", flush=True)
    source_mb = folder_mb(MODEL)
    result = {
        "model": "stories260K (real, trained; examples/models/stories260K)",
        "source_size_mb": source_mb,
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "versions": library_versions(
            "torch",
            "transformers",
            "onnx",
            "onnxruntime",
            "gguf",
            "llama_cpp_python",
            "tritonclient",
            "coremltools",
            "executorch",
        ),
        "exports": rows,
        "not_run": not_run,
    }
    print(f"\nsource: {source_mb:.3f} MB (hf-safetensors)\n")
    print(
        "| format | config | size MB | vs source | max abs logit diff | top-1 | greedy | ran the artifact | export s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        greedy = "" if r["greedy_agreement"] is None else f"{r['greedy_agreement']:.3f}"
        print(
            f"| {r['format']} | {json.dumps(r['config']) if r['config'] else ''} | {r['size_mb']:.3f} | "
            f"{r['size_mb'] / source_mb:.2f}x | {r['max_abs_diff']:.4g} | {r['top1_agreement']:.3f} | {greedy} | "
            f"{'yes' if r['ran_converted_artifact'] else 'no (conversion only)'} | {r['export_s']:.1f} |"
        )
    for n in not_run:
        print(f"- not run: {n['format']}: {n['why']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
