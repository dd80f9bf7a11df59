"""An exported ONNX causal LM folder (see tailor_exporter.onnx_export) run with ONNX Runtime on CPU.

The graph takes input_ids and attention_mask and returns logits for every position; it has no KV
cache inputs, so decoding recomputes the whole sequence per token (measured as `kv_cache: false`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tailor_runtime.errors import FailedPrecondition

MODEL_FILE = "model.onnx"


class OnnxCausalLM:
    """Called like a logits function: int64 input_ids [B, T] (torch) -> float32 logits [B, T, V] (torch)."""

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            raise FailedPrecondition(f"{folder} declares format 'onnx' but has no {MODEL_FILE}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.threads = threads or 0  # 0: ONNX Runtime's default (one per physical core)
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._output = self.session.get_outputs()[0].name
        config = json.loads((Path(folder) / "config.json").read_text())
        # perplexity/latency read the context limit from `model.config`, as for an HF model.
        self.config = SimpleNamespace(max_position_embeddings=config.get("max_position_embeddings"))
        self._path = path

    def __call__(self, input_ids: Any) -> Any:
        import numpy as np
        import torch

        ids = input_ids.numpy().astype(np.int64)
        feeds = {"input_ids": ids}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones_like(ids)
        return torch.from_numpy(self.session.run([self._output], feeds)[0])

    def weight_bytes(self) -> int:
        """Bytes of the graph's initializers (weights and constants), the ONNX analogue of parameter bytes."""
        import onnx

        graph = onnx.load(str(self._path), load_external_data=False).graph
        total = 0
        for init in graph.initializer:
            size = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            count = 1
            for d in init.dims:
                count *= d
            total += size * count
        return total
