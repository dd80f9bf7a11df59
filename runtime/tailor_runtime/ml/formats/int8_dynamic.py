"""The `int8-dynamic` folder format: int8 weights with per-output-channel scales, run as dynamic INT8.

On disk (safetensors only, nothing pickled):
  * `model.safetensors`: for each quantized nn.Linear `<name>.weight` as int8 plus `<name>.weight_scale`
    (float32, one per output channel; symmetric, so no zero point) and `<name>.bias` in float32 if any;
    every other parameter (embeddings, norms, an untied lm_head) in float32.
  * config.json, tokenizer files, generation_config.json as in any HF folder.
  * tailor_format.json: {"format": "int8-dynamic", "dtype": "float32", "quantized_layers": N, ...}.

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


def save_quantized(model: Any, tokenizer: Any, out_dir: Path, progress: ProgressFn = no_progress) -> dict:
    """Quantize `model`'s Linear layers and write an int8-dynamic folder. Returns metrics."""
    import torch
    from safetensors.torch import save_file

    from tailor_runtime.ml.formats import INT8_DYNAMIC
    from tailor_runtime.ml.model_io import write_format

    out_dir = Path(out_dir)
    linears = quantizable_linears(model)
    linear_names = {name for name, _ in linears}
    tensors: dict[str, Any] = {}
    for i, (name, mod) in enumerate(linears):
        q, scale = quantize_weight(mod.weight)
        tensors[f"{name}.weight"] = q
        tensors[f"{name}{SCALE_SUFFIX}"] = scale
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
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    int8_bytes = sum(t.numel() for k, t in tensors.items() if t.dtype == torch.int8)
    write_format(
        out_dir, INT8_DYNAMIC, dtype="float32", quantized_layers=len(linears), scheme="symmetric-per-channel"
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
            setattr(parent, child, dynamic_linear(qweight, scale, bias))
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
