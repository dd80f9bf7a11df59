"""Mistral: Llama's layer with grouped-query attention and an optional sliding window."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import ATTENTION, GATED_MLP, MOBILE_LLAMA_ONLY

MISTRAL = register(
    Architecture(
        family="mistral",
        model_types=("mistral",),
        description="Mistral: Llama's layer, grouped-query attention, optional sliding-window attention",
        lora_targets=ATTENTION + GATED_MLP,
        llama_cpp_arch="llama",  # convert_hf_to_gguf.py writes Mistral as a llama model
        refused={"export/executorch": MOBILE_LLAMA_ONLY, "export/coreml": MOBILE_LLAMA_ONLY},
    )
)
