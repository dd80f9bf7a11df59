"""Every quantization method available on this machine, run on the real stories260K model.

For each registered method (tailor_quantizer.methods.list_methods(); the unavailable ones are listed
with the reason) and for a few extra configurations that put GPTQ and AWQ side by side with
round-to-nearest at the same bits and group size, and automatic mixed precision next to uniform
quantization of at least its size, it reports:
  size on disk (the whole folder: weights, config, tokenizer), compression ratio vs the float32 folder,
  perplexity on the first 32768 tokens of TinyStories validation text (context 512, stride 256; the
  benchmarker's own sliding-window code), its change vs float32, top-1 next-token agreement with
  float32 on the same windows, and the wall time of the method's run().
Calibration (methods that need it): 32 sequences x 256 tokens drawn with seed 0 from
examples/data/tinystories_train.txt, never the evaluation text. stories260K's layers are 64 and 172
wide, so group size 128 (the usual default) does not divide them: rows use per-channel scales (-1) or
group size 4, said in the config column.

Usage: .venv/bin/python bench/quantize_methods.py [--json results.json] [--only gptq,rtn]
A Markdown table goes to stdout; progress to stderr. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "models" / "stories260K"
TRAIN = ROOT / "examples" / "data" / "tinystories_train.txt"
EVAL = ROOT.parent / "shared" / "data" / "eval" / "tinystories" / "tinystories_val_dev.txt"
EVAL_TOKENS, CONTEXT, STRIDE = 32768, 512, 256
PER_CHANNEL = {"group_size": -1}
# Options for the registered methods whose defaults do not fit stories260K (group size 128).
DEFAULT_CONFIGS = {"rtn": PER_CHANNEL, "gptq": PER_CHANNEL, "awq": PER_CHANNEL, "auto": PER_CHANNEL}


def extra_rows(uniform_fraction) -> list[tuple[str, str, dict]]:
    """(label, method, config): comparisons at equal bits and group size, and auto vs uniform."""
    five = uniform_fraction(5)
    auto_common = {"group_size": -1, "algorithm": "rtn", "sensitivity_samples": 32}
    return [
        ("rtn 4-bit g4", "rtn", {"bits": 4, "group_size": 4}),
        ("gptq 4-bit g4", "gptq", {"bits": 4, "group_size": 4}),
        ("awq 4-bit g4 (zero points)", "awq", {"group_size": 4}),
        ("rtn 4-bit g4 (zero points)", "rtn", {"bits": 4, "group_size": 4, "symmetric": False}),
        ("rtn 4-bit channel (zero points)", "rtn", {"bits": 4, "group_size": -1, "symmetric": False}),
        ("awq 4-bit channel (symmetric)", "awq", {"group_size": -1, "symmetric": True}),
        ("gptq 3-bit g4", "gptq", {"bits": 3, "group_size": 4}),
        ("rtn 8-bit channel", "rtn", {"bits": 8, "group_size": -1}),
        ("gptq 8-bit channel", "gptq", {"bits": 8, "group_size": -1}),
        ("nf4 without double quantization", "nf4", {"double_quant": False}),
        ("int8_static entropy", "int8_static", {"calibrator": "entropy"}),
        ("int8_static percentile 99.999", "int8_static", {"calibrator": "percentile"}),
        (
            "auto rtn {3,4,5,6,8} per layer, budget = uniform 5-bit",
            "auto",
            {
                **auto_common,
                "candidate_bits": [3, 4, 5, 6, 8],
                "granularity": "layer",
                "max_size_fraction": five,
            },
        ),
        (
            "uniform rtn 5-bit channel",
            "auto",
            {**auto_common, "candidate_bits": [5], "max_size_fraction": five},
        ),
        (
            "auto rtn {3,4,5,6,8} fused, budget = uniform 4-bit (compare rtn)",
            "auto",
            {**auto_common, "candidate_bits": [3, 4, 5, 6, 8], "max_size_fraction": uniform_fraction(4)},
        ),
        (
            "auto gptq {3,4,5,6,8} per layer, budget = uniform 5-bit",
            "auto",
            {
                **auto_common,
                "algorithm": "gptq",
                "candidate_bits": [3, 4, 5, 6, 8],
                "granularity": "layer",
                "max_size_fraction": five,
            },
        ),
        (
            "uniform gptq 5-bit channel",
            "auto",
            {**auto_common, "algorithm": "gptq", "candidate_bits": [5], "max_size_fraction": five},
        ),
    ]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--eval", type=Path, default=EVAL, help="held-out text (default: %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated method names (default: all)")
    args = parser.parse_args()

    from tailor_quantizer import llm_compressor as lc
    from tailor_quantizer.methods import QuantizeJob, list_methods, parse_config
    from tailor_runtime.ml.agreement import agreement
    from tailor_runtime.ml.calibration import build_calibration_set, read_documents
    from tailor_runtime.ml.model_io import folder_size_bytes, load_causal_lm
    from tailor_runtime.ml.perplexity import logits_fn_for, perplexity
    from tailor_runtime.progress import no_progress

    text = args.eval.read_text(encoding="utf-8")
    reference, tokenizer = load_causal_lm(MODEL)
    calibration = build_calibration_set(tokenizer, read_documents(TRAIN), samples=32, seq_len=256, seed=0)
    layers = lc.quantizable_linears(reference)
    bf16 = sum(layer.weight.numel() * 2 for layer in layers.values())

    def uniform_fraction(bits: int) -> float:
        return sum(lc.stored_bytes(layer, lc.int_weights(bits, -1, True)) for layer in layers.values()) / bf16

    def memoized(model):
        """The model's logits per window, computed once: perplexity and agreement read the same windows."""
        logits, memo = logits_fn_for(model), {}

        def run(input_ids):
            key = input_ids.numpy().tobytes()
            if key not in memo:
                memo[key] = logits(input_ids)
            return memo[key]

        return run

    reference_logits = memoized(reference)

    def measure(folder: Path) -> dict:
        model, tok = load_causal_lm(folder)
        logits = memoized(model)
        ppl = perplexity(logits, tok, text, CONTEXT, STRIDE, EVAL_TOKENS)["perplexity"]
        agree = agreement(logits, reference_logits, tok, text, CONTEXT, STRIDE, EVAL_TOKENS)
        return {"perplexity": ppl, "top1_agreement": agree["top1_agreement"], "kl": agree["kl_divergence"]}

    float_size = folder_size_bytes(MODEL)
    log("float32 reference")
    rows = [
        {
            "label": "float32 (reference)",
            "method": "-",
            "config": {},
            "size_bytes": float_size,
            "seconds": 0.0,
            **measure(MODEL),
        }
    ]
    base = rows[0]["perplexity"]
    only = {n for n in args.only.split(",") if n}
    methods = {m.name: m for m in list_methods()}
    plan = [(name, name, DEFAULT_CONFIGS.get(name, {})) for name in methods]
    plan += extra_rows(uniform_fraction)
    with tempfile.TemporaryDirectory(prefix="tailor-bench-") as scratch:
        for i, (label, name, config) in enumerate(plan):
            if only and name not in only:
                continue
            method = methods[name]
            row = {"label": label, "method": name, "config": config}
            ok, why = method.availability()
            if not ok:
                rows.append({**row, "error": f"unavailable: {why}"})
                continue
            log(f"{label} ...")
            out = Path(scratch) / f"{i}_{name}"
            data = calibration if method.caps.needs_calibration else None
            try:
                start = time.perf_counter()
                metrics = method.run(
                    MODEL, out, parse_config(method, config), QuantizeJob(no_progress, calibration=data)
                )
                row["seconds"] = time.perf_counter() - start
                row["size_bytes"] = folder_size_bytes(out)
                row.update(measure(out))
                if "layer_bits" in metrics:
                    row["mean_weight_bits"] = metrics["mean_weight_bits"]
                    row["size_fraction_of_bf16"] = metrics["size_fraction_of_bf16"]
                    row["bits_used"] = sorted(set(metrics["layer_bits"].values()))
            except Exception as exc:  # one failing method must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            log(f"  {row.get('perplexity', row.get('error'))}")

    print(
        f"stories260K on {platform.processor() or platform.machine()}, eval: first {EVAL_TOKENS} tokens of "
        f"{args.eval.name} (context {CONTEXT}, stride {STRIDE})\n"
    )
    print("| method | config | size | vs fp32 | perplexity | change | top-1 agreement | KL | time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        config = ", ".join(
            f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in row["config"].items()
        )
        config = config or "defaults"
        if "error" in row:
            print(f"| {row['label']} | {config} | | | | | | | {row['error']} |")
            continue
        ratio = float_size / row["size_bytes"]
        change = 100 * (row["perplexity"] / base - 1)
        print(
            f"| {row['label']} | {config} | {row['size_bytes'] / 1024:.0f} KiB | {ratio:.2f}x | "
            f"{row['perplexity']:.4f} | {change:+.2f}% | {row['top1_agreement']:.4f} | {row['kl']:.4f} | "
            f"{row['seconds']:.1f} s |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"eval_tokens": EVAL_TOKENS, "context": CONTEXT, "stride": STRIDE, "rows": rows},
                indent=2,
                default=str,
            )
        )
    return 0 if all(math.isfinite(r.get("perplexity", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
