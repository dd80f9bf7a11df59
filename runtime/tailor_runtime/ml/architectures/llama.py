"""Llama 1, 2 and 3 (and Llama-layout models such as TinyLlama and SmolLM): RMSNorm, SwiGLU MLP, RoPE
(default or llama3 scaling), multi-head or grouped-query attention, tied or untied embeddings."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import ATTENTION, GATED_MLP

LLAMA = register(
    Architecture(
        family="llama",
        model_types=("llama",),
        description="Llama 1/2/3: RMSNorm, SwiGLU, RoPE (llama3 scaling), GQA, tied or untied embeddings",
        lora_targets=ATTENTION + GATED_MLP,
        llama_cpp_arch="llama",
    )
)
