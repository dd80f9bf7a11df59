"""Peak accelerator memory, peak host memory, disk and a rough time for one stage on one machine.

Every term is bytes, counted from what the stage's code holds at its peak (the comments name the code).
Memory figures are GiB (2**30), as `HardwareProfile.memory_gb` reports them. Times are rough: FLOPs or
bytes moved divided by the machine's figures and a fixed efficiency (docs/planning.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml import architectures
from tailor_runtime.planner.shape import ModelShape

GIB = 2**30
# Defaults of the stage configs (services/*/config classes), kept equal by tests/unit/test_planner.py.
LORA_DEFAULTS = {"r": 8, "batch_size": 8, "seq_len": 128, "steps": 30, "gradient_accumulation_steps": 1,
                 "gradient_checkpointing": False, "merge": True, "base_dtype": "auto", "dropout": 0.0,
                 "checkpoint_every": 25}  # fmt: skip
CALIBRATION_DEFAULTS = {"samples": 128, "seq_len": 512}  # tailor_runtime.ml.calibration
BENCHMARK_DEFAULTS = {"context_length": 256, "max_eval_tokens": 8192, "stride": 128, "batch_sizes": [1, 4],
                      "latency_new_tokens": 32, "warmup": 1, "repetitions": 3}  # fmt: skip
CALIBRATION_BATCH_TOKENS = 4096  # tailor_quantizer.llm_compressor.BATCH_TOKENS
# Rough throughput figures (said so wherever a time is shown): sustained fractions of peak.
CPU_GFLOPS_PER_CORE = 25.0  # fp32 matmul in torch on one AVX2/NEON core, sustained (rough)
GPU_EFFICIENCY = 0.35  # of the dense bf16 peak, for training and calibration (rough)
DISK_GBS = 0.5  # GB/s written or read sequentially (rough)
# Measured, not counted (docs/planning.md): a CPU stage's working set beyond its tensors (tokenizer,
# dataset, autograd and oneDNN buffers, allocator slack), the peak-RSS increase of LoRA on stories260K,
# whose weights are 1 MB.
CPU_STAGE_OVERHEAD = 56 * 2**20
QUANTIZE_OVERHEAD = 18 * 2**20  # the quantizer's method.run
BENCHMARK_OVERHEAD = 20 * 2**20  # the same for the benchmarker's child (no dataset, no autograd)
# Accelerators not in the targets catalogue (vendor datasheets): name fragment -> (bf16 TFLOPS, GB/s).
GPU_FIGURES = {"h200": (989.0, 4800.0), "h100": (989.0, 3350.0), "a100": (312.0, 2039.0),
               "l4": (121.0, 300.0), "t4": (65.0, 320.0)}  # fmt: skip
# Bytes per weight of quantized linear layers, storage included (scales per group of 128 in 16 bits).
WEIGHT_ONLY_BITS = {"rtn": 4, "gptq": 4, "awq": 4, "int8_weight_only": 8, "fp8": 8, "smoothquant": 8}
CALIBRATED = ("gptq", "awq", "smoothquant", "int8_static")
BNB_BYTES = {
    "nf4": 0.5 + 1 / 64 + 4 / (64 * 256),
    "fp4": 0.5 + 1 / 64 + 4 / (64 * 256),
    "llm_int8": 1 + 4 / 4096,
}
GGUF_BYTES = {"gguf_q8_0": 34 / 32, "gguf_q4_k_m": 4.85 / 8}  # llama.cpp's block sizes (Q4_K_M: mixed)


@dataclass(frozen=True)
class Machine:
    """A worker's hardware as its ListMethods reply reports it (`HardwareProfile`)."""

    name: str = ""
    memory_gb: float = 0.0  # host RAM, GiB
    cpu_cores: int = 1
    accelerator: str = ""
    accelerator_memory_gb: float = 0.0  # per GPU, GiB; 0: the stage runs on the CPU
    gpus: int = 1

    @property
    def on_gpu(self) -> bool:
        return self.accelerator_memory_gb > 0

    def gflops(self) -> float:
        if self.on_gpu:
            for fragment, (tflops, _) in GPU_FIGURES.items():
                if fragment in self.accelerator.lower():
                    return tflops * 1000 * GPU_EFFICIENCY
            return 100_000 * GPU_EFFICIENCY  # an unknown GPU: 100 TFLOPS assumed (rough)
        return CPU_GFLOPS_PER_CORE * max(1, self.cpu_cores)


@dataclass
class Estimate:
    stage: str
    kind: str
    method: str
    device: str  # "cuda" or "cpu": where the planner put the stage's work
    accelerator_bytes: int = 0  # peak on one GPU; 0 on a CPU plan
    host_bytes: int = 0
    disk_bytes: int = 0
    seconds: float = 0.0  # rough
    terms: dict[str, int] = field(default_factory=dict)  # the parts of the peak, by name
    notes: list[str] = field(default_factory=list)

    def gib(self, what: str) -> float:
        return getattr(self, f"{what}_bytes") / GIB


def _cfg(defaults: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in (given or {}).items() if v is not None}}


def lora_trainable(shape: ModelShape, r: int, targets: list[str] | None, dora: bool = False) -> int:
    """peft's LoRA: A (r x in) and B (out x r) per adapted linear; DoRA adds a magnitude per output row."""
    linears = shape.linears()
    names = targets or [t for t in _family_targets(shape) if t in linears]
    per_layer = sum(r * (i + o) + (o if dora else 0) for n in names for i, o in linears.get(n, []))
    return shape.layers * per_layer


def _family_targets(shape: ModelShape) -> tuple[str, ...]:
    try:
        return architectures.for_config({"model_type": shape.model_type}).lora_targets
    except InvalidArgument:  # a family the registry does not know: every linear projection
        return tuple(shape.linears())


def layer_activation_elements(shape: ModelShape, r: int = 0, adapted: int = 0) -> int:
    """Elements autograd keeps per token per decoder layer for a frozen base (modeling_llama.py's layer):
    the two RMSNorms' inputs and outputs (4h), rotated q and k and v (q + 2kv), SDPA's output (q), the
    gated MLP's gate, silu(gate), up and their product (4i; GPT-2: fc and gelu, 2i), and each adapter's
    r-wide A output. Frozen projections keep nothing for themselves (their input grad needs only W)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mlp = (4 if shape.gated else 2) * shape.intermediate
    return 4 * shape.hidden + 2 * q + 2 * kv + mlp + r * adapted


def plan_finetune(shape: ModelShape, method: str, config: Mapping[str, Any] | None, m: Machine) -> Estimate:
    """LoRA, DoRA, QLoRA (tailor_trainer.lora.finetune_lora) and QAT (qat.py, all weights trained)."""
    c = _cfg(LORA_DEFAULTS, config)
    on_gpu, P, s = m.on_gpu, shape.total_params, shape.dtype_bytes
    # base_dtype auto: bfloat16 on a GPU, float32 on the CPU (LoraTrainConfig.base_dtype).
    cb = {"float32": 4, "bfloat16": 2}.get(c["base_dtype"], 2 if on_gpu else 4)
    qlora = method == "qlora" or c.get("quantize_base") == "nf4"
    tokens = c["batch_size"] * c["seq_len"]  # one micro-batch: accumulation adds no activations
    t: dict[str, int] = {}
    if method == "qat":
        # qat.py: every weight trains in float32: weights, grads and AdamW's two moments, 16 B/param.
        t["weights + grads + AdamW (fp32)"] = 16 * P
        adapted, r, trainable = 0, 0, P
        act_per_token = layer_activation_elements(shape) + 2 * shape.hidden + shape.intermediate
    else:
        targets = c.get("target_modules")
        adapted = len([n for n in targets or _family_targets(shape) if n in shape.linears()])
        r, trainable = c["r"], lora_trainable(shape, c["r"], targets, method == "dora" or c.get("dora"))
        if qlora:  # bitsandbytes NF4 linears (double quantization), the rest in the compute dtype
            t["frozen base (NF4)"] = int(
                shape.linear_params * BNB_BYTES["nf4"] + (P - shape.linear_params) * cb
            )
        else:
            t["frozen base"] = P * cb
        # Adapters train in float32: weight, grad, AdamW exp_avg and exp_avg_sq (torch.optim.AdamW).
        t["adapters + grads + AdamW (fp32)"] = 16 * trainable
        act_per_token = layer_activation_elements(shape, r, adapted)
    if c["gradient_checkpointing"]:
        # Only each layer's input is kept; one layer's activations exist again while it is recomputed.
        t["activations (checkpointed)"] = tokens * (shape.layers * shape.hidden + act_per_token) * cb
    else:
        t["activations"] = tokens * shape.layers * act_per_token * cb
    # loop.batch_loss: float32 logits of the labelled positions, log_softmax's output and, in backward,
    # the gradient of each (3 x tokens x vocab x 4 B): the largest single activation at 32k vocabulary.
    t["logits + loss"] = 3 * tokens * shape.vocab * 4
    device_peak = sum(t.values())
    # Host: load_full_precision_base reads the whole model in its stored dtype first (also for QLoRA, to
    # find the targets and the tokenizer); the merge (merge=True) saves it as float32 (save_hf_model).
    load = P * s
    merge = P * 4 if c["merge"] else 0
    if qlora and c["merge"]:
        merge += P * s if s != 4 else 0  # merge_into_full_precision loads the base again, then casts
    est = Estimate("", "finetune", method, "cuda" if on_gpu else "cpu", terms=t)
    if on_gpu:
        est.accelerator_bytes = device_peak
        est.host_bytes = max(load, merge)
    else:
        # On the CPU the loaded model is the training model when the dtypes agree (Module.to casts
        # parameter by parameter); QLoRA's first full load is still referenced while the 4-bit one loads.
        first = load if (qlora or s != cb) else 0
        # Measured on 34-56M-parameter Llama/Qwen2 models: a CPU stage that runs forward passes peaks
        # about one weights' size above its counted tensors (not found where: the allocator's retained
        # temporaries are the guess); a weight-only quantizer, which runs none, does not. With this and
        # the fixed overhead the estimates are within 15% (tests/integration/test_plan_measured.py).
        t["forward working set (measured)"] = load
        t["process overhead (measured)"] = CPU_STAGE_OVERHEAD
        device_peak = sum(t.values())
        est.host_bytes = max(device_peak + first, merge + (t.get("frozen base (NF4)", 0) if qlora else 0))
    checkpoint = 4 * trainable * 4 if c["checkpoint_every"] else 0  # weights, 2 moments, best weights
    est.disk_bytes = load + 4 * trainable + merge + checkpoint  # input cached by the worker + outputs
    # FLOPs: forward 2 x params per token, backward w.r.t. inputs 2 x (frozen base; 4 x when all train),
    # +2 x when checkpointing recomputes the forward (Kaplan et al. 2020, 6N per token for full training).
    per_token = 2 * P * (3 if method == "qat" else 2) + (2 * P if c["gradient_checkpointing"] else 0)
    total_tokens = tokens * c["steps"] * c["gradient_accumulation_steps"]
    est.seconds = total_tokens * per_token / (m.gflops() * 1e9) + (load + merge) / (DISK_GBS * 1e9)
    est.notes.append("time rough: FLOPs / " + ("GPU bf16 peak x 0.35" if on_gpu else "25 GFLOP/s per core"))
    return est


def output_bytes(shape: ModelShape, method: str, config: Mapping[str, Any] | None, in_bytes: int) -> int:
    """Size of a quantized model on disk: its linear layers at the method's width (group scales in
    16 bits), everything else (embedding, head, norms) at the input's width."""
    P, lin = shape.total_params, shape.linear_params
    rest = (P - lin) * in_bytes
    c = dict(config or {})
    if method in ("bf16", "fp16"):
        return P * 2
    if method in BNB_BYTES:
        return int(lin * BNB_BYTES[method]) + rest
    if method in GGUF_BYTES:
        return int(P * GGUF_BYTES[method])
    if method in ("int8_dynamic", "int8_static"):
        return lin + rest
    bits = int(c.get("bits", WEIGHT_ONLY_BITS.get(method, 4)))
    group = int(c.get("group_size", 128))
    scales = (lin // group if group > 0 else shape.layers * shape.hidden * 8) * 2
    return lin * bits // 8 + scales + rest


def plan_quantize(
    shape: ModelShape,
    method: str,
    config: Mapping[str, Any] | None,
    calibration: Mapping[str, Any] | None,
    m: Machine,
    in_bytes: int | None = None,
) -> Estimate:
    """The quantizer's methods: weight-only ones hold the loaded model and the packed output; calibrated
    ones (gptq, awq, smoothquant) also hold the calibration activations at one layer's input."""
    s = in_bytes or shape.dtype_bytes
    P, lin = shape.total_params, shape.linear_params
    out = output_bytes(shape, method, config, s)
    est = Estimate("", "quantize", method, "cpu")
    t = est.terms
    # llm_compressor.load / load_causal_lm: the whole model on the host in its stored dtype.
    t["loaded model"] = P * s
    if method in GGUF_BYTES:
        # llama.cpp's convert_hf_to_gguf.py reads tensors lazily and writes an F16 file; llama-quantize
        # maps it: one tensor at a time in memory, not the model.
        t = est.terms = {
            "largest tensor (x2)": 2 * max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate) * 4
        }
        est.disk_bytes = P * s + P * 2 + out
    elif method == "int8_dynamic":
        t["quantized copy (int8 linears + float rest)"] = lin + (P - lin) * 4  # quantize_dynamic copies
    elif method in ("bf16", "fp16"):
        t["largest tensor cast"] = shape.vocab * shape.hidden * 2
    else:
        t["packed output"] = out - (P - lin) * s  # compressed-tensors packs beside the float weights
    if method in CALIBRATED:
        cal = _cfg(CALIBRATION_DEFAULTS, calibration)
        n_tokens = cal["samples"] * cal["seq_len"]
        # llm-compressor's sequential pipeline caches every sample's hidden state at the layer being
        # calibrated (IntermediatesCache), input and output: 2 x samples x seq_len x hidden.
        t["calibration hidden states"] = 2 * n_tokens * shape.hidden * s
        # GPTQ: one in x in float32 Hessian per linear of the current layer (GPTQModifier).
        t["Hessians (one layer)"] = sum(i * i * 4 for shapes in shape.linears().values() for i, _ in shapes)
        batch = min(cal["samples"], max(1, CALIBRATION_BATCH_TOKENS // cal["seq_len"])) * cal["seq_len"]
        t["one batch's layer activations"] = (
            batch * (layer_activation_elements(shape) + shape.heads * cal["seq_len"]) * s
        )
        if method == "awq":
            t["calibration hidden states"] *= 2  # AWQ caches the balanced layers' inputs too
        if method == "int8_static":  # ONNX export + ONNX Runtime calibration session, both in memory
            t["ONNX model + session"] = 2 * P * 4
    # Measured (rtn on stories260K and a 56M Llama): 18 MiB fixed, and one copy of the largest tensor
    # (the embedding or head) while the folder is written.
    t["largest tensor copied while saving (measured)"] = shape.vocab * shape.hidden * s
    t["process overhead (measured)"] = QUANTIZE_OVERHEAD
    peak = sum(t.values())
    if m.on_gpu and method in CALIBRATED and method != "int8_static":
        # On a GPU the sequential pipeline moves one decoder layer at a time to it.
        gpu_terms = ("Hessians (one layer)", "one batch's layer activations")
        est.device = "cuda"
        est.accelerator_bytes = shape.layer_params * s + sum(t[k] for k in gpu_terms)
        est.host_bytes = peak - sum(t[k] for k in gpu_terms)
    else:
        est.host_bytes = peak
    if not est.disk_bytes:
        est.disk_bytes = P * s + out  # input cached by the worker + the output folder
    flops = 0.0
    if method in CALIBRATED:
        cal = _cfg(CALIBRATION_DEFAULTS, calibration)
        flops = 2 * P * cal["samples"] * cal["seq_len"] * (3 if method == "awq" else 1)
        flops += sum(i**3 for shapes in shape.linears().values() for i, _ in shapes) * shape.layers * 2
    est.seconds = flops / (m.gflops() * 1e9) + (P * s + out) / (DISK_GBS * 1e9)
    est.notes.append("time rough: calibration FLOPs and disk at 0.5 GB/s")
    return est


def loaded_bytes(shape: ModelShape, fmt_method: str, in_bytes: int, on_gpu: bool) -> int:
    """A model's weights in memory as the benchmarker loads it: compressed-tensors are decompressed to
    float on the CPU (transformers), kept packed at 4 bits on a GPU (packed_int4.py)."""
    P = shape.total_params
    if fmt_method in ("original", "base", "", None):
        return P * in_bytes
    if fmt_method in ("bf16", "fp16"):
        return P * 2
    if fmt_method in WEIGHT_ONLY_BITS or fmt_method == "auto":
        return output_bytes(shape, fmt_method, None, in_bytes) if on_gpu else P * in_bytes
    if fmt_method in GGUF_BYTES:
        return int(P * GGUF_BYTES[fmt_method])  # llama.cpp maps the file
    return output_bytes(shape, fmt_method, None, in_bytes)


def plan_benchmark(
    shape: ModelShape,
    candidate: str,
    config: Mapping[str, Any] | None,
    m: Machine,
    in_bytes: int | None = None,
    reference: bool = False,
) -> Estimate:
    """The benchmarker's child (child.measure): the model, the reference model for agreement (loaded in
    the same child), the KV cache of the longest run, and one perplexity window's logits."""
    c = _cfg(BENCHMARK_DEFAULTS, config)
    s = in_bytes or shape.dtype_bytes
    on_gpu = m.on_gpu and candidate not in ("int8_dynamic", "int8_static") and candidate not in GGUF_BYTES
    act_bytes = 2 if on_gpu else 4
    ctx = c["context_length"]
    t = {"weights": loaded_bytes(shape, candidate, s, on_gpu)}
    if reference:
        t["reference model (agreement)"] = shape.total_params * s
    # KV cache: the perplexity window, or the decode runs' prompt + new tokens at the largest batch.
    decode = max(c["batch_sizes"]) * (c["latency_new_tokens"] + 16)
    t["KV cache"] = shape.kv_cache_bytes(max(ctx, decode), 1, act_bytes)
    # One window's float32 logits and their log_softmax (perplexity.py), and one layer's activations
    # with the attention scores (heads x ctx x ctx).
    t["logits (one window)"] = 2 * ctx * shape.vocab * 4
    t["one layer's activations"] = ctx * (layer_activation_elements(shape) + shape.heads * ctx) * act_bytes
    if not on_gpu:
        if candidate in ("original", "base", "bf16", "fp16") and not shape.tied:
            # A plain folder on the CPU is used in place from the memory-mapped safetensors file: only
            # the input embedding's rows of the tokens read become resident (measured; counted as none).
            t["weights"] -= shape.vocab * shape.hidden * s
        elif candidate in ("original", "base") and shape.tied:
            # transformers builds the output head before tying it to the embedding (measured).
            t["untied head while loading"] = shape.vocab * shape.hidden * s // 2
        t["process overhead (measured)"] = BENCHMARK_OVERHEAD
    est = Estimate("", "benchmark", candidate, "cuda" if on_gpu else "cpu", terms=t)
    if on_gpu:
        est.accelerator_bytes = sum(t.values())
        est.host_bytes = t["weights"]  # read through the host on the way to the GPU
    else:
        est.host_bytes = sum(t.values())
    est.disk_bytes = t["weights"]  # the worker's cached copy of the input; the report is kilobytes
    windows = max(1, (c["max_eval_tokens"] - ctx) // c["stride"] + 1)
    flops = 2 * shape.total_params * windows * ctx * (2 if reference else 1)
    decode_tokens = (c["warmup"] + c["repetitions"]) * c["latency_new_tokens"] * (1 + len(c["batch_sizes"]))
    est.seconds = (flops + 2 * shape.total_params * decode_tokens) / (m.gflops() * 1e9)
    est.seconds += t["weights"] / (DISK_GBS * 1e9)  # reading the model
    est.notes.append(
        "time rough: the model read at 0.5 GB/s, perplexity and decode FLOPs at the machine's figure"
    )
    return est


def plan_export(shape: ModelShape, fmt: str, m: Machine, in_bytes: int | None = None) -> Estimate:
    """The exporter (counted, not measured): ONNX formats hold the torch model, the exported graph
    (torch.onnx keeps its initializers in memory) and an ONNX Runtime session for the check; GGUF runs
    llama.cpp's converter, which reads one tensor at a time."""
    s = in_bytes or shape.dtype_bytes
    P = shape.total_params
    est = Estimate("", "export", fmt, "cpu")
    if fmt.startswith("gguf"):
        est.terms = {"torch model (verification)": P * s, "llama.cpp context": P * 2}
        est.disk_bytes = P * s + P * 2
    elif fmt in ("executorch", "coreml"):
        est.terms = {"torch model": P * 4, "lowered program": P * 4}
        est.disk_bytes = P * s + P * 4
    else:
        width = 2 if fmt == "onnx-fp16" else 1 if "int8" in fmt else 4
        est.terms = {"torch model": P * 4, "exported graph": P * 4, "ONNX Runtime session": P * width}
        est.disk_bytes = P * s + P * 4 + P * width
    est.host_bytes = sum(est.terms.values())
    est.seconds = est.disk_bytes / (DISK_GBS * 1e9) + 8 * P / (m.gflops() * 1e9)
    est.notes.append("counted, not measured; time rough")
    return est
