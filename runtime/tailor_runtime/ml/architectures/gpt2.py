"""GPT-2 (and DistilGPT-2): Conv1D projections (weights stored input-major), LayerNorm, GELU MLP,
learned absolute positions."""

from tailor_runtime.ml.architectures import Architecture, register
from tailor_runtime.ml.architectures._shared import MOBILE_LLAMA_ONLY

GPT2 = register(
    Architecture(
        family="gpt2",
        model_types=("gpt2",),
        description="GPT-2: Conv1D projections, LayerNorm, GELU, learned positions",
        lora_targets=("c_attn", "c_proj", "c_fc"),
        llama_cpp_arch="gpt2",
        refused={"export/executorch": MOBILE_LLAMA_ONLY, "export/coreml": MOBILE_LLAMA_ONLY},
    )
)
