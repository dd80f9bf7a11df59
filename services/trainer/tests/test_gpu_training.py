"""Fine-tuning on a CUDA GPU: the NCCL data-parallel path and bf16 mixed precision.

Run through the device tool (CI has no GPU and deselects them; without a GPU they are skipped, never
counted as passing):
    python -m pytest -m gpu services/trainer/tests/test_gpu_training.py
One GPU allows one NCCL rank: that runs the whole data-parallel machinery (spawned rank process, NCCL
process group, the token-weighted all-reduce, rank 0 publishing) but not a second GPU.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from tailor_runtime.progress import no_progress
from tailor_trainer.lora import LoraTrainConfig, finetune_lora, lora_rank
from tailor_trainer.parallel import launch

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
TRAIN = REPO / "examples" / "data" / "tinystories_train.txt"
CONFIG = LoraTrainConfig(steps=6, batch_size=4, seq_len=128, merge=False, checkpoint_every=0, seed=3)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def test_one_nccl_rank_ends_where_one_process_ends(tmp_path):
    single = finetune_lora(MODEL, TRAIN, tmp_path / "m1", tmp_path / "a1", CONFIG, no_progress)
    metrics = launch(
        1,
        lora_rank,
        (MODEL, TRAIN, tmp_path / "m2", tmp_path / "a2", CONFIG),
        no_progress,
        backend="nccl",
    )
    assert multiprocessing.active_children() == []
    assert single["device"] == "cuda" and metrics["device"] == "cuda:0"
    gap = max(abs(a - b) for a, b in zip(metrics["loss_curve"], single["loss_curve"], strict=True))
    print(f"one NCCL rank vs one process: loss gap {gap:.2e}")
    # bf16 on a GPU: the same kernels, but atomics in some backward kernels may sum in another order.
    assert gap < 1e-3
    assert (tmp_path / "a2" / "adapter_model.safetensors").exists()


def test_fused_linear_cross_entropy_lowers_peak_memory_and_keeps_loss_and_gradients():
    """batch_loss with Liger's fused linear cross-entropy against the plain logits path, on a random
    Llama (speed and memory only) with LoRA on all linear layers and gradient checkpointing."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (requirements-gpu.txt)")
    from tailor_trainer.loop import FUSED_LOSS_ATTR, batch_loss
    from tailor_trainer.lora import build_peft_model

    torch.manual_seed(0)
    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8)
    with torch.device("cuda"):
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32000, **shape)).to(torch.bfloat16)
    cfg = LoraTrainConfig(r=16, gradient_checkpointing=True, fused_kernels=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = build_peft_model(base, cfg, targets)
    assert getattr(base, FUSED_LOSS_ATTR)
    model.train()
    ids = torch.randint(3, 32000, (2, 1024), device="cuda")
    batch = {"input_ids": ids, "labels": ids.clone()}
    probe = next(p for n, p in model.named_parameters() if "lora_B" in n)  # lora_A's gradient starts at 0

    def step(fused: bool) -> tuple[float, int, torch.Tensor]:
        setattr(base, FUSED_LOSS_ATTR, fused)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = batch_loss(model, batch)
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), torch.cuda.max_memory_allocated(), probe.grad.detach().clone()

    step(True)  # warm-up (Triton compiles its kernels)
    plain_loss, plain_peak, plain_grad = step(False)
    fused_loss, fused_peak, fused_grad = step(True)
    print(f"peak: plain logits {plain_peak / 1e6:.0f} MB, fused {fused_peak / 1e6:.0f} MB")
    assert fused_peak < plain_peak - 100e6  # 2048 positions x 32k vocabulary: far more than 100 MB
    assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(fused_grad.flatten(), plain_grad.flatten(), dim=0)
    assert cosine > 0.99


def test_fused_kernels_change_only_their_model_and_a_later_cpu_model_still_runs():
    """Liger patches module globals of transformers' modeling code; apply_fused_kernels puts them back,
    so a model built afterwards (here on the CPU, where Triton cannot run) is plain PyTorch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (requirements-gpu.txt)")
    from tailor_trainer.lora import apply_fused_kernels

    before = dict(vars(modeling_llama))
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    with torch.device("cuda"):
        gpu_model = LlamaForCausalLM(config)
    assert apply_fused_kernels(gpu_model)
    assert {k: v for k, v in vars(modeling_llama).items() if before.get(k) is not v} == {}
    assert gpu_model.model.norm._get_name() == "LigerRMSNorm"  # this instance is patched
    ids = torch.randint(0, 512, (1, 16))
    assert gpu_model(ids.cuda()).logits.shape == (1, 16, 512)
    cpu_model = LlamaForCausalLM(config)
    assert torch.isfinite(cpu_model(ids).logits).all()


@pytest.mark.parametrize(
    "family", ["llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2"]
)
def test_fused_kernels_keep_the_loss_in_every_family(family, tmp_path):
    """Liger's kernels (its per-family RMSNorm/SwiGLU/GeGLU and the fused linear cross-entropy, soft-capped
    for Gemma 2) against the model's plain modules and loss, on a tiny model of each family in bf16."""
    import torch
    from support.families import tiny_model
    from transformers import AutoModelForCausalLM

    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (requirements-gpu.txt)")
    from tailor_trainer.loop import FUSED_LOSS_ATTR, IGNORE, batch_loss
    from tailor_trainer.lora import build_peft_model, resolve_target_modules

    folder = tiny_model(family, tmp_path / family, seed=3)

    def loss(fused: bool) -> float:
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
        with torch.no_grad():
            base.get_output_embeddings().weight.mul_(100.0)  # logits of tens, where a cap bites
        cfg = LoraTrainConfig(r=4, fused_kernels=fused)
        model = build_peft_model(base, cfg, resolve_target_modules(base, None))
        assert getattr(base, FUSED_LOSS_ATTR, False) == fused  # the fused loss is the one measured
        torch.manual_seed(0)
        ids = torch.randint(3, 512, (2, 64), device="cuda")
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = IGNORE
        with torch.no_grad():
            return float(batch_loss(model, {"input_ids": ids, "labels": labels}))

    plain, fused = loss(False), loss(True)
    print(f"{family}: plain {plain:.4f}, fused {fused:.4f}")
    assert fused == pytest.approx(plain, rel=2e-2)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "phi3", "gemma2", "gpt2", "mixtral"])
def test_qlora_trains_every_family_on_the_gpu(family, tmp_path):
    """QLoRA (bitsandbytes NF4 base on CUDA) on a tiny model of each family: trains, merges into the
    float base, and the merged folder loads."""
    import math

    from support.families import tiny_model

    from tailor_runtime.ml import architectures
    from tailor_runtime.ml.model_io import load_causal_lm

    folder = tiny_model(family, tmp_path / family)
    cfg = LoraTrainConfig(steps=3, batch_size=2, seq_len=64, quantize_base="nf4")
    metrics = finetune_lora(folder, TRAIN, tmp_path / "m", tmp_path / "a", cfg, no_progress)
    assert all(math.isfinite(x) for x in metrics["loss_curve"]) and metrics["steps"] == 3
    load_causal_lm(tmp_path / "m")
    assert architectures.for_folder(tmp_path / "m").family == {"llama3": "llama"}.get(family, family)
