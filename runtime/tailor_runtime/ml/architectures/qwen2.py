"""Qwen2 and Qwen2.5: Llama's layer with biases on the q, k and v projections."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import ATTENTION, GATED_MLP, MOBILE_LLAMA_ONLY

QWEN2 = register(
    Architecture(
        family="qwen2",
        model_types=("qwen2",),
        description="Qwen2/2.5: q/k/v projection biases, GQA, tied embeddings on small sizes",
        lora_targets=ATTENTION + GATED_MLP,
        llama_cpp_arch="qwen2",
        refused={
            "quantize/int8_static": "static INT8 calibration of the exported graph failed on Qwen2 in testing (IndexError); use int8_dynamic or the onnx-int8 export",
            "export/executorch": MOBILE_LLAMA_ONLY,
            "export/coreml": MOBILE_LLAMA_ONLY,
        },
    )
)
