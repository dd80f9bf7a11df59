"""GPT-2 (and DistilGPT-2): Conv1D projections (weights stored input-major), LayerNorm, GELU MLP,
learned absolute positions."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import (
    LINEAR_ONLY_METHODS,
    MOBILE_LLAMA_ONLY,
    ONNX_FORMATS,
)

CONV1D = (
    "llm-compressor quantizes torch.nn.Linear layers, and GPT-2 stores its projections as transformers' "
    "Conv1D (input-major weights), which compressed-tensors cannot describe; quantize GPT-2 with "
    "nf4, fp4 or llm_int8"
)
INT8_DYNAMIC_CONV1D = (
    "int8_dynamic replaces torch.nn.Linear layers and writes a compressed-tensors description of them "
    "for transformers, and GPT-2's projections are Conv1D layers (input-major weights); quantize GPT-2 "
    "with nf4, fp4 or llm_int8"
)

ONNX_GPT2 = (
    "Tailor's ONNX decoder export fails on GPT-2's cache layout (torch.onnx dynamo export, tested); GPT-2 "
    "has no export format here yet: fine-tune, quantize (nf4, fp4, llm_int8) and benchmark it"
)

GPT2 = register(
    Architecture(
        family="gpt2",
        model_types=("gpt2",),
        description="GPT-2: Conv1D projections, LayerNorm, GELU, learned positions",
        lora_targets=("c_attn", "c_proj", "c_fc"),
        llama_cpp_arch="gpt2",
        refused={
            **{f"quantize/{method}": CONV1D for method in LINEAR_ONLY_METHODS},
            "quantize/int8_dynamic": INT8_DYNAMIC_CONV1D,
            **{f"export/{fmt}": ONNX_GPT2 for fmt in ONNX_FORMATS},
            "quantize/int8_static": ONNX_GPT2,
            "export/executorch": MOBILE_LLAMA_ONLY,
            "export/coreml": MOBILE_LLAMA_ONLY,
        },
    )
)
