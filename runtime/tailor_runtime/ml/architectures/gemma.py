"""Gemma 2 and Gemma 3 (text): (1 + w) RMSNorms around each block, embeddings scaled by sqrt(hidden),
GeGLU MLP, attention and final-logit soft-capping (Gemma 2), local/global attention layers."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import ATTENTION, GATED_MLP, MOBILE_LLAMA_ONLY

GEMMA2 = register(
    Architecture(
        family="gemma2",
        model_types=("gemma2",),
        description="Gemma 2: (1+w) norms, scaled embeddings, GeGLU, logit soft-capping, sliding window",
        lora_targets=ATTENTION + GATED_MLP,
        llama_cpp_arch="gemma2",
        refused={"export/executorch": MOBILE_LLAMA_ONLY, "export/coreml": MOBILE_LLAMA_ONLY},
    )
)

GEMMA3 = register(
    Architecture(
        family="gemma3",
        model_types=("gemma3_text",),
        description="Gemma 3 (text): (1+w) norms, q/k norms, scaled embeddings, local/global attention",
        lora_targets=ATTENTION + GATED_MLP,
        llama_cpp_arch="gemma3",
        refused={"export/executorch": MOBILE_LLAMA_ONLY, "export/coreml": MOBILE_LLAMA_ONLY},
    )
)
