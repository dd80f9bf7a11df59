"""The planner's CPU estimates against measured peaks: each stage's real work (the trainer's finetune_lora,
the quantizer's method.run, the benchmarker's measuring child) in a fresh process, its peak RSS (VmHWM,
reset after the imports through /proc/self/clear_refs) minus its RSS after the imports, on stories260K
(real weights) and random-weight Llama (56M parameters) and Qwen2 (34M) models built from transformers'
config classes. Tolerances: docs/planning.md (the issue's bar is 15%; the cases that miss it say so)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tailor_runtime.planner import Machine, ModelShape, plan_stage

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT / "examples" / "models" / "stories260K"
TRAIN = ROOT / "examples" / "data" / "tinystories_train.txt"
EVAL = ROOT / "examples" / "data" / "tinystories_eval.txt"
CPU = Machine(name="test", memory_gb=64, cpu_cores=1)
QUICK_BENCHMARK = {"max_eval_tokens": 512, "context_length": 128, "stride": 64, "latency_new_tokens": 4,
                   "warmup": 0, "repetitions": 1, "threads": 1}  # fmt: skip
pytestmark = pytest.mark.integration

# Runs one stage function in this fresh process and prints its peak RSS over the post-import RSS.
RUNNER = r"""
import json, sys
from pathlib import Path
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
kind, args = sys.argv[1], json.loads(sys.argv[2])
import torch, transformers, peft  # noqa: E401,F401  the frameworks belong to the baseline
torch.set_num_threads(1)
if kind == "finetune":
    from tailor_trainer.lora import LoraTrainConfig, finetune_lora
elif kind == "quantize":
    import llmcompressor  # noqa: F401
    import tailor_quantizer.methods  # noqa: F401
    from tailor_quantizer.methods import registry
else:
    from tailor_benchmarker import child
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
baseline = status("VmRSS")
out = Path(args["out"])
if kind == "finetune":
    cfg = LoraTrainConfig(**args["config"])
    finetune_lora(Path(args["model"]), Path(args["train"]), out / "merged", out / "adapter", cfg, lambda *a, **k: None)
elif kind == "quantize":
    method = registry.get_method(args["method"])
    method.run(Path(args["model"]), out, method.Config(**args["config"]), registry.QuantizeJob(progress=lambda *a, **k: None))
else:  # the benchmarker's measuring child, in this process
    assert child.main(args["argv"]) == 0
print(json.dumps({"peak_over_baseline": status("VmHWM") - baseline}))
"""


def _measure(kind: str, **args) -> int:
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, kind, json.dumps(args)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_over_baseline"]


def _measure_benchmark(model: Path, tmp_path: Path) -> int:
    # Measured the same way as the other stages (VmHWM over the RSS after imports), for one method; the
    # child's own peak_rss_over_baseline_mb is now VmHWM too (it was ru_maxrss, the parent's, before).
    argv = ["--model", str(model), "--eval", str(EVAL), "--config", json.dumps(QUICK_BENCHMARK),
            "--out", str(tmp_path / "result.json")]  # fmt: skip
    return _measure("benchmark", out=str(tmp_path), argv=argv)


def _random_model(name: str, folder: Path) -> Path:
    import torch
    import transformers as tf

    configs = {
        "llama-56m": tf.LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                    num_key_value_heads=4, intermediate_size=1376, vocab_size=32000,
                                    max_position_embeddings=512),
        "qwen2-34m": tf.Qwen2Config(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                    num_key_value_heads=2, intermediate_size=1536, vocab_size=32000,
                                    tie_word_embeddings=True, max_position_embeddings=512),
    }  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(configs[name])
    model.save_pretrained(folder)
    # stories260K's tokenizer: its 512 ids are valid in the 32k vocabulary.
    for f in STORIES.glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    assert sum(p.numel() for p in model.parameters()) == _shape(folder).total_params
    return folder


def _shape(folder: Path) -> ModelShape:
    return ModelShape.from_config(json.loads((folder / "config.json").read_text()))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("plan-models")
    return {"stories260K": STORIES} | {n: _random_model(n, base / n) for n in ("llama-56m", "qwen2-34m")}


def _check(planned: int, measured: int, tolerance: float) -> None:
    error = (planned - measured) / measured
    print(f"planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB: {error:+.1%}")
    assert abs(error) <= tolerance, (
        f"planned {planned / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB"
    )


FINETUNE_CASES = [
    ("stories260K", {"steps": 2}, 0.15),
    pytest.param("llama-56m", {"steps": 2}, 0.15, marks=pytest.mark.slow),
    pytest.param("qwen2-34m", {"steps": 2}, 0.15, marks=pytest.mark.slow),
    pytest.param("llama-56m", {"steps": 2, "gradient_checkpointing": True}, 0.15, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "config", "tolerance"), FINETUNE_CASES)
def test_lora_peak_host_memory(models, tmp_path, name, config, tolerance):
    est = plan_stage(_shape(models[name]), "finetune", {"method": "lora", "config": config}, CPU)
    measured = _measure(
        "finetune", model=str(models[name]), train=str(TRAIN), out=str(tmp_path), config=config
    )
    _check(est.host_bytes, measured, tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stories260K", "llama-56m"])
def test_rtn_peak_host_memory(models, tmp_path, name):
    config = {"group_size": -1}  # per output channel: stories260K's MLP width (172) has few divisors
    est = plan_stage(_shape(models[name]), "quantize", {"method": "rtn", "config": config}, CPU)
    measured = _measure("quantize", model=str(models[name]), out=str(tmp_path), method="rtn", config=config)
    _check(est.host_bytes, measured, 0.15)


BENCHMARK_CASES = [
    ("stories260K", 0.15),
    pytest.param("llama-56m", 0.15, marks=pytest.mark.slow),
    pytest.param("qwen2-34m", 0.25, marks=pytest.mark.slow),  # misses 15%: docs/planning.md
]


@pytest.mark.parametrize(("name", "tolerance"), BENCHMARK_CASES)
def test_benchmark_peak_host_memory(models, tmp_path, name, tolerance):
    est = plan_stage(_shape(models[name]), "benchmark", {"candidate": "original"}, CPU,
                     benchmark_config=QUICK_BENCHMARK)  # fmt: skip
    _check(est.host_bytes, _measure_benchmark(models[name], tmp_path), tolerance)
