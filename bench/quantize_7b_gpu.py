"""Time and peak GPU memory to quantize a Llama-2-7B-sized model with each GPU method.

Model: the Llama-2-7B architecture (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000)
with RANDOM weights, bf16, saved as a Tailor hf-safetensors folder: speed and memory only, its quality
means nothing. Calibration: 128 sequences x 512 tokens of real text (examples/data/tinystories_train.txt
tokenized with the stories260K tokenizer; its ids are < 512, inside the 32000-token vocabulary).

Each method runs in its own subprocess, so that torch.cuda.max_memory_allocated() is that method's peak
(and a crash or an out-of-memory stops only that row):
  gptq          Tailor's method run(): 4-bit, group 128 (load, checks, llm-compressor, save)
  gptq_direct   the same GPTQ recipe through llm-compressor's oneshot() directly, loaded and saved the
                way its examples do: the difference with `gptq` is the platform's overhead
  rtn, awq, smoothquant, fp8, int8_weight_only, auto   Tailor's methods (group 128 where it applies)
  nf4           bitsandbytes NF4 (tailor_quantizer.methods.bnb)
Times are wall-clock seconds of the whole call (loading the 13.5 GB folder and saving the output
included); peak GPU memory is what PyTorch allocated; peak RSS is the child's resident memory.

Usage (device machine, one H100):
  python3 bench/quantize_7b_gpu.py --json $OUT/quantize_7b.json            # every method
  python3 bench/quantize_7b_gpu.py --methods gptq,gptq_direct --model-dir /tmp/llama7b
  python3 bench/quantize_7b_gpu.py --small          # tiny config: a smoke test (on the CPU where no GPU)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("runtime", "services/quantizer", "gen"):
    sys.path.insert(0, str(ROOT / sub))
TOKENIZER = ROOT / "examples" / "models" / "stories260K"
TRAIN = ROOT / "examples" / "data" / "tinystories_train.txt"

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
SMALL = {
    **LLAMA2_7B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
METHODS = ("gptq", "gptq_direct", "rtn", "awq", "smoothquant", "fp8", "int8_weight_only", "auto", "nf4")
# Tailor method configs; group size 128 divides 4096 and 11008 (and the small config's 256 and 512).
CONFIGS = {
    "gptq": {"bits": 4, "group_size": 128},
    "rtn": {"bits": 4, "group_size": 128},
    "awq": {"group_size": 128},
    "auto": {"group_size": 128},
}


def build_model(folder: Path, config: dict, device: str) -> None:
    """A random-weight Llama saved as a Tailor hf-safetensors folder in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tailor_runtime.ml.model_io import load_tokenizer, save_hf_model

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise directly in bf16: half the memory and time
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config))
    torch.set_default_dtype(torch.float32)
    save_hf_model(model, load_tokenizer(TOKENIZER), folder, dtype="bfloat16")
    (folder / "RANDOM_WEIGHTS.txt").write_text("Random weights: for speed and memory measurements only.\n")


def calibration(samples: int, seq_len: int):
    from tailor_runtime.ml.calibration import build_calibration_set, read_documents
    from tailor_runtime.ml.model_io import load_tokenizer

    return build_calibration_set(load_tokenizer(TOKENIZER), read_documents(TRAIN), samples, seq_len, seed=0)


def run_direct(model_dir: Path, out: Path, cal) -> None:
    """GPTQ W4A16 group 128 the way llm-compressor's own examples do it (no Tailor code in the path)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=0.01,
        actorder="static",
    )
    ones = [1] * cal.seq_len
    dataset = Dataset.from_dict({"input_ids": cal.sequences, "attention_mask": [ones] * len(cal.sequences)})
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(cal.sequences),
        max_seq_length=cal.seq_len,
        shuffle_calibration_samples=False,
        batch_size=max(1, 4096 // cal.seq_len),  # what Tailor's adapter uses, so only the overhead differs
    )
    model.save_pretrained(out, save_compressed=True)


def child(method: str, model_dir: Path, samples: int, seq_len: int, result: Path) -> None:
    """Run one method and write {seconds, peak_gpu_bytes, ...} to `result`."""
    import torch

    from tailor_quantizer.methods import QuantizeJob, get_method, parse_config
    from tailor_runtime.ml.model_io import folder_size_bytes
    from tailor_runtime.progress import no_progress

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cal = calibration(samples, seq_len)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix=f"q7b-{method}-") as out:
        start = time.perf_counter()
        if method == "gptq_direct":
            run_direct(model_dir, Path(out), cal)
        else:
            m = get_method(method)
            ok, why = m.availability()
            if not ok:
                raise RuntimeError(f"unavailable: {why}")
            data = cal if m.caps.needs_calibration else None
            m.run(
                model_dir,
                Path(out),
                parse_config(m, CONFIGS.get(method, {})),
                QuantizeJob(no_progress, calibration=data, device=device),
            )
        seconds = time.perf_counter() - start
        size = folder_size_bytes(Path(out))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    result.write_text(
        json.dumps(
            {
                "seconds": seconds,
                "peak_gpu_bytes": peak,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "output_bytes": size,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny random config: a smoke test of every path")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS)
    )
    parser.add_argument("--model-dir", type=Path, help="reuse (or build once into) this folder")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per method")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples, seq_len = (16, 64) if args.small else (128, 512)
    if args.child:
        child(args.child, args.model_dir, args.samples, args.seq_len, args.result)
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = SMALL if args.small else LLAMA2_7B
    scratch = tempfile.TemporaryDirectory(prefix="q7b-")
    model_dir = args.model_dir or Path(scratch.name) / "llama"
    if not (model_dir / "tailor_format.json").exists():
        start = time.perf_counter()
        build_model(model_dir, config, device)
        print(f"built the random-weight model in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        print(f"{method} ...", file=sys.stderr, flush=True)
        result = Path(scratch.name) / f"{method}.json"
        command = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--model-dir",
            str(model_dir),
            "--result",
            str(result),
            "--samples",
            str(samples),
            "--seq-len",
            str(seq_len),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode == 0 and result.exists():
                rows.append({"method": method, **json.loads(result.read_text())})
            else:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                rows.append({"method": method, "error": " / ".join(tail)[-400:]})
        except subprocess.TimeoutExpired:
            rows.append({"method": method, "error": f"timed out after {args.timeout} s"})
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)

    label = "tiny random Llama (--small)" if args.small else "Llama-2-7B architecture, RANDOM weights, bf16"
    print(f"{label}; calibration {samples} x {seq_len} tokens; {device}\n")
    print("| method | time | peak GPU memory | peak RSS | output size | note |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['method']} | | | | | failed: {row['error']} |")
        else:
            print(
                f"| {row['method']} | {row['seconds']:.1f} s | {row['peak_gpu_bytes'] / 2**30:.2f} GiB | "
                f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['output_bytes'] / 2**30:.3f} GiB | {row['device']} |"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"model": label, "samples": samples, "seq_len": seq_len, "rows": rows}, indent=2)
        )
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
