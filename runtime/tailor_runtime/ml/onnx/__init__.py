"""ONNX decoders with a KV cache: export, optimize, quantize, convert, run and verify (shared by services).

The graph contract (the one Hugging Face Optimum and ONNX Runtime GenAI use for decoder-only models):

    inputs   input_ids [batch, sequence] int64, attention_mask [batch, past + sequence] int64,
             position_ids [batch, sequence] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] for every layer i
    outputs  logits [batch, sequence, vocab],
             present.{i}.key / .value [batch, kv_heads, past + sequence, head_dim]

Batch, sequence and past length are dynamic; a prompt is run with past tensors of length 0, then each
new token with the previous call's `present` as its `past`. The modules here:

  export.py    torch -> ONNX (opset >= 17) through `torch.onnx.export(dynamo=True)`
  optimize.py  ONNX Runtime's transformer optimizer, FP16, INT8 dynamic, INT8 static QDQ, ORT format
  session.py   OnnxCausalLM: an ONNX Runtime session behind a torch.nn.Module forward (logits + cache)
  verify.py    an ONNX model against its PyTorch source, with and without past, on real text
  folder.py    the model folder (graph, tokenizer, config, tailor_format.json, verification.json)
"""

from __future__ import annotations

MODEL_FILE = "model.onnx"
ORT_FILE = "model.ort"
INPUTS = ("input_ids", "attention_mask", "position_ids")
# Weights this size or larger go to one external data file beside the graph (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1 << 30


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
