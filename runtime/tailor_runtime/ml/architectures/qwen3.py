"""Qwen3: RMSNorm on each head's queries and keys (q_norm, k_norm), explicit head_dim."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import ATTENTION, GATED_MLP, MOBILE_LLAMA_ONLY

QWEN3 = register(
    Architecture(
        family="qwen3",
        model_types=("qwen3",),
        description="Qwen3: per-head q/k RMSNorm, explicit head_dim, GQA",
        lora_targets=ATTENTION + GATED_MLP,
        llama_cpp_arch="qwen3",
        refused={"export/executorch": MOBILE_LLAMA_ONLY, "export/coreml": MOBILE_LLAMA_ONLY},
    )
)
