"""Batch-1 decode speed on a GPU against the memory-bandwidth ceiling measured in the same run.

Model: the Llama-2-7B architecture (published config) with RANDOM weights: speed and memory only, no
quality meaning. Paths, all greedy, batch 1, same prompt:
  hf_generate_bf16   plain Hugging Face `generate` (dynamic cache): the baseline
  static_bf16        Tailor's decoder (runtime/tailor_runtime/ml/fast_decode.py): static KV cache, the
                     decode step compiled with CUDA graphs
  static_int4_tinygemm   the same decoder on int4 weight-only weights (torchao Int4WeightOnlyConfig,
                         group size 128, tinygemm kernels)
  static_int4_gemlite    4-bit weights bit-packed (torchao UIntxWeightOnlyConfig, group size 128),
                         multiplied by gemlite's Triton kernels (fp16 activations, which gemlite needs)
  static_int4_packed     Tailor's packed 4-bit layers (runtime/tailor_runtime/ml/packed_int4.py, group
                         128, symmetric): the batch-1 product compiles to one fused GEMV kernel; bf16 head
  static_int4_packed_head  the same with the output head packed too
  static_int4_packed_head_inductor  the same, the product as packed_int4's inductor reduction
On CUDA the packed layers' batch-1 product is the Triton kernel of runtime/tailor_runtime/ml/int4_gemv.py;
"gemv" first times it per 7B layer shape against bf16 F.linear and the inductor reduction.
Carried to the device as wheels/sources: torchao 0.18.0, gemlite 0.5.1.post1 (0.6 changed an API
torchao 0.18 calls).
Ceiling: device-to-device copy bandwidth (bytes read + written per second) / the model's weight bytes.

Usage (on the device machine, see bench/README or BENCHMARKS.md):
  python3 bench/gpu_decode.py --out $OUT/gpu_decode.json
  python3 bench/gpu_decode.py --tiny --device cpu          # a smoke test of the code paths on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

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
TINY = {
    **LLAMA2_7B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
}


def copy_bandwidth(device, gib: float = 2.0, reps: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    import torch

    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    del src, dst
    return 2 * n * reps / seconds


def build_model(shape: dict, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def weight_bytes(model) -> int:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    total = sum(b.numel() * b.element_size() for b in model.buffers())  # packed int4 weights are buffers
    for p in model.parameters():
        if is_traceable_wrapper_subclass(p):
            # Quantized tensor subclasses: count their inner (packed) tensors.
            names, _ = p.__tensor_flatten__()
            total += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
        else:
            total += p.numel() * p.element_size()
    return total


def summarize(name: str, per_run: list[float], wbytes: int, ceiling_bw: float, extra=None) -> dict:
    tps = statistics.median(per_run)
    ceiling = ceiling_bw / wbytes
    return {
        "path": name,
        "tokens_per_s_median": tps,
        "tokens_per_s_runs": per_run,
        "weight_gb": wbytes / 1e9,
        "ceiling_tokens_per_s": ceiling,
        "fraction_of_bf16_ceiling": None,
        **(extra or {}),
    }


def time_hf_generate(model, prompt, new_tokens, reps) -> tuple[list[float], list[int]]:
    import torch

    runs, out = [], None
    for i in range(reps + 1):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert out.shape[1] == prompt.shape[1] + new_tokens
        if i:  # the first run is the warm-up
            runs.append(new_tokens / dt)
    return runs, out[0, prompt.shape[1] :].tolist()


def teacher_forced_agreement(model, prompt, tokens: list[int]) -> float:
    """Share of the decoder's tokens that are the argmax of one plain eager forward over the same
    sequence. Free-running greedy sequences of a random-weight model diverge at the first near-tie, so
    this is the check that the fast path computes what the model computes."""
    import torch

    seq = torch.cat([prompt, torch.tensor([tokens], device=prompt.device)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=seq, use_cache=False).logits[0]
    predicted = logits[prompt.shape[1] - 1 : -1].argmax(-1).tolist()
    return sum(a == b for a, b in zip(predicted, tokens, strict=True)) / len(tokens)


COMPILE_MODE = "reduce-overhead"


def time_static(model, prompt, new_tokens, reps, compile_step: bool) -> tuple[list[float], float, list[int]]:
    from tailor_runtime.ml.fast_decode import StaticDecoder

    decoder = StaticDecoder(
        model, max_len=prompt.shape[1] + new_tokens + 8, compile=compile_step, mode=COMPILE_MODE
    )
    t0 = time.perf_counter()
    for _ in range(2):  # compile + CUDA graph capture happen in the first runs
        decoder.generate(prompt, new_tokens)
    warmup_s = time.perf_counter() - t0
    runs, tokens = [], []
    for _ in range(reps):
        tokens, timing = decoder.generate(prompt, new_tokens)
        runs.append(timing.tokens_per_s)
    return runs, warmup_s, tokens


GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]  # q/k/v/o, gate/up, down, head


def gemv_bandwidth(device, shapes=GEMV_SHAPES, reps: int = 20) -> list[dict]:
    """Per 7B layer shape, the batch-1 product's GPU time and weight bytes read per second: bf16
    F.linear, the packed 4-bit Triton kernel (int4_gemv) and packed_int4's compiled inductor reduction.

    Timed as a decode step runs them: launched from a CUDA graph (no Python or launch overhead), over
    enough copies of the layer (at least 512 MB) that the weights come from HBM, not the 50 MB L2."""
    import math

    import torch

    from tailor_runtime.ml.packed_int4 import PackedInt4Linear, reduction_gemv

    def graph_time(calls) -> float:
        """GPU seconds per call of `calls` (a list of thunks), replayed from one CUDA graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compilation and autotuning happen here, not in capture
            for _ in range(3):
                for call in calls:
                    call()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / reps / len(calls)

    reduce = torch.compile(reduction_gemv)

    def one_shape(n: int, k: int) -> dict:
        torch.manual_seed(0)
        copies = math.ceil(512e6 / (n * k * 2))
        x = torch.randn(k, device=device, dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        row: dict = {"shape": [n, k], "copies": copies}
        bf16 = [lambda w=w: torch.nn.functional.linear(x, w) for w in weights]
        row["bf16_linear"] = (graph_time(bf16), n * k * 2)
        for kernel in ("triton", "inductor"):
            layers = []
            for w in weights:
                linear = torch.nn.Linear(k, n, bias=False, device="meta")
                linear.weight = torch.nn.Parameter(w, requires_grad=False)
                layers.append(PackedInt4Linear.from_linear(linear, 128, kernel))
            if kernel == "triton":
                calls = [lambda layer=layer: layer(x) for layer in layers]
            else:
                calls = [lambda layer=layer: reduce(layer.packed, layer.scales, x, 128) for layer in layers]
            nbytes = layers[0].packed.numel() + layers[0].scales.numel() * 2
            row[f"int4_{kernel}"] = (graph_time(calls), nbytes)
            del layers
        for name in ("bf16_linear", "int4_triton", "int4_inductor"):
            seconds, nbytes = row[name]
            row[name] = {"us": seconds * 1e6, "weight_gb_per_s": nbytes / seconds / 1e9}
        print(json.dumps(row), flush=True)
        return row

    return [one_shape(n, k) for n, k in shapes]


def _int4_tinygemm(model) -> None:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))


def _int4_gemlite(model) -> None:
    """4-bit weights bit-packed, group size 128, through gemlite's Triton GEMV kernels (torchao API)."""
    from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig
    from torchao.quantization import quantize_

    quantize_(model, UIntxWeightOnlyConfig(group_size=128, bit_width=4))


def _int4_packed(model) -> None:
    """Tailor's own packed 4-bit layers (group 128), whose batch-1 product compiles to one fused GEMV;
    the output head stays bf16."""
    from tailor_runtime.ml.packed_int4 import pack_linear_layers

    pack_linear_layers(model, group_size=128)


def _int4_packed_with_head(model) -> None:
    from tailor_runtime.ml.packed_int4 import pack_linear_layers

    pack_linear_layers(model, group_size=128, skip=())


def _int4_packed_with_head_inductor(model) -> None:
    """The same, with the batch-1 product as the compiled inductor reduction instead of the Triton kernel."""
    from tailor_runtime.ml.packed_int4 import pack_linear_layers

    pack_linear_layers(model, group_size=128, skip=(), kernel="inductor")


# name -> (quantize function, activation dtype). gemlite's kernels take fp16 activations.
INT4_PATHS = {
    "static_int4_tinygemm": (_int4_tinygemm, "bfloat16"),
    "static_int4_gemlite": (_int4_gemlite, "float16"),
    "static_int4_packed": (_int4_packed, "bfloat16"),
    "static_int4_packed_head": (_int4_packed_with_head, "bfloat16"),
    "static_int4_packed_head_inductor": (_int4_packed_with_head_inductor, "bfloat16"),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small model (smoke test)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip", default="", help="comma-separated paths to skip")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode of the decode step")
    args = parser.parse_args()

    import torch
    import transformers

    global COMPILE_MODE
    COMPILE_MODE = args.mode
    device = torch.device(args.device)
    # As gpt-fast does: better Triton configs for the small-batch GEMVs of decoding.
    torch._inductor.config.coordinate_descent_tuning = True
    torch._inductor.config.fx_graph_cache = True
    skip = set(filter(None, args.skip.split(",")))
    result = {
        "model": "Llama-2-7B architecture, RANDOM weights (speed and memory only)"
        if not args.tiny
        else "tiny",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "new_tokens": args.new_tokens,
        "reps": args.reps,
        "paths": [],
    }
    bw = copy_bandwidth(device, gib=2.0 if device.type == "cuda" else 0.1)
    result["copy_bandwidth_gb_s"] = bw / 1e9
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + written)", flush=True)

    if device.type == "cuda" and "gemv" not in skip:
        result["gemv"] = gemv_bandwidth(device)

    model = build_model(TINY if args.tiny else LLAMA2_7B, device, torch.bfloat16)
    bf16_bytes = weight_bytes(model)
    bf16_ceiling = bw / bf16_bytes
    result["bf16_weight_gb"] = bf16_bytes / 1e9
    result["bf16_ceiling_tokens_per_s"] = bf16_ceiling
    print(f"bf16 weights {bf16_bytes / 1e9:.2f} GB -> ceiling {bf16_ceiling:.1f} tokens/s", flush=True)
    prompt = torch.randint(
        3,
        model.config.vocab_size,
        (1, 16),
        device=device,
        generator=torch.Generator(device=device).manual_seed(1),
    )

    def record(entry):
        entry["fraction_of_bf16_ceiling"] = entry["tokens_per_s_median"] / bf16_ceiling
        if device.type == "cuda":
            entry["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["paths"].append(entry)
        print(json.dumps(entry), flush=True)

    if "hf" not in skip:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs, hf_tokens = time_hf_generate(model, prompt, args.new_tokens, args.reps)
        record(summarize("hf_generate_bf16", runs, bf16_bytes, bw))
    else:
        hf_tokens = None

    bf16_tokens = None
    if "static_bf16" not in skip:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs, warm, bf16_tokens = time_static(model, prompt, args.new_tokens, args.reps, not args.no_compile)
        tf = teacher_forced_agreement(model, prompt, bf16_tokens)
        same = (
            sum(a == b for a, b in zip(hf_tokens, bf16_tokens, strict=True)) / len(hf_tokens)
            if hf_tokens
            else None
        )
        record(
            summarize(
                "static_bf16",
                runs,
                bf16_bytes,
                bw,
                {
                    "compile_and_warmup_s": warm,
                    "greedy_tokens_agreeing_with_hf_generate": same,
                    "teacher_forced_top1_vs_eager": tf,
                },
            )
        )

    for name in [p for p in INT4_PATHS if p not in skip]:
        torch._dynamo.reset()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        quantize, activation_dtype = INT4_PATHS[name]
        model = build_model(TINY if args.tiny else LLAMA2_7B, device, getattr(torch, activation_dtype))
        try:
            t0 = time.perf_counter()
            quantize(model)
            quant_s = time.perf_counter() - t0
            int4_bytes = weight_bytes(model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs, warm, tokens = time_static(model, prompt, args.new_tokens, args.reps, not args.no_compile)
            extra = {
                "compile_and_warmup_s": warm,
                "quantize_s": quant_s,
                "teacher_forced_top1_vs_own_eager": teacher_forced_agreement(model, prompt, tokens),
                "activations": activation_dtype,
            }
            record(summarize(name, runs, int4_bytes, bw, extra))
        except Exception as exc:  # noqa: BLE001 - report the path as not run, with why
            message = f"{type(exc).__name__}: {exc}"[:500]
            result["paths"].append({"path": name, "error": message})
            print(f"{name} not run: {message}", flush=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    best_bf16 = max(
        (
            p["tokens_per_s_median"]
            for p in result["paths"]
            if p.get("path", "").endswith("bf16") and "tokens_per_s_median" in p
        ),
        default=0,
    )
    print(
        f"best bf16: {best_bf16:.1f} tokens/s = {best_bf16 / bf16_ceiling:.0%} of the {bf16_ceiling:.0f} "
        "tokens/s ceiling",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
