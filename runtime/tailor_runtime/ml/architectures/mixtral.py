"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP (top-k routed experts)."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import ATTENTION, MOBILE_LLAMA_ONLY

MIXTRAL = register(
    Architecture(
        family="mixtral",
        model_types=("mixtral",),
        description="Mixtral: mixture-of-experts MLP (routed experts stored as fused 3-D tensors)",
        # transformers 5 stores the experts as fused 3-D parameters, not Linear layers: LoRA adapts
        # attention (the router stays frozen).
        lora_targets=ATTENTION,
        llama_cpp_arch="llama",
        refused={"export/executorch": MOBILE_LLAMA_ONLY, "export/coreml": MOBILE_LLAMA_ONLY},
    )
)
