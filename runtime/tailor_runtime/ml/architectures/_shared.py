"""Declarations several family modules share (kept here so each reason is written once)."""

from __future__ import annotations

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")

# The on-device decoder (tailor_exporter.mobile_decoder) rebuilds Llama's layer with a static KV cache.
MOBILE_LLAMA_ONLY = (
    "the on-device exporters (ExecuTorch, Core ML) rebuild the decoder with a static KV cache for Llama's "
    "layer layout only; export this model to onnx or ort instead"
)

# torch.onnx's dynamo exporter fails on these models' decoder with a KV cache (tested).
ONNX_FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "onnx-int8-static", "ort", "triton")

# llm-compressor's methods (and its compressed-tensors format) act on torch.nn.Linear modules.
LINEAR_ONLY_METHODS = ("rtn", "gptq", "awq", "smoothquant", "auto", "int8_weight_only", "fp8")
