"""The `int8-dynamic` folder format: int8 weights with per-output-channel scales, run as dynamic INT8.

On disk (safetensors only, nothing pickled):
  * `model.safetensors`: for each quantized nn.Linear `<name>.weight` as int8 plus `<name>.weight_scale`
    (float32, [out, 1]: one per output channel; symmetric, so no zero point) and `<name>.bias` in float32
    if any; every other parameter (embeddings, norms, an untied lm_head) in float32.
  * config.json with a `quantization_config` that says exactly that in compressed-tensors' terms
    (`int-quantized`: int8 channel-wise symmetric weights; activations quantized per call, per tensor,
    asymmetric, at the width torch's kernels use), so plain transformers (with the compressed-tensors
    package) loads the folder and computes what Tailor's loader computes: the same int8 weights and
    scales, activations rounded on the same grid (measured: logits within 1e-6, same greedy tokens).
    Folders written before that had no quantization_config; Tailor still loads them (scales [out]).
  * tokenizer files, generation_config.json as in any HF folder.
  * tailor_format.json: {"format": "int8-dynamic", "dtype": "float32", "quantized_layers": N,
    "activation_bits": 7 or 8, ...}.

torch's x86/fbgemm dynamic Linear quantizes activations with `reduce_range` (7 bits, [0, 127]) so its
int8 products cannot overflow; compressed-tensors expresses that exactly as asymmetric 7-bit integers.
QNNPACK (ARM) uses the full 8 bits: the folder records the width of the engine that wrote it.

GPT-2's Conv1D projections (input-major weights) are not nn.Linear and compressed-tensors only quantizes
nn.Linear: the architecture registry refuses `quantize/int8_dynamic` for gpt2, and save_quantized refuses
a model with no Linear layer to quantize.

Loading rebuilds the architecture from config.json and swaps each quantized nn.Linear for torch's
`torch.ao.nn.quantized.dynamic.Linear` built from the stored int8 weight and scales: activations are
quantized per batch at run time and the matmul runs in int8 (fbgemm/x86 or qnnpack kernels). The output
embedding (lm_head) and the input embedding stay float: they are the most sensitive layers and
the dynamic-quantized Linear has no embedding counterpart.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tailor_runtime.progress import ProgressFn, no_progress

WEIGHTS_FILE = "model.safetensors"
SCALE_SUFFIX = ".weight_scale"
QMAX = 127  # symmetric int8 in [-127, 127]: -128 unused so that the grid is symmetric around zero


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # torch 2.13 marks torch.ao quantized tensors (and the TorchScript they use internally) as deprecated in
    # favour of torchao, which is not a project dependency; they still work, so keep the logs readable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        yield


def quantizable_linears(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every nn.Linear except the output embedding (lm_head)."""
    import torch

    out_emb = model.get_output_embeddings()
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb
    ]


def quantize_weight(weight: Any) -> tuple[Any, Any]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale per row)."""
    import torch

    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale works
    q = torch.clamp(torch.round(w / scale[:, None]), -QMAX, QMAX).to(torch.int8)
    return q, scale


def activation_bits() -> int:
    """The activation width torch's dynamic int8 Linear uses on this machine's quantized engine: 7 on
    x86/fbgemm (reduce_range), 8 on QNNPACK."""
    import torch

    return 7 if torch.backends.quantized.engine in ("x86", "fbgemm") else 8


def quantization_config(model: Any, bits: int) -> dict[str, Any]:
    """compressed-tensors' description of an int8-dynamic folder (transformers' `quantization_config`):
    every nn.Linear but the output embedding has int8 symmetric per-channel weights stored as they are
    (`int-quantized`) and per-tensor asymmetric dynamic activations of `bits` bits."""
    out_emb = model.get_output_embeddings()
    ignore = sorted(name for name, mod in model.named_modules() if out_emb is not None and mod is out_emb)
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel",
                    "dynamic": False,
                },
                "input_activations": {
                    "num_bits": bits,
                    "type": "int",
                    "symmetric": False,
                    "strategy": "tensor",
                    "dynamic": True,
                },
            }
        },
        "ignore": ignore,
    }


def save_quantized(model: Any, tokenizer: Any, out_dir: Path, progress: ProgressFn = no_progress) -> dict:
    """Quantize `model`'s Linear layers and write an int8-dynamic folder. Returns metrics."""
    import copy

    import torch
    from safetensors.torch import save_file

    from tailor_runtime.errors import InvalidArgument
    from tailor_runtime.ml.formats import INT8_DYNAMIC
    from tailor_runtime.ml.model_io import write_format

    out_dir = Path(out_dir)
    linears = quantizable_linears(model)
    if not linears:
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight")})[:6]
        raise InvalidArgument(
            f"int8_dynamic quantizes nn.Linear layers and {type(model).__name__} has none besides its output "
            f"head (its layers: {', '.join(kinds)}); quantize it with a method that takes its layers, or "
            "export it to onnx-int8, which quantizes its MatMuls"
        )
    bits = activation_bits()
    linear_names = {name for name, _ in linears}
    tensors: dict[str, Any] = {}
    for i, (name, mod) in enumerate(linears):
        q, scale = quantize_weight(mod.weight)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}{SCALE_SUFFIX}"] = scale[:, None]  # compressed-tensors' channel layout
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().float()
        progress(100.0 * (i + 1) / len(linears), "quantizing", f"layer {i + 1}/{len(linears)}")
    # Everything else in float32; a tied lm_head shares the embedding's storage and is written once
    # (named_parameters skips duplicates), exactly like save_pretrained does.
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[0] not in linear_names:
            tensors[name] = param.detach().to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    # One metadata key only: safetensors writes a multi-key metadata map in hash order (not reproducible).
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(model, bits)
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    int8_bytes = sum(t.numel() for k, t in tensors.items() if t.dtype == torch.int8)
    write_format(
        out_dir,
        INT8_DYNAMIC,
        dtype="float32",
        quantized_layers=len(linears),
        scheme="symmetric-per-channel",
        activation_bits=bits,
    )
    return {
        "quantized_layers": len(linears),
        "int8_weight_bytes": int8_bytes,
        "weight_bytes": (out_dir / WEIGHTS_FILE).stat().st_size,
    }


def dynamic_linear(qweight: Any, scale: Any, bias: Any | None) -> Any:
    """torch's dynamic-quantized Linear holding `qweight` (int8) with per-row `scale`."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    out_features, in_features = qweight.shape
    packed = torch._make_per_channel_quantized_tensor(
        qweight, scale.double(), torch.zeros(out_features, dtype=torch.long), 0
    )
    layer = DynamicQuantizedLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
    layer.set_weight_bias(packed, None if bias is None else bias.float())
    return layer


def load(folder: Path, fmt: dict[str, Any]) -> Any:
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from tailor_runtime.errors import InvalidArgument

    folder = Path(folder)
    tensors = load_file(folder / WEIGHTS_FILE)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        # It describes the folder for transformers; the model built here holds torch's own int8 layers,
        # and a copy of it saved elsewhere must not claim compressed-tensors weights.
        del config.quantization_config
    # Parameters on the meta device (no memory, no random init); buffers such as RoPE tables stay real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantized = sorted(k[: -len(SCALE_SUFFIX)] for k in tensors if k.endswith(SCALE_SUFFIX))
    qtensors = {
        name: (
            tensors.pop(f"{name}.weight"),
            tensors.pop(f"{name}{SCALE_SUFFIX}"),
            tensors.pop(f"{name}.bias", None),
        )
        for name in quantized
    }
    # Float tensors first, while the quantized layers are still (meta) nn.Linear: the dynamic Linear's own
    # state-dict hooks would expect its packed-params keys instead.
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()  # re-point a tied lm_head at the embedding that was just assigned
    with _quiet_deprecations():
        for name, (qweight, scale, bias) in qtensors.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if not isinstance(getattr(parent, child, None), torch.nn.Linear):
                raise InvalidArgument(
                    f"{folder}: {name} is quantized on disk but is not a Linear layer in config"
                )
            setattr(parent, child, dynamic_linear(qweight, scale.reshape(-1), bias))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise InvalidArgument(
            f"{folder}/{WEIGHTS_FILE} does not match config.json: missing {still_meta[:5]}, unexpected {unexpected[:5]}"
        )
    if len(quantized) != fmt.get("quantized_layers", len(quantized)):
        raise InvalidArgument(
            f"{folder}: tailor_format.json says {fmt['quantized_layers']} quantized layers, the weights hold "
            f"{len(quantized)}"
        )
    if (folder / "generation_config.json").is_file():  # from_config does not read it
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model.eval()
