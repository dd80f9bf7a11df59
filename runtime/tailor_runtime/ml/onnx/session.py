"""OnnxCausalLM: an ONNX (or ORT format) decoder run by ONNX Runtime on CPU, called like an HF causal LM.

`model(input_ids=..., attention_mask=..., past_key_values=..., use_cache=...)` returns an object with
`.logits` (a float32 torch tensor) and `.past_key_values`, and `model.config` is the folder's HF config,
so the code written for PyTorch models (perplexity, agreement, the quantizer's accuracy gate, the
benchmarker's greedy decoding with a KV cache) runs an ONNX model unchanged. The cache is the graph's
`present` arrays, fed back as the next call's `past`: each new token costs one token of compute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tailor_runtime.errors import FailedPrecondition
from tailor_runtime.ml.onnx import INPUTS, past_names

# ONNX type string -> numpy dtype name, for the past inputs (float32, or float16 graphs).
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def session_options(threads: int) -> Any:
    """CPU session options: all graph optimizations, `threads` intra-op threads, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one decoder graph: there is nothing to run in parallel
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class OnnxCausalLM(torch.nn.Module):
    """A decoder graph file in a model folder, behind a torch.nn.Module forward."""

    def __init__(self, folder: Path, model_file: str, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoConfig

        super().__init__()
        folder = Path(folder)
        self.path = folder / model_file
        if not self.path.is_file():
            raise FailedPrecondition(f"{folder} declares an ONNX model but has no {model_file}")
        # The session uses as many threads as torch does in this process (the benchmarker sets both).
        self.threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(
            str(self.path), session_options(self.threads), providers=["CPUExecutionProvider"]
        )
        self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.layers = self.config.num_hidden_layers
        missing = [name for name in (*INPUTS, *past_names(self.layers)) if name not in inputs]
        if missing:
            raise FailedPrecondition(
                f"{self.path.name} lacks the inputs {missing[:4]} of a decoder with a KV cache (an export by an "
                "older Tailor?); export the model again"
            )
        self._outputs = [o.name for o in self.session.get_outputs()]
        past = inputs[past_names(1)[0]]
        self._past_dtype = _DTYPES[past.type]
        self._past_shape = past.shape  # [batch, kv_heads, past, head_dim]: heads and dim are numbers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        **_: Any,
    ) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        batch, length = ids.shape
        past = list(past_key_values) if past_key_values is not None else self._empty_past(batch)
        total = past[0].shape[2] + length
        mask = (
            attention_mask.detach().cpu().numpy().astype(np.int64)
            if attention_mask is not None
            else np.ones((batch, total), dtype=np.int64)
        )
        if position_ids is not None:
            positions = position_ids.detach().cpu().numpy().astype(np.int64)
        else:
            # As transformers' generate(): count the real tokens before each position (left padding).
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -length:]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(past_names(self.layers), past, strict=True))
        logits, *present = self.session.run(self._outputs, feeds)
        return CausalLMOutputWithPast(
            logits=torch.from_numpy(logits.astype(np.float32, copy=False)),
            past_key_values=tuple(present) if use_cache else None,
        )

    def _empty_past(self, batch: int) -> list[Any]:
        _, heads, _, dim = self._past_shape
        empty = np.zeros((batch, heads, 0, dim), dtype=self._past_dtype)
        return [empty] * (2 * self.layers)

    def weight_bytes(self) -> int:
        """Bytes of the graph's initializers (weights, constants); for an ORT format file, its size."""
        import onnx

        if self.path.suffix != ".onnx":
            return self.path.stat().st_size
        graph = onnx.load(str(self.path), load_external_data=False).graph
        total = 0
        for init in graph.initializer:
            count = 1
            for d in init.dims:
                count *= d
            total += onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize * count
        return total
