"""Phi-3 (and Phi-3.5, Phi-4-mini): q, k and v in one qkv_proj, gate and up in one gate_up_proj."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import MOBILE_LLAMA_ONLY

PHI3 = register(
    Architecture(
        family="phi3",
        model_types=("phi3",),
        description="Phi-3: fused qkv_proj and gate_up_proj, RoPE (optionally partial or longrope)",
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
        llama_cpp_arch="phi3",
        refused={"export/executorch": MOBILE_LLAMA_ONLY, "export/coreml": MOBILE_LLAMA_ONLY},
    )
)
