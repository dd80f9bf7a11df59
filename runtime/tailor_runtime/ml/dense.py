"""Decode any quantized model folder Tailor writes into a dense float32 `hf-safetensors` folder.

For consumers that need plain float weights (the exporters: ONNX, GGUF, ExecuTorch, Core ML): the
decoded weights are exactly the candidate's dequantized values, so an export of the decoded folder
computes what the candidate computes with its weights. Sources, each loaded by its own format loader
(`tailor_runtime.ml.formats`) and every quantized layer decoded:

  int8-dynamic        int8 * per-channel scale (torch's dynamic-quantized Linear)
  bnb-nf4, bnb-fp4    bitsandbytes' own dequantize_4bit (code book * block scale, double quant undone)
  bnb-int8            the int8 weight * its per-row scale / 127 (LLM.int8's stored weight)
  compressed-tensors  compressed-tensors' own decompression (int 2..8 bit with scales and zero points,
                      group or channel, FP8), which is what transformers runs; the quantizer's rtn, gptq,
                      awq, int8_weight_only, smoothquant, fp8 and auto (mixed widths) all write it
  gguf                the GGUF's tensors dequantized (the gguf loader already returns float32)

Activations are not quantized in the decoded model: for the formats that quantize them at run time
(int8-dynamic, bnb-int8's LLM.int8, W8A8 compressed-tensors such as smoothquant or FP8 with dynamic
activations) the decoded model differs from the candidate by that rounding only; `check` measures it.
All float parts (embeddings, norms, an untied head) are copied, in float32 (every bf16/fp16 value is
exact in float32). The folder gets config.json without `quantization_config`, the tokenizer files,
generation_config.json and a tailor_format.json saying where it came from (`decoded_from`).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.ml import formats
from tailor_runtime.progress import ProgressFn, no_progress

# What can be decoded. hf-safetensors is already dense; peft-lora, ONNX and on-device programs are not
# PyTorch weight folders (an adapter needs its base; a graph's weights are the graph's).
DECODABLE = (
    formats.INT8_DYNAMIC,
    formats.BNB_NF4,
    formats.BNB_FP4,
    formats.BNB_INT8,
    formats.COMPRESSED_TENSORS,
    formats.GGUF,
)
# Formats whose candidate also quantizes activations at run time (or may: a compressed-tensors scheme
# with input_activations): the decoded model then agrees closely, not to float rounding.
ACTIVATION_QUANTIZED = (formats.INT8_DYNAMIC, formats.BNB_INT8)
# Sentences the decoded model is checked on against the candidate (real text, different lengths).
CHECK_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "One day, a small dog found a red ball under the big tree and ran home to show it to his friend.",
    "The sun was warm and the sky was blue.",
    "Please read the instructions carefully before you start.",
)
# Decoded against candidate, weight-only formats: the same weights, computed in float32 by one and in
# the candidate's compute dtype (float32, bfloat16 dequantized per matmul) by the other.
WEIGHT_ONLY_ATOL = 1e-2
WEIGHT_ONLY_MIN_TOP1 = 0.99
# With activations quantized by the candidate only: measured 1.0 on the tiny test models (int8-dynamic,
# LLM.int8); a decoding that is wrong agrees at about 1/vocab.
ACTIVATION_QUANTIZED_MIN_TOP1 = 0.9


def decode_to_dense(model_dir: Path, out_dir: Path, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Write the dense float32 hf-safetensors folder of the quantized model in `model_dir` to `out_dir`
    (which must not exist or be empty). Returns {"decoded_from", "decoded_layers", "check": {...}}: the
    check compares the folder, loaded back as plain transformers loads it, with the candidate as its
    own format loads it."""
    from tailor_runtime.ml.model_io import load_causal_lm, read_format, write_format

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    fmt = read_format(model_dir)
    name = fmt["format"]
    if name not in DECODABLE:
        raise InvalidArgument(
            f"{model_dir.name} is a {name!r} folder, which has no dense float decoding "
            f"({'it already is dense' if name == formats.HF_SAFETENSORS else 'not PyTorch weights'})",
            choices=DECODABLE,
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FailedPrecondition(f"decode destination {out_dir} already exists and is not empty")
    progress(2.0, "decoding", f"loading {model_dir.name} ({name})")
    candidate, tokenizer = load_causal_lm(model_dir)
    state, decoded = dense_state_dict(candidate)
    if decoded == 0 and name != formats.GGUF:
        raise FailedPrecondition(f"the {name} model in {model_dir.name} has no quantized layers to decode")
    progress(30.0, "decoding", f"{decoded} quantized layers decoded; writing float32 safetensors")
    dense = _dense_model(candidate.config, state)
    out_dir.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _copy_generation_config(model_dir, out_dir)
    write_format(out_dir, formats.HF_SAFETENSORS, dtype="float32", decoded_from=name, decoded_layers=decoded)
    progress(60.0, "decoding", "checking the decoded folder against the candidate")
    reloaded, _ = load_causal_lm(out_dir)
    check = compare_logits(reloaded, candidate, tokenizer)
    check["activations_quantized"] = activations_quantized(name, fmt, model_dir)
    enforce(check, name)
    return {"decoded_from": name, "decoded_layers": decoded, "check": check}


def enforce(check: dict[str, Any], name: str) -> None:
    """VerificationFailed unless the decoded model agrees with its candidate: to float rounding for
    weight-only formats, at ACTIVATION_QUANTIZED_MIN_TOP1 of positions where the candidate also rounds
    its activations."""
    from tailor_runtime.errors import VerificationFailed

    if check["activations_quantized"]:
        atol, top1 = None, ACTIVATION_QUANTIZED_MIN_TOP1
    else:
        atol, top1 = WEIGHT_ONLY_ATOL, WEIGHT_ONLY_MIN_TOP1
    check.update(passed=True, atol=atol, min_top1_agreement=top1)
    problems = []
    if atol is not None and check["max_abs_diff"] > atol:
        problems.append(f"max |logit difference| {check['max_abs_diff']:.4g} > {atol:g}")
    if check["top1_agreement"] < top1:
        problems.append(f"top-1 agreement {check['top1_agreement']:.4f} < {top1:g}")
    if problems:
        check["passed"] = False
        raise VerificationFailed(
            f"the dense decoding of the {name} model does not compute what the model computes over "
            f"{check['positions']} positions: {'; '.join(problems)}; nothing was exported"
        )


def activations_quantized(name: str, fmt: dict[str, Any], model_dir: Path) -> bool:
    """Whether the candidate quantizes activations at run time (the decoded model does not)."""
    if name in ACTIVATION_QUANTIZED:
        return True
    if name != formats.COMPRESSED_TENSORS:
        return False
    config = json.loads((Path(model_dir) / "config.json").read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return any(g.get("input_activations") for g in groups.values())


def dense_state_dict(model: Any) -> tuple[dict[str, Any], int]:
    """(float32 state dict of the dense model, number of quantized layers decoded) of a loaded model.

    Each quantized layer becomes `<name>.weight` (+ `<name>.bias`); every other parameter and
    persistent buffer is copied; quantization bookkeeping (scales, zero points, packed words, shapes)
    is dropped, since the dense model has no place for it."""
    import torch

    _decompress_compressed_tensors(model)
    state: dict[str, Any] = {}
    decoded, inside = 0, []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        pair = _decode_module(module)
        if pair is not None:
            weight, bias = pair
            state[f"{name}.weight"] = weight.detach().to(torch.float32).contiguous()
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().to(torch.float32).contiguous()
            decoded += 1
            inside.append(name)
            continue
        for pname, param in module.named_parameters(recurse=False):
            if not _is_bookkeeping(pname):
                state[f"{name}.{pname}" if name else pname] = param.detach().to(torch.float32)
        for bname, buffer in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set and not _is_bookkeeping(bname):
                value = buffer.detach()
                state[f"{name}.{bname}" if name else bname] = (
                    value.to(torch.float32) if torch.is_floating_point(value) else value
                )
    return state, decoded


_BOOKKEEPING = ("_scale", "_zero_point", "_g_idx", "_packed", "_shape", "_global_scale")


def _is_bookkeeping(name: str) -> bool:
    return any(name.endswith(s) for s in _BOOKKEEPING)


def _decompress_compressed_tensors(model: Any) -> None:
    """transformers leaves a compressed-tensors model compressed until its first forward, when a hook
    decompresses it (compressed-tensors' own code): run that hook now, on one token."""
    import torch

    if getattr(model, "ct_decompress_hook", None) is None:
        return
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=False)
    if getattr(model, "ct_decompress_hook", None) is not None:
        model.ct_decompress_hook.remove()
        del model.ct_decompress_hook


def _decode_module(module: Any) -> tuple[Any, Any] | None:
    """(dense weight, bias) of a quantized layer, or None for any other module."""
    kind = type(module).__name__
    if kind == "Linear" and type(module).__module__.startswith("torch.ao.nn.quantized.dynamic"):
        return module.weight().dequantize(), module.bias()
    if kind == "Linear4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state), module.bias
    if kind == "Linear8bitLt":
        import torch

        weight = module.weight
        scb = getattr(weight, "SCB", None)
        if weight.dtype != torch.int8 or scb is None:
            raise FailedPrecondition(
                "a bitsandbytes Linear8bitLt layer holds no int8 weight and scale (SCB) to decode"
            )
        return weight.data.float() * scb.float()[:, None] / 127.0, module.bias
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is not None and getattr(scheme, "weights", None) is not None and not _ct_compressed(module):
        # compressed-tensors, decompressed by its own code: the weight now holds the dequantized values.
        return module.weight, module.bias
    if hasattr(module, "weight_packed") or (hasattr(module, "weight_scale") and _ct_compressed(module)):
        raise FailedPrecondition(
            f"a compressed-tensors layer ({kind}) is still compressed after transformers' decompression; "
            "this compressed-tensors format is not decoded by Tailor yet"
        )
    return None


def _ct_compressed(module: Any) -> bool:
    import torch

    weight = getattr(module, "weight", None)
    return weight is not None and not torch.is_floating_point(weight)


def _dense_model(config: Any, state: dict[str, Any]) -> Any:
    """A float32 model of `config` (its quantization_config removed) holding `state`, strictly."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = dense.state_dict()
    missing = [k for k in expected if k not in state and not _tied(dense, k)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise FailedPrecondition(
            f"the decoded weights do not fit {type(dense).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key in state:
        # bitsandbytes quantizes transformers' Conv1D (GPT-2) as a Linear of the transposed weight.
        owner = dense.get_submodule(key.rpartition(".")[0])
        if type(owner).__name__ == "Conv1D" and key.endswith(".weight"):
            if tuple(state[key].shape) == tuple(expected[key].shape)[::-1]:
                state[key] = state[key].t().contiguous()
    shapes = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if shapes:
        k = shapes[0]
        raise FailedPrecondition(
            f"decoded {k} has shape {tuple(state[k].shape)}, the model expects {tuple(expected[k].shape)}"
        )
    dense.load_state_dict(state, strict=False, assign=False)
    dense.tie_weights()
    return dense.eval()


def _tied(model: Any, key: str) -> bool:
    """A tied output head's weight is the input embedding's: it is not stored twice."""
    head = model.get_output_embeddings()
    return (
        head is not None
        and key.endswith("weight")
        and getattr(model.config, "tie_word_embeddings", False)
        and head.weight is model.get_input_embeddings().weight
        and any(n == key[: -len(".weight")] for n, m in model.named_modules() if m is head)
    )


def _copy_generation_config(model_dir: Path, out_dir: Path) -> None:
    src = Path(model_dir) / "generation_config.json"
    if src.is_file():
        shutil.copyfile(src, out_dir / "generation_config.json")


def compare_logits(model: Any, reference: Any, tokenizer: Any) -> dict[str, Any]:
    """`model` against `reference` on CHECK_TEXT, one unpadded sentence at a time: max |logit diff|,
    top-1 agreement and the positions compared."""
    import torch

    diff, same, positions = 0.0, 0, 0
    with torch.inference_mode():
        for text in CHECK_TEXT:
            ids = torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.long)
            a = model(input_ids=ids, use_cache=False).logits.float()
            b = reference(input_ids=ids, use_cache=False).logits.float()
            diff = max(diff, float((a - b).abs().max()))
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            positions += ids.shape[1]
    return {"max_abs_diff": diff, "top1_agreement": same / positions, "positions": positions}
