"""The `onnx` and `ort` folder formats: a decoder graph with a KV cache, run by ONNX Runtime on CPU.

`load` returns `tailor_runtime.ml.onnx.session.OnnxCausalLM`, a torch.nn.Module whose forward returns
`.logits` and `.past_key_values` and which has the HF `.config`: perplexity, agreement, the accuracy
gate and the benchmarker's decoding treat it like a PyTorch model. `tailor_format.json` names the graph
file (`model_file`; `model.onnx` for folders written before that field existed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tailor_runtime.ml.onnx import MODEL_FILE


def load(folder: Path, fmt: dict[str, Any]) -> Any:
    from tailor_runtime.ml.onnx.session import OnnxCausalLM

    return OnnxCausalLM(folder, fmt.get("model_file", MODEL_FILE))
