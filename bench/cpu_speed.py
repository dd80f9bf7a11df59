"""CPU speed of the deployable artifacts against PyTorch FP32, same machine, same run (issue 5).

    .venv/bin/python bench/cpu_speed.py [--threads 1] [--new-tokens 32] [--rounds 3] [--small] [--json F]

Builds a Llama-architecture model of about 110M parameters with RANDOM weights (the speed and memory of
an architecture do not depend on its weights; no real model of this size is available here), saves it as
an hf-safetensors folder, then makes the CPU artifacts the platform produces from it, with its own code:

- pytorch-int8_dynamic: the quantizer's int8_dynamic method (torch dynamic-int8 Linear layers);
- onnx-fp32, onnx-fp16, onnx-int8, onnx-int8-static, ort-int8: the exporter's `onnx`, `onnx-fp16`,
  `onnx-int8` (dynamic, per channel), `onnx-int8-static` (QDQ, min-max calibration on 16 x 128 tokens of
  tinystories_train.txt) and `ort` (int8, ONNX Runtime Mobile's format) formats: ONNX decoders with past
  key/values, fused by ONNX Runtime's transformer optimizer, run by OnnxCausalLM (a `triton` export serves
  the same graph as its variant, so it has no row of its own; `executorch` and `coreml` run on phones);
- gguf-q8_0, gguf-q4_0: the exporter's `gguf` format, types Q8_0 and Q4_0 (Q4_0 keeps the tied
  embedding/output matrix in Q8_0, as llama-quantize does), run in llama.cpp by LlamaCppCausalLM (the
  benchmarker's gguf runtime; its own KV cache); skipped, saying so, where llama-cpp-python is missing.

Each is timed with the benchmarker's own decode-latency code (greedy, batch 1, EOS ignored, KV cache,
median), with the same prompt and thread count (torch intra-op threads = ONNX Runtime intra-op threads =
llama.cpp threads), all loaded in this process and timed in interleaved rounds (every artifact once per
round, a warm-up run each in the first), so that drift on a shared machine hits them alike; the figure is
the median of the rounds. Verification of the int8 and GGUF exports is relaxed here (top-1 and greedy
agreement not enforced): with random weights the logits are nearly flat, so the agreement the exporter asks
of real models means nothing; the float32 export is still checked at 1e-3, the GGUF ones at their types'
logit bounds. Writes a Markdown table to stdout and, with --json, all results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples/models/stories260K"  # ids only matter for speed: a 512-token vocab suffices
CALIBRATION = REPO / "examples/data/tinystories_train.txt"
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
GGUF_TYPES = ("Q8_0", "Q4_0")  # the exporter's gguf types llama.cpp runs fast on CPU (gguf-py writes both)
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
    from tailor_exporter.registry import ExportJob, get_format
    from tailor_quantizer.methods.registry import QuantizeJob, get_method
    from tailor_runtime.progress import no_progress

    folders = {"pytorch-fp32": root / "fp32", "pytorch-int8_dynamic": root / "int8"}
    build(folders["pytorch-fp32"], arch)
    method = get_method("int8_dynamic")
    method.run(
        folders["pytorch-fp32"], folders["pytorch-int8_dynamic"], method.Config(), QuantizeJob(no_progress)
    )
    relaxed = {"min_top1_agreement": 0.0, "verify_batches": 2}
    exports = {
        "onnx-fp32": ("onnx", {"verify_batches": 2}),
        "onnx-fp16": ("onnx-fp16", relaxed),
        "onnx-int8": ("onnx-int8", relaxed),
        "ort-int8": ("ort", {**relaxed, "int8": True}),
        "onnx-int8-static": (
            "onnx-int8-static",
            {**relaxed, "calibration_samples": 16, "calibration_seq_len": 128},
        ),
    }
    for name, (variant, config) in exports.items():
        fmt = get_format(variant)
        folders[name] = root / name
        started = time.monotonic()
        job = ExportJob(no_progress, calibration_file=CALIBRATION)
        fmt.run(folders["pytorch-fp32"], folders[name], fmt.Config(**config), job)
        print(f"exported {name} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    from tailor_runtime.libraries import importable

    has_llama_cpp, why_not = importable("llama_cpp")
    if not has_llama_cpp:
        print(f"no GGUF rows: {why_not} (requirements-llamacpp.txt)", file=sys.stderr, flush=True)
        return folders
    gguf = get_format("gguf")
    for gguf_type in GGUF_TYPES:
        name = f"gguf-{gguf_type.lower()}"
        folders[name] = root / name
        started = time.monotonic()
        config = gguf.Config(
            type=gguf_type, min_top1_agreement=0.0, min_greedy_agreement=0.0, verify_batches=2
        )
        gguf.run(folders["pytorch-fp32"], folders[name], config, ExportJob(no_progress))
        print(f"exported {name} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    return folders


def measure(folders: dict[str, Path], threads: int, new_tokens: int, rounds: int) -> dict[str, dict]:
    """Decode figures of every artifact, timed in interleaved rounds; tokens/s is the median of rounds."""
    import statistics

    import torch

    from tailor_benchmarker.child import _load, peak_rss_mb
    from tailor_benchmarker.latency import decode_latency
    from tailor_runtime.ml.model_io import folder_size_bytes

    torch.set_num_threads(threads)
    loaded = {name: _load(folder, threads) for name, folder in folders.items()}
    runs: dict[str, list[dict]] = {name: [] for name in folders}
    for round_ in range(rounds):
        for name, (model, tokenizer, _) in loaded.items():
            warmup = 1 if round_ == 0 else 0
            runs[name].append(
                decode_latency(model, tokenizer, PROMPT, new_tokens=new_tokens, warmup=warmup, repetitions=1)
            )
        rates = ", ".join(f"{n} {r[-1]['tokens_per_s']:.1f}" for n, r in runs.items())
        print(f"round {round_ + 1}/{rounds}: {rates} tokens/s", file=sys.stderr, flush=True)
    results = {}
    for name, (_, _, info) in loaded.items():
        lat = runs[name]
        results[name] = {
            "runtime": info["runtime"],
            "kv_cache": all(r["kv_cache"] for r in lat),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in lat),
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in lat],
            "ttft_ms": statistics.median(r["ttft_ms"]["median"] for r in lat),
            "per_token_ms_p95": statistics.median(r["per_token_ms"]["p95"] for r in lat),
            "size_mb": folder_size_bytes(folders[name]) / 2**20,
            "weight_mb": info["weight_bytes"] / 2**20,
            "prompt_tokens": lat[0]["prompt_tokens"],
            "sample_equals_fp32": lat[0]["sample"] == runs["pytorch-fp32"][0]["sample"],
        }
    results["pytorch-fp32"]["peak_rss_mb_all_loaded"] = peak_rss_mb()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median)")
    parser.add_argument("--small", action="store_true", help="a ~10M model, to try the script quickly")
    parser.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = parser.parse_args(argv)

    from tailor_runtime.hardware import cpu_model

    arch = SMALL if args.small else ARCH
    with tempfile.TemporaryDirectory(prefix="tailor-cpu-speed-") as tmp:
        folders = make_artifacts(Path(tmp), arch)
        results = measure(folders, args.threads, args.new_tokens, args.rounds)

    base = results["pytorch-fp32"]["tokens_per_s"]
    versions = {}
    for n in ("torch", "transformers", "onnxruntime", "onnx", "llama-cpp-python"):
        try:
            versions[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            versions[n] = None
    print(f"model: Llama, {parameter_count(arch) / 1e6:.1f}M parameters, RANDOM weights, {arch}")
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, load average "
          f"{os.getloadavg()[0]:.1f}; threads {args.threads}; {versions}")  # fmt: skip
    print(f"decode: batch 1, prompt {results['pytorch-fp32']['prompt_tokens']} tokens, {args.new_tokens} new, "
          f"{args.rounds} interleaved rounds after a warm-up, median")  # fmt: skip
    print()
    print(
        "| artifact | runtime | KV cache | size MB | decode tokens/s | vs PyTorch FP32 | TTFT ms | p95 ms/token |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['runtime']} | {'yes' if r['kv_cache'] else 'no'} | {r['size_mb']:.1f} | "
            f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / base:.2f}x | {r['ttft_ms']:.1f} | "
            f"{r['per_token_ms_p95']:.1f} |"
        )
    if args.json:
        data = {"arch": arch, "threads": args.threads, "load_average": os.getloadavg(), "results": results}
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
