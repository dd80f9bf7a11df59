"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP (top-k routed experts)."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import ATTENTION, MOBILE_LLAMA_ONLY, ONNX_FORMATS

# Everything these methods replace is a torch.nn.Linear; Mixtral's experts (most of its weights) are not.
FUSED_EXPERTS = (
    "transformers 5 stores Mixtral's experts as fused 3-D tensors, not Linear layers, so this method would "
    "quantize only attention and leave the experts (most of the weights) in full precision; Mixtral "
    "takes bf16 and fp16 here"
)
LINEAR_QUANTIZERS = (
    "int8_dynamic", "int8_static", "nf4", "fp4", "llm_int8", "rtn", "gptq", "awq", "smoothquant", "auto",
    "int8_weight_only", "fp8",
)  # fmt: skip

ONNX_MOE = (
    "torch.onnx's dynamo exporter cannot convert Mixtral's routed experts (tested); Mixtral has no export "
    "format here yet: fine-tune, cast (bf16, fp16) and benchmark it"
)

MIXTRAL = register(
    Architecture(
        family="mixtral",
        model_types=("mixtral",),
        description="Mixtral: mixture-of-experts MLP (routed experts stored as fused 3-D tensors)",
        # transformers 5 stores the experts as fused 3-D parameters, not Linear layers: LoRA adapts
        # attention (the router stays frozen).
        lora_targets=ATTENTION,
        llama_cpp_arch="llama",
        refused={
            **{f"quantize/{method}": FUSED_EXPERTS for method in LINEAR_QUANTIZERS},
            **{f"export/{fmt}": ONNX_MOE for fmt in ONNX_FORMATS},
            "export/executorch": MOBILE_LLAMA_ONLY,
            "export/coreml": MOBILE_LLAMA_ONLY,
        },
    )
)
