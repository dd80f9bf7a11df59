"""CPU speed of the deployable artifacts against PyTorch FP32, same machine, same run (issue 5).

    .venv/bin/python bench/cpu_speed.py [--threads 1] [--new-tokens 32] [--repetitions 3] [--small]

Builds a Llama-architecture model of about 110M parameters with RANDOM weights (the speed and memory of
an architecture do not depend on its weights; no real model of this size is available here), saves it as
an hf-safetensors folder, then makes the CPU artifacts the platform produces from it:

- int8_dynamic (the quantizer's method, run through its registry): torch dynamic-int8 Linear layers;
- ONNX FP32 and ONNX INT8 (the exporter's `export_onnx`, from the FP32 and the int8_dynamic folders).

Each is timed with the benchmarker's own decode-latency code (greedy, batch 1, EOS ignored, warm-up
discarded, median over repetitions), with the same prompt and thread count, one after the other in this
process. The ONNX graph has no KV cache (every token recomputes the whole sequence; `kv_cache` says so).
Verification of the int8 ONNX export is relaxed here: with random weights the logits are nearly flat, so
the top-1 agreement the exporter asks of real models means nothing. Writes a Markdown table to stdout and,
with --json, the full results.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples/models/stories260K"  # ids only matter for speed: a 512-token vocab suffices
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

# ~110M parameters with tied embeddings (the GPT-2-small / Llama-mini shape).
ARCH = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    intermediate_size=2048,
    vocab_size=32000,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
SMALL = dict(ARCH, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=688)  # fmt: skip


def parameter_count(arch: dict) -> int:
    """Parameters of a Llama with these dimensions (no biases; RMSNorm weights; tied or untied head)."""
    h, n, i, v = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"], arch["vocab_size"]
    kv = h * arch["num_key_value_heads"] // arch["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return v * h + n * per_layer + h + (0 if arch["tie_word_embeddings"] else v * h)


def build(folder: Path, arch: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailor_runtime.ml.model_io import load_tokenizer, save_hf_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**arch, bos_token_id=1, eos_token_id=2)).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == parameter_count(arch), (count, parameter_count(arch))
    save_hf_model(model, load_tokenizer(TOKENIZER), folder)
    return count


def make_artifacts(root: Path, arch: dict) -> dict[str, Path]:
    from tailor_exporter.onnx_export import OnnxExportConfig, export_onnx
    from tailor_quantizer.methods.registry import get_method
    from tailor_runtime.progress import no_progress

    folders = {"pytorch-fp32": root / "fp32", "pytorch-int8_dynamic": root / "int8"}
    build(folders["pytorch-fp32"], arch)
    method = get_method("int8_dynamic")
    method.run(folders["pytorch-fp32"], folders["pytorch-int8_dynamic"], method.Config(), no_progress)
    relaxed = OnnxExportConfig(min_top1_agreement=0.0, int8_min_top1_agreement=0.0, int8_atol=1e9, atol=1e-2)
    for name, source in (("onnx-fp32", "pytorch-fp32"), ("onnx-int8", "pytorch-int8_dynamic")):
        folders[name] = root / name
        started = time.monotonic()
        export_onnx(folders[source], folders[name], relaxed, no_progress)
        print(f"exported {name} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return folders


def measure(folder: Path, threads: int, new_tokens: int, repetitions: int) -> dict:
    import torch

    from tailor_benchmarker.child import _load, peak_rss_mb
    from tailor_benchmarker.latency import decode_latency
    from tailor_runtime.ml.model_io import folder_size_bytes

    torch.set_num_threads(threads)
    model, tokenizer, info = _load(folder, threads)
    lat = decode_latency(model, tokenizer, PROMPT, new_tokens=new_tokens, warmup=1, repetitions=repetitions)
    return {
        "runtime": info["runtime"],
        "kv_cache": lat["kv_cache"],
        "tokens_per_s": lat["tokens_per_s"],
        "end_to_end_tokens_per_s": lat["end_to_end_tokens_per_s"],
        "ttft_ms": lat["ttft_ms"]["median"],
        "per_token_ms": lat["per_token_ms"],
        "size_mb": folder_size_bytes(folder) / 2**20,
        "weight_mb": info["weight_bytes"] / 2**20,
        "peak_rss_mb_so_far": peak_rss_mb(),
        "prompt_tokens": lat["prompt_tokens"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a ~10M model, to try the script quickly")
    parser.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = parser.parse_args(argv)

    from tailor_runtime.hardware import cpu_model

    arch = SMALL if args.small else ARCH
    results = {}
    with tempfile.TemporaryDirectory(prefix="tailor-cpu-speed-") as tmp:
        folders = make_artifacts(Path(tmp), arch)
        for name, folder in folders.items():
            results[name] = measure(folder, args.threads, args.new_tokens, args.repetitions)
            print(f"{name}: {results[name]['tokens_per_s']:.2f} tokens/s", file=sys.stderr, flush=True)

    base = results["pytorch-fp32"]["tokens_per_s"]
    versions = {n: metadata.version(n) for n in ("torch", "transformers", "onnxruntime", "onnx")}
    print(f"model: Llama, {parameter_count(arch) / 1e6:.1f}M parameters, RANDOM weights, {arch}")
    print(f"machine: {cpu_model()}, {len(__import__('os').sched_getaffinity(0))} usable cores; "
          f"threads {args.threads}; {versions}")  # fmt: skip
    print(f"decode: batch 1, prompt {results['pytorch-fp32']['prompt_tokens']} tokens, {args.new_tokens} new, "
          f"1 warm-up + {args.repetitions} timed runs, median")  # fmt: skip
    print()
    print(
        "| artifact | runtime | KV cache | size MB | decode tokens/s | vs PyTorch FP32 | TTFT ms | p95 ms/token |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['runtime']} | {'yes' if r['kv_cache'] else 'no'} | {r['size_mb']:.1f} | "
            f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x | {r['ttft_ms']:.1f} | "
            f"{r['per_token_ms']['p95']:.1f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"arch": arch, "threads": args.threads, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
