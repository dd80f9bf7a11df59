"""A Hugging Face causal LM -> an ONNX decoder graph with past key/values (the contract in __init__).

The dynamo exporter (`torch.onnx.export(dynamo=True)`) traces the model through a small wrapper whose
inputs and outputs are flat tensors: it builds transformers' DynamicCache from the past tensors and
returns the updated cache's tensors as `present`. transformers 5's cache classes are Python objects
that neither exporter can take as graph inputs; the TorchScript exporter cannot trace current
transformers models at all. Verified against PyTorch with and without past (see verify.py).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from tailor_runtime.errors import FailedPrecondition
from tailor_runtime.ml.onnx import INPUTS, past_names, present_names


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def export_decoder(model: Any, path: Path, opset: int) -> dict[str, set[str]]:
    """Export float32 `model` to `path`; returns, per MatMul/Gemm node, the module paths it came from."""
    import torch
    from torch.export import Dim
    from transformers import DynamicCache

    layers, kv_heads, head_dim = kv_shape(model.config)

    class DecoderWithPast(torch.nn.Module):
        """Flat tensors in and out around the model's cache object."""

        def __init__(self, lm: Any):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
            cache = DynamicCache(ddp_cache_data=pairs, config=self.lm.config)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    # Sample sizes all different and above 1, so the exporter specializes none of the dynamic axes.
    batch, sequence, past_len = 2, 3, 5
    ids = torch.arange(batch * sequence, dtype=torch.long).reshape(batch, sequence) % model.config.vocab_size
    mask = torch.ones(batch, past_len + sequence, dtype=torch.long)
    positions = torch.arange(past_len, past_len + sequence).expand(batch, sequence)
    past = [torch.zeros(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    b, s, p, t = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    try:
        program = torch.onnx.export(
            DecoderWithPast(model).eval(),
            (ids, mask, positions, past),
            dynamo=True,
            opset_version=opset,
            input_names=[*INPUTS, *past_names(layers)],
            output_names=["logits", *present_names(layers)],
            dynamic_shapes=({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, [{0: b, 2: p}] * (2 * layers)),
            verbose=False,
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FailedPrecondition(f"torch.onnx.export could not export this model: {first}") from exc
    matmul_scopes = {}
    for node in program.model.graph.all_nodes():
        if node.op_type in ("MatMul", "Gemm"):
            scopes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))
            matmul_scopes[node.name] = {scope.removeprefix("lm.") for scope in scopes}  # the wrapper's `lm`
        # Debug metadata (stack traces with this machine's paths and per-process counters, FX names)
        # would make exports differ run to run and weighs a third of a small model's file.
        node.metadata_props.clear()
    program.model.graph.metadata_props.clear()
    program.save(str(path))  # weights over 2 GB go to an external data file beside it, automatically
    return matmul_scopes


FLOAT32_ATOL = 1e-3  # a float32 graph computes the same thing as PyTorch in another engine
FLOAT32_MIN_TOP1 = 0.99


def export_optimized(
    model: Any, work: Path, opset: int, batches: list[Any], optimize: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Export `model` into `work` (which holds its config.json), verify it, then optimize it.

    Returns the graph's path (`optimized.onnx`, or `exported.onnx` with optimize=False) and what
    happened: the "exported" check against PyTorch (raises VerificationFailed over the float32
    tolerance, with and without past), the fused operators and the MatMul scopes (see export_decoder).
    """
    from tailor_runtime.ml.onnx import optimize as ort_tools
    from tailor_runtime.ml.onnx import verify
    from tailor_runtime.ml.onnx.session import OnnxCausalLM

    graph = Path(work) / "exported.onnx"
    scopes = export_decoder(model, graph, opset)
    check = verify.compare(OnnxCausalLM(work, graph.name), model, batches)
    verify.enforce("exported", check, FLOAT32_ATOL, FLOAT32_MIN_TOP1)
    info: dict[str, Any] = {"exported": check, "matmul_scopes": scopes, "fused_operators": {}}
    if optimize:
        config = model.config
        optimized = Path(work) / "optimized.onnx"
        info["fused_operators"] = ort_tools.optimize_transformer(
            graph, optimized, config.num_attention_heads, config.hidden_size
        )
        ort_tools.remove(graph)
        graph = optimized
    return graph, info
