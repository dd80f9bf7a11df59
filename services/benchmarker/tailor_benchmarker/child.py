"""Measure one model in a process of its own:

    python -m tailor_benchmarker.child --model DIR --eval FILE --config JSON --out RESULT.json

A process per model makes its peak RSS that model's alone, and lets the worker kill it on cancel or
survive it crashing. Progress goes to stdout as lines `@progress {"percent": .., "phase": .., "message": ..}`
(anything else printed there is ignored). The result, or `{"error": {...}}`, is written to --out
atomically; the exit status is 0 only with a result.

Runtimes: an ONNX folder runs in ONNX Runtime, a `gguf` folder in llama.cpp (llama-cpp-python,
`tailor_runtime.ml.llama_cpp_model`: the folder's tokenizer ids fed to llama.cpp, its context sized for
this benchmark's longest sequence), every other format in PyTorch. PyTorch formats that run on a GPU
(formats.GPU_FORMATS) run on the worker's CUDA GPU when it has one (config `device`), where decode timing
uses a static KV cache and a compiled, CUDA-graphed step (`tailor_runtime.ml.fast_decode`), and a
4-bit compressed-tensors model runs as packed 4-bit layers with Tailor's Triton GEMV kernel.

Memory: `baseline_rss_mb` is the process after importing torch and transformers (and onnxruntime for
an ONNX folder, llama_cpp for a gguf one), before the model; `peak_rss_mb` is VmHWM, reset when the child
starts (ru_maxrss would carry the worker's own peak across fork and exec), the most the process held
before it loaded the reference model (with --reference, for agreement, which is measured last);
`model_memory_mb` counts weight bytes (parameters, buffers, packed int8 weights, 4-bit block scales; for
ONNX the graph's initializers; for GGUF llama.cpp's tensors). On a GPU, `gpu_allocated_after_load_mb` and
`gpu_peak_allocated_mb` are torch's allocator figures (tensors, CUDA-graph pools included), read at the
same points. All sizes are MiB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tailor_benchmarker.config import BenchmarkConfig
from tailor_runtime.errors import TailorError
from tailor_runtime.ml.model_io import read_format

PROGRESS_PREFIX = "@progress "
# A line every HEARTBEAT_S from a thread of its own: a stopped (SIGSTOP) or frozen child goes silent,
# and the parent (run.py) kills it after its stall timeout and tries once more.
HEARTBEAT = "@heartbeat"
HEARTBEAT_S = 2.0
ONNX_FORMATS = ("onnx", "ort", "triton-repository")  # run by ONNX Runtime (tailor_runtime.ml.onnx.session)
GGUF_FORMAT = "gguf"  # run by llama.cpp (tailor_runtime.ml.llama_cpp_model)
# llama.cpp's own tokenizer is checked against the folder's on this text (recorded, not enforced).
VOCAB_SAMPLE = 'Once upon a time, there was a little girl named Lily. She said: "Look, 3 red birds!"'


def _heartbeat() -> None:
    while True:
        print(HEARTBEAT, flush=True)
        time.sleep(HEARTBEAT_S)


def report(percent: float, phase: str, message: str = "") -> None:
    print(PROGRESS_PREFIX + json.dumps({"percent": percent, "phase": phase, "message": message}), flush=True)


def current_rss_mb() -> float:
    """Resident set size now, from /proc (Linux): what the process holds, not what it ever held."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Start this process's peak RSS (VmHWM) from what it holds now. ru_maxrss cannot be used: Linux
    keeps it across fork and exec, so a child of a worker holding 600 MB reports at least 600 MB (every
    small model's peak read 481.8 MB); VmHWM is reset by writing 5 to clear_refs (Linux 4.0+)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The most this process has held since reset_peak_rss (VmHWM); ru_maxrss where /proc has no VmHWM."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def torch_weight_bytes(model: Any) -> int:
    """Bytes of parameters and buffers, including weights that quantized modules keep outside them."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        # torch.ao dynamic-quantized Linear packs its int8 weight where parameters() does not see it.
        packed = getattr(module, "_packed_params", None)
        if packed is not None and callable(getattr(module, "weight", None)):
            weight, bias = module.weight(), module.bias()
            total += weight.numel() * weight.element_size()
            total += 0 if bias is None else bias.numel() * bias.element_size()
    for param in model.parameters():
        # bitsandbytes 4-bit weights keep their per-block scales in a quant_state.
        absmax = getattr(getattr(param, "quant_state", None), "absmax", None)
        if absmax is not None:
            total += absmax.numel() * absmax.element_size()
    return total


def _declared_format(model_dir: Path) -> str | None:
    """The folder's declared format, or None; loading reports a missing or broken marker properly."""
    try:
        return read_format(model_dir)["format"]
    except TailorError:
        return None


def resolve_device(requested: str, declared: str | None) -> str:
    """Where a folder of format `declared` is measured ("cpu" or "cuda") when the config's device is
    `requested` ("auto", "cpu" or "cuda"); FailedPrecondition, saying why, when "cuda" cannot be."""
    import torch

    from tailor_runtime.errors import FailedPrecondition
    from tailor_runtime.ml.formats import GPU_FORMATS

    gpu_format = declared in GPU_FORMATS
    if requested == "cpu" or (requested == "auto" and not (gpu_format and torch.cuda.is_available())):
        return "cpu"
    if not torch.cuda.is_available():
        raise FailedPrecondition(
            "device 'cuda' was asked for, but this worker has no CUDA GPU (torch.cuda.is_available() is "
            "False); use device 'auto' or 'cpu', or send the benchmark to a GPU worker"
        )
    if not gpu_format:
        raise FailedPrecondition(
            f"a {declared!r} model runs on CPU only in Tailor (on a GPU: {', '.join(sorted(GPU_FORMATS))}); "
            "use device 'auto' or 'cpu'"
        )
    return "cuda"


def gpu_info() -> dict[str, Any]:
    """The CUDA device the child measures on."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_total_mb": props.total_memory / 2**20,
        "cuda": torch.version.cuda,
    }


def _load(
    model_dir: Path, threads: int | None, llama_cpp: dict[str, int] | None = None, device: str = "cpu"
) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info) for any format load_causal_lm reads (ONNX ones run in ONNX Runtime, GGUF in
    llama.cpp, opened with the context sizes `llama_cpp` gives, see `llama_cpp_sizes`), on `device`."""
    import torch

    from tailor_runtime.ml.model_io import load_causal_lm

    declared = _declared_format(model_dir)
    if threads:
        torch.set_num_threads(threads)  # ONNX Runtime and llama.cpp take torch's thread count too
    if declared == GGUF_FORMAT:
        return _load_llama_cpp(model_dir, threads, llama_cpp or {})
    model, tokenizer = load_causal_lm(model_dir, device=device)
    if declared in ONNX_FORMATS:
        info = {
            "format": declared,
            "runtime": "onnxruntime",
            "ort_intra_op_threads": model.threads,
        }
        return model, tokenizer, {**info, "weight_bytes": model.weight_bytes()}
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    info = {"format": declared, "runtime": "torch", "dtype": dtype, "device": device}
    if hasattr(model, "tailor_packed_int4"):  # a compressed-tensors model on a GPU
        info["packed_int4"] = model.tailor_packed_int4
    return model, tokenizer, {**info, "weight_bytes": torch_weight_bytes(model)}


def _load_llama_cpp(model_dir: Path, threads: int | None, sizes: dict[str, int]) -> tuple[Any, Any, dict]:
    from tailor_runtime.ml.llama_cpp_model import LlamaCppCausalLM
    from tailor_runtime.ml.model_io import load_tokenizer

    tokenizer = load_tokenizer(model_dir)  # the source's, copied beside the GGUF: its ids go to llama.cpp
    model = LlamaCppCausalLM(model_dir, threads=threads, **sizes)
    vocab = model.check_vocab(tokenizer, sample=VOCAB_SAMPLE)
    info = {"format": GGUF_FORMAT, **model.info(), "vocab_check": vocab}
    return model, tokenizer, {**info, "weight_bytes": model.weight_bytes()}


def llama_cpp_sizes(model_dir: Path, cfg: BenchmarkConfig, choice_file: Path | None = None) -> dict[str, int]:
    """The llama.cpp context this benchmark needs: the longest sequence it evaluates at batch 1 (`n_ctx`,
    capped by the model at load), and the decode runs' length per row for the larger batches.

    llama.cpp allocates (and clears) its KV cache for the whole context when it opens it, where PyTorch and
    ONNX Runtime grow theirs with the sequence; opening the model's full context would put memory the
    measurement never uses into its peak RSS."""
    from tailor_benchmarker import tasks
    from tailor_runtime.ml.model_io import load_tokenizer
    from tailor_runtime.ml.perplexity import encode_eval_text

    tokenizer = load_tokenizer(model_dir)
    prompt = len(tokenizer(cfg.latency_prompt, add_special_tokens=True)["input_ids"])
    decode = prompt + cfg.latency_new_tokens
    needs = [cfg.context_length, decode]
    if cfg.generation_examples:
        needs.append(cfg.generation_prompt_tokens + 1 + cfg.generation_new_tokens)
    if choice_file is not None:
        for context, choices, _ in tasks.read_sst2(choice_file, cfg.choice_max_examples):
            needs += [
                len(encode_eval_text(tokenizer, context + choice, 10**9, split_documents=False)[0])
                for choice in choices
            ]
    return {"n_ctx": max(needs), "max_batch": max(cfg.batch_sizes), "batch_n_ctx": decode}


def measure(
    model_dir: Path,
    eval_file: Path,
    cfg: BenchmarkConfig,
    reference_dir: Path | None = None,
    choice_file: Path | None = None,
) -> dict[str, Any]:
    import torch

    from tailor_benchmarker.latency import decode_latency
    from tailor_runtime.errors import InvalidArgument
    from tailor_runtime.ml.perplexity import perplexity

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    declared = _declared_format(model_dir)
    device = resolve_device(cfg.device, declared)
    on_gpu = device == "cuda"
    static_cache = on_gpu if cfg.static_cache is None else cfg.static_cache
    if static_cache and declared in (*ONNX_FORMATS, GGUF_FORMAT):  # refused before any loading
        runtime = "llama.cpp" if declared == GGUF_FORMAT else "ONNX Runtime"
        raise InvalidArgument(
            f"static_cache applies to PyTorch models; this {declared!r} model runs in {runtime}, "
            "which keeps its own cache: leave static_cache unset"
        )
    compile_step = static_cache and (on_gpu if cfg.compile is None else cfg.compile)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    baseline = current_rss_mb()
    report(2, "loading", f"loading {model_dir.name} ({device})")
    sizes = llama_cpp_sizes(model_dir, cfg, choice_file) if declared == GGUF_FORMAT else None
    model, tokenizer, info = _load(model_dir, cfg.threads, sizes, device)
    after_load = current_rss_mb()
    gpu_after_load = torch.cuda.memory_allocated() / 2**20 if on_gpu else None

    report(10, "perplexity", "tokenizing")
    text = eval_file.read_text(encoding="utf-8")
    ppl = perplexity(
        model,
        tokenizer,
        text,
        context_length=cfg.context_length,
        stride=cfg.stride,
        max_tokens=cfg.max_eval_tokens,
        split_documents=cfg.split_documents,
        on_window=lambda done, total: report(10 + 40 * done / total, "perplexity", f"window {done}/{total}"),
    )
    report(50, "latency", f"perplexity {ppl['perplexity']:.3f}")
    lat = decode_latency(
        model,
        tokenizer,
        prompt=cfg.latency_prompt,
        new_tokens=cfg.latency_new_tokens,
        warmup=cfg.warmup,
        repetitions=cfg.repetitions,
        batch_sizes=cfg.batch_sizes,
        on_run=lambda done, total: report(50 + 25 * done / total, "latency", f"run {done}/{total}"),
        static_cache=static_cache,
        compile=compile_step,
    )
    result: dict[str, Any] = {"perplexity": ppl, "latency": lat}
    result.update(_tasks(model, tokenizer, text, cfg, choice_file))
    # Memory is read before the reference model is loaded: the figures are the measured model's alone.
    peak = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    if reference_dir is not None:
        report(90, "agreement", f"loading the reference {reference_dir.name}")
        result["agreement"] = _agreement(model, tokenizer, reference_dir, text, cfg, device)
    threads = {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads()}
    if "llama_cpp_threads" in info:
        threads["llama_cpp"] = info["llama_cpp_threads"]
    return {
        "model": info,
        "model_memory_mb": info.pop("weight_bytes") / 2**20,
        "memory": {
            "baseline_rss_mb": baseline,  # the process after imports, before the model
            "rss_after_load_mb": after_load,
            "peak_rss_mb": peak,
            "peak_rss_over_baseline_mb": peak - baseline,
            **(
                {"gpu_allocated_after_load_mb": gpu_after_load, "gpu_peak_allocated_mb": gpu_peak}
                if on_gpu
                else {}
            ),
        },
        **result,
        "threads": threads,
        "gpu": gpu_info() if on_gpu else None,
    }


def _tasks(
    model: Any, tokenizer: Any, text: str, cfg: BenchmarkConfig, choice_file: Path | None
) -> dict[str, Any]:
    """The optional task metrics: multiple choice (with choice data) and generation (when asked for)."""
    from tailor_benchmarker import tasks

    result: dict[str, Any] = {}
    if choice_file is not None:
        examples = tasks.read_sst2(choice_file, cfg.choice_max_examples)
        result["multiple_choice"] = tasks.multiple_choice(
            model,
            tokenizer,
            examples,
            on_example=lambda d, t: report(75 + 8 * d / t, "multiple choice", f"example {d}/{t}"),
        )
    if cfg.generation_examples:
        result["generation"] = tasks.generation(
            model,
            tokenizer,
            text,
            cfg.generation_examples,
            cfg.generation_prompt_tokens,
            cfg.generation_new_tokens,
            on_example=lambda d, t: report(83 + 7 * d / t, "generation", f"example {d}/{t}"),
        )
    return result


def _agreement(
    model: Any, tokenizer: Any, reference_dir: Path, text: str, cfg: BenchmarkConfig, device: str
) -> dict:
    from tailor_runtime.ml.agreement import agreement

    # A gguf reference runs in llama.cpp too, opened for the agreement windows. The reference goes where
    # the model went when it can (each computes its own logits; both are compared on the CPU).
    ref_device = resolve_device("auto", _declared_format(reference_dir)) if device == "cuda" else "cpu"
    reference, _, ref_info = _load(reference_dir, cfg.threads, {"n_ctx": cfg.context_length}, ref_device)
    result = agreement(
        model,
        reference,
        tokenizer,
        text,
        context_length=cfg.context_length,
        stride=cfg.stride,
        max_tokens=cfg.agreement_max_tokens,
        split_documents=cfg.split_documents,
        on_window=lambda done, total: report(90 + 9 * done / total, "agreement", f"window {done}/{total}"),
    )
    return {**result, "reference": {"folder": reference_dir.name, **ref_info}}


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the worker that started it dies, so no benchmark is orphaned."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux/glibc: the parent still kills the child on cancel and on its own errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tailor_benchmarker.child", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--eval", type=Path, required=True, help="UTF-8 evaluation text")
    parser.add_argument("--config", required=True, help="BenchmarkConfig as JSON")
    parser.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    parser.add_argument("--reference", type=Path, default=None, help="parent model folder (agreement)")
    parser.add_argument("--choices", type=Path, default=None, help="multiple-choice TSV (SST-2 format)")
    args = parser.parse_args(argv)
    reset_peak_rss()  # the peak is this measurement's, not the worker's that started it
    _die_with_parent()
    threading.Thread(target=_heartbeat, name="heartbeat", daemon=True).start()

    # Imported before the baseline RSS is read, so the baseline holds the frameworks, not the model.
    import torch  # noqa: F401
    import transformers  # noqa: F401

    declared = {_declared_format(args.model), args.reference and _declared_format(args.reference)}
    if declared & set(ONNX_FORMATS):
        import onnxruntime  # noqa: F401
    if GGUF_FORMAT in declared:
        from tailor_runtime.libraries import importable

        importable("llama_cpp")  # imports it where it loads; loading the model says why where it does not

    try:
        cfg = BenchmarkConfig.model_validate_json(args.config)
        result = measure(args.model, args.eval, cfg, args.reference, args.choices)
    except Exception as exc:  # reported to the parent as data; the traceback goes to stderr for logs
        traceback.print_exc()
        from tailor_runtime.errors import TailorError

        message = exc.message if isinstance(exc, TailorError) else str(exc) or repr(exc)
        _write_atomically(args.out, {"error": {"type": type(exc).__name__, "message": message}})
        print(f"error: {type(exc).__name__}: {message}", file=sys.stderr, flush=True)
        return 1
    _write_atomically(args.out, result)
    report(100, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
