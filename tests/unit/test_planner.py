"""The planner's counts and rules (no process runs here; measured peaks: tests/integration/test_plan_measured.py).

Parameter counts against transformers' own models of each family; the planner's defaults against the stage
configs; refusals and alternatives; the Llama-3-70B plan that docs/planning.md quotes (planned, not run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.families import tiny_config
from support.model_configs import LLAMA3_70B

from tailor_runtime.planner import GIB, Machine, ModelShape, alternatives, fits, plan_pipeline, plan_stage
from tailor_runtime.planner import stages as st

ROOT = Path(__file__).resolve().parents[2]
STORIES = json.loads((ROOT / "examples" / "models" / "stories260K" / "config.json").read_text())
H200_GIB = 141e9 / GIB  # NVIDIA's 141 GB


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"])
def test_parameter_count_equals_transformers(family):
    import transformers

    config = tiny_config(family)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(config.to_dict()).total_params == sum(p.numel() for p in model.parameters())


def test_lora_trainable_count_equals_peft():
    import peft
    import transformers

    config = tiny_config("llama")
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_config(config),
        peft.LoraConfig(
            r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert st.lora_trainable(ModelShape.from_config(config.to_dict()), 8, None) == trainable


def test_defaults_are_the_stage_configs():
    from tailor_benchmarker.config import BenchmarkConfig
    from tailor_runtime.ml import calibration
    from tailor_trainer.lora import LoraTrainConfig

    lora = LoraTrainConfig().model_dump()
    assert {k: lora[k] for k in st.LORA_DEFAULTS} == st.LORA_DEFAULTS
    bench = BenchmarkConfig().model_dump()
    assert {
        k: list(v) if isinstance(v, tuple) else v for k, v in bench.items() if k in st.BENCHMARK_DEFAULTS
    } == st.BENCHMARK_DEFAULTS
    assert st.CALIBRATION_DEFAULTS == {
        "samples": calibration.DEFAULT_SAMPLES,
        "seq_len": calibration.DEFAULT_SEQ_LEN,
    }


def test_the_planner_imports_no_torch():
    code = "import sys, tailor_runtime.planner; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_more_memory_for_larger_batches_and_less_with_checkpointing_or_qlora():
    shape, gpu = (
        ModelShape.from_config(LLAMA3_70B),
        Machine(memory_gb=2000, accelerator="H200", accelerator_memory_gb=H200_GIB),
    )
    base = plan_stage(shape, "finetune", {"method": "lora", "config": {}}, gpu).accelerator_bytes
    assert (
        plan_stage(shape, "finetune", {"method": "lora", "config": {"batch_size": 16}}, gpu).accelerator_bytes
        > base
    )
    assert (
        plan_stage(
            shape, "finetune", {"method": "lora", "config": {"gradient_checkpointing": True}}, gpu
        ).accelerator_bytes
        < base
    )
    assert plan_stage(shape, "finetune", {"method": "qlora", "config": {}}, gpu).accelerator_bytes < base / 2


def test_a_lora_that_does_not_fit_one_h200_names_qlora_as_what_fits():
    shape = ModelShape.from_config(LLAMA3_70B)
    h200 = Machine(memory_gb=2000, accelerator="NVIDIA H200", accelerator_memory_gb=H200_GIB)
    est = plan_stage(shape, "finetune", {"method": "lora", "config": {}}, h200)
    ok, why = fits(est, h200)
    assert not ok and "GiB on the GPU, NVIDIA H200 has 131.3 GiB" in why
    labels = [label for label, _ in alternatives(shape, "finetune", {"method": "lora", "config": {}}, h200)]
    assert "method: qlora" in labels
    assert all(fits(e, h200)[0] for _, e in alternatives(shape, "finetune", {"method": "lora"}, h200))


def test_a_cpu_worker_counts_everything_in_host_memory():
    shape = ModelShape.from_config(STORIES)
    est = plan_stage(shape, "finetune", {"method": "lora", "config": {}}, Machine(memory_gb=0.05))
    assert est.device == "cpu" and est.accelerator_bytes == 0
    assert not fits(est, Machine(memory_gb=0.05))[0]  # 50 MiB: below the ~90 MiB LoRA needs
    assert fits(est, Machine(memory_gb=1))[0]


def test_a_pipeline_plan_follows_the_dag_widths():
    stages = [("finetune", "finetune", {"method": "lora", "config": {}}),
              ("quantize/rtn", "quantize", {"method": "rtn", "candidate": "rtn"}),
              ("benchmark/rtn", "benchmark", {"candidate": "rtn"}),
              ("select", "select", {})]  # fmt: skip
    planned = {name: plans for name, _, _, plans in plan_pipeline(LLAMA3_70B, stages, {})}
    assert set(planned) == {"finetune", "quantize/rtn", "benchmark/rtn"}  # select holds no model
    quantize = planned["quantize/rtn"][0][1]
    assert (
        quantize.terms["loaded model"] == ModelShape.from_config(LLAMA3_70B).total_params * 4
    )  # merged fp32


SEVENTY_B_STAGES = [
    ("finetune lora", "finetune", {"method": "lora", "config": {}}),
    ("finetune qlora", "finetune", {"method": "qlora", "config": {}}),
    ("finetune qlora, checkpointing, seq 2048, batch 1", "finetune",
     {"method": "qlora", "config": {"gradient_checkpointing": True, "seq_len": 2048, "batch_size": 1}}),
    ("quantize gptq (128 x 512)", "quantize", {"method": "gptq", "config": {}}),
    ("quantize rtn", "quantize", {"method": "rtn", "config": {}}),
    ("benchmark bf16 original", "benchmark", {"candidate": "original"}),
    ("benchmark gptq (+ bf16 reference)", "benchmark", {"candidate": "gptq", "method": "gptq"}),
    ("export gguf", "export", {"format": "gguf"}),
]  # fmt: skip


def seventy_b_table() -> list[tuple]:
    """(stage, GPUs, GPU peak GiB per GPU, host GiB, disk GiB, hours, fits) on 1, 2, 4, 8 H200s with 2 TB RAM."""
    shape = ModelShape.from_config(LLAMA3_70B)
    rows = []
    for label, kind, params in SEVENTY_B_STAGES:
        for gpus in (1, 2, 4, 8):
            m = Machine(name="h200", memory_gb=2000, cpu_cores=64, accelerator="NVIDIA H200",
                        accelerator_memory_gb=H200_GIB, gpus=gpus)  # fmt: skip
            est = plan_stage(shape, kind, params, m)
            rows.append((label, gpus, est.gib("accelerator") / gpus, est.gib("host"), est.gib("disk"),
                         est.seconds / 3600, fits(est, m)[0]))  # fmt: skip
    return rows


def test_the_70b_plan_quoted_in_docs_planning():
    shape = ModelShape.from_config(LLAMA3_70B)
    assert round(shape.total_params / 1e9, 2) == 70.55  # Meta's model card: 70.6B
    rows = {(r[0], r[1]): r for r in seventy_b_table()}
    for r in rows.values():
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f} | {'yes' if r[6] else 'no'} |"
        )
    assert not rows[("finetune lora", 1)][6] and rows[("finetune lora", 2)][6]
    assert rows[("finetune qlora", 1)][6]
    assert not rows[("benchmark bf16 original", 1)][6] and rows[("benchmark bf16 original", 2)][6]
    assert rows[("quantize gptq (128 x 512)", 1)][6]
