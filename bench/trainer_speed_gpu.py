"""Fine-tuning speed on a GPU: Tailor's trainer against plain Hugging Face PEFT + Trainer, same run.

Model: the Llama-2-7B architecture (published config) with RANDOM weights (speed and memory only).
Data: the real lengths of `../shared/data/sft/alpaca/alpaca_5000.json` rendered with the Alpaca prompt.
The Llama-2 tokenizer is not available offline, so lengths are characters / 4 (about 4 characters per
Llama-2 token on English) and token ids are random; the prompt part of each example carries no loss in
both paths. Capped at 512 tokens.

  baseline   transformers.Trainer + peft on the SAME packed rows x seq len as Tailor (issue 15): position
             ids reset per document, block-diagonal mask, SDPA, bf16, fused AdamW, gradient checkpointing,
             r=16 on all linear layers
  padded     (--paths ...,padded, a labelled extra) Trainer + peft on batches of 4 examples padded to the
             longest: the issue-4 baseline, which no practitioner runs once packing exists
  tailor     the trainer's own path (tailor_trainer.lora.build_peft_model + datasets.ExampleBatches +
             loop.train): examples packed into rows of 512 with a block-diagonal mask (no padding), 3 rows
             per step (--rows; with 4 the LoRA peak is 0.24 GB above the baseline's), gradient
             checkpointing, r=16 on all linear layers, Liger's RMSNorm, SwiGLU and fused linear
             cross-entropy when installed, the output projection only on positions with a label

Each (method, path) runs in its own process, so peak GPU memory (torch.cuda.max_memory_allocated) is its
own. Tokens per second count real (non-padding) tokens; padded tokens are reported for the baseline.

  python3 bench/trainer_speed_gpu.py --out $OUT/trainer_speed.json          # on the H100
  python3 bench/trainer_speed_gpu.py --small --device cpu --steps 3         # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("runtime", "services/trainer"):
    sys.path.insert(0, str(ROOT / sub))

ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca" / "alpaca_5000.json"
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
SMALL = {
    **LLAMA2_7B,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1000,
}
SEQ = 512
CHARS_PER_TOKEN = 4


def examples(vocab: int, seed: int = 0):
    """(input_ids, labels) per Alpaca record: random ids, real lengths, prompt masked."""
    import os

    alpaca = Path(os.environ.get("TAILOR_ALPACA", ALPACA))
    from tailor_trainer.datasets import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE, Example

    rng = random.Random(seed)
    out = []
    for r in json.loads(alpaca.read_text()):
        template = ALPACA_PROMPT if r.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=r["instruction"], input=r.get("input", ""))
        n_prompt = 1 + max(1, len(prompt) // CHARS_PER_TOKEN)  # + BOS
        n_response = max(1, len(r["output"]) // CHARS_PER_TOKEN) + 1  # + EOS
        n_prompt = min(n_prompt, SEQ - 2)
        n_response = min(n_response, SEQ - n_prompt)
        ids = [rng.randrange(3, vocab) for _ in range(n_prompt + n_response)]
        out.append(Example(ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    return out


def build_model(folder: Path, method: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "qlora":
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qc, device_map={"": 0}, dtype=torch.bfloat16
        )
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)


def run_baseline(
    folder: Path,
    method: str,
    device: str,
    steps: int,
    warmup: int,
    rows: int,
    padded: bool = False,
    flex: bool = False,
) -> dict:
    """transformers.Trainer + peft, bf16 autocast, gradient checkpointing.

    Packed (the default, what a practitioner runs): the same packed rows as Tailor's path, in the same
    order (datasets.ExampleBatches, same seed), position ids reset per document and the block-diagonal
    4-D mask, through SDPA (flash-attn is not installed on the device; transformers 5.17 does not infer
    document boundaries from reset position ids with SDPA or flex_attention: measured on CPU, a packed
    document's logits then differ from the document alone by 0.5-0.7, so the explicit mask is the only
    correct padding-free path there). Padded (--baseline-padded, a labelled extra): batches of 4
    examples padded to the longest, the old issue-4 baseline. Flex (path baseline+flex, a labelled
    extra): what a practitioner can switch on too, `attn_implementation="flex_attention"` and a
    document BlockMask built in the collator instead of the dense mask."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tailor_trainer.datasets import IGNORE, ExampleBatches, split

    model = build_model(folder, method, device)
    if flex:
        model.set_attn_implementation("flex_attention")
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")
    )
    train_set, _ = split(examples(model.config.vocab_size), 0.0, 0)
    batches = ExampleBatches(train_set, 4 if padded else rows, SEQ, packing=not padded, seed=0, pad_id=0)
    data = list(range(1, steps + warmup + 1))  # the step numbers; the collator builds each step's batch

    def collate(items):
        batch = batches.batch(items[0])
        # Tailor's labels are shifted (labels[t] is token t+1's); the model's own loss shifts them itself.
        labels = torch.full_like(batch["labels"], IGNORE)
        labels[:, 1:] = batch["labels"][:, :-1]
        out = {"input_ids": batch["input_ids"], "labels": labels, "position_ids": batch["position_ids"]}
        out["attention_mask"] = batch["attention_mask"]
        if flex:
            from tailor_trainer.speed import document_block_mask

            out["attention_mask"] = document_block_mask(batch["position_ids"].to(device))
        out["_real"] = batch["real_tokens"]
        return out

    marks: dict = {"real": 0, "padded": 0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == warmup:
                torch.cuda.synchronize() if device == "cuda" else None
                marks["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps + warmup:
                torch.cuda.synchronize() if device == "cuda" else None
                marks["t1"] = time.perf_counter()

    class Counting(Trainer):
        def training_step(self, model, inputs, *a, **k):
            real = inputs.pop("_real")
            if self.state.global_step >= warmup:
                marks["real"] += int(real)
                marks["padded"] += inputs["input_ids"].numel()
            return super().training_step(model, inputs, *a, **k)

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=1,
        max_steps=steps + warmup,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=device == "cuda",
        learning_rate=2e-4,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        seed=0,
    )
    Counting(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
    seconds = marks["t1"] - marks["t0"]
    return {
        "baseline": ("padded batch 4" if padded else f"packed {rows} x {SEQ}") + (", flex" if flex else ""),
        "real_tokens_per_s": marks["real"] / seconds,
        "padded_tokens_per_s": marks["padded"] / seconds,
        "padding_share": 1 - marks["real"] / marks["padded"],
        "seconds": seconds,
    }


def run_tailor(
    folder: Path,
    method: str,
    device: str,
    steps: int,
    warmup: int,
    fused: bool,
    rows: int,
    trace_memory: bool = False,
    levers: frozenset = frozenset(),
) -> dict:
    import torch

    from tailor_trainer.datasets import ExampleBatches, split
    from tailor_trainer.loop import FUSED_LOSS_ATTR, train
    from tailor_trainer.lora import LoraTrainConfig, build_peft_model

    model = build_model(folder, method, device)
    cfg = LoraTrainConfig(
        r=16,
        alpha=32,
        gradient_checkpointing=True,
        fused_kernels=fused,
        seq_len=SEQ,
        batch_size=rows,
        quantize_base="nf4" if method == "qlora" else None,
        attention="flex" if "flex" in levers else "sdpa",
        compile_layers="compile" in levers,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = build_peft_model(model, cfg, targets)
    # What build_peft_model actually did (False without liger-kernel or off a GPU), not what was asked.
    fused_applied = bool(getattr(model.get_base_model(), FUSED_LOSS_ATTR, False))
    train_set, _ = split(examples(model.config.vocab_size), 0.0, 0)
    batches = ExampleBatches(train_set, cfg.batch_size, SEQ, packing=True, seed=0, pad_id=0)
    marks: dict = {"real": 0}
    from tailor_trainer.speed import pad_to_width

    def batch_at(step):
        batch = batches.batch(step)
        if cfg.compile_layers:  # what finetune_lora does with compiled layers: one shape for every step
            batch = pad_to_width(batch, SEQ, 0)
        if step == 1:
            marks["start"] = time.perf_counter()
        if step == warmup + 1:
            torch.cuda.synchronize() if device == "cuda" else None
            marks["t0"] = time.perf_counter()
        if step > warmup:
            marks["real"] += batch["real_tokens"]
        return batch

    params = [p for p in model.parameters() if p.requires_grad]
    to_device = lambda b: {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}  # noqa: E731
    phases: list = []

    def trace(*args, **metrics) -> None:  # --trace-memory: the peak of each phase (setup, then each step)
        if device == "cuda" and trace_memory:
            phases.append([metrics.get("step", 0), torch.cuda.max_memory_allocated() / 1e9])
            torch.cuda.reset_peak_memory_stats()

    trace()
    result = train(model, params, batch_at, steps + warmup, 2e-4, trace, to_device=to_device)
    torch.cuda.synchronize() if device == "cuda" else None
    seconds = time.perf_counter() - marks["t0"]
    return {
        "real_tokens_per_s": marks["real"] / seconds,
        "seconds": seconds,
        # The untimed warm-up steps: with compiled layers, they include the compilation.
        "warmup_seconds": marks["t0"] - marks["start"],
        "levers": sorted(levers),
        "losses": result.losses,
        # Graphs the compiler built in the whole run (warm-up and timed steps): more than the warm-up's
        # means a step recompiled inside the timed window.
        "compiled_graphs": dict(torch._dynamo.utils.counters["stats"]),
        "packed_rows": len(batches.rows),
        "examples": len(train_set),
        "fused_kernels": fused_applied,
        **({"peak_gb_by_phase": phases} if phases else {}),
    }


def child(args) -> None:
    import torch

    global SEQ
    SEQ = args.seq

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    path, *levers = args.path.split("+")  # e.g. tailor+flex+compile, baseline+flex
    unknown = set(levers) - {"flex", "compile"}
    if unknown:
        raise SystemExit(f"unknown levers {sorted(unknown)} in {args.path}")
    if path in ("baseline", "padded"):
        result = run_baseline(
            Path(args.folder),
            args.method,
            args.device,
            args.steps,
            args.warmup,
            args.rows,
            path == "padded",
            flex="flex" in levers,
        )
    else:
        result = run_tailor(
            Path(args.folder),
            args.method,
            args.device,
            args.steps,
            args.warmup,
            not args.no_fused,
            args.rows,
            args.trace_memory,
            frozenset(levers),
        )
    if args.device == "cuda":  # with --trace-memory the peak was reset per phase: the largest of them
        phases = [peak for _, peak in result.get("peak_gb_by_phase", [])]
        result["peak_gpu_gb"] = max([torch.cuda.max_memory_allocated() / 1e9, *phases])
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-fused", action="store_true")
    parser.add_argument(
        "--rows",
        type=int,
        default=3,
        help="Tailor's packed rows of 512 per step: 3 (1536 tokens) keeps its peak memory under the baseline's",
    )
    parser.add_argument(
        "--seq", type=int, default=SEQ, help="tokens per packed row (512; 4096: long context)"
    )
    parser.add_argument(
        "--paths",
        default="baseline,tailor",
        help="baseline (HF Trainer + PEFT on the same packed rows), tailor, padded (the old padded batch-4 "
        "extra); +flex (FlexAttention document mask) and +compile (Tailor: compiled decoder layers) add "
        "levers, e.g. tailor+flex+compile, baseline+flex. Per method: lora:PATHS;qlora:PATHS overrides",
    )
    parser.add_argument("--trace-memory", action="store_true", help="Tailor's peak GPU memory per phase")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--child-timeout", type=float, default=300, help="seconds per (method, path) run")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--path")
    parser.add_argument("--method")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # --model-dir: the random model saved once and reused by the next invocations of a session.
    folder = args.model_dir or Path(tempfile.mkdtemp(prefix="llama7b-random-"))
    if not (folder / "config.json").exists():
        started = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(args.device):
            model = LlamaForCausalLM(LlamaConfig(**(SMALL if args.small else LLAMA2_7B))).to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
        print(f"random model saved in {time.perf_counter() - started:.0f}s", flush=True)
    results = []
    env = environment(args)
    per_method = dict(part.split(":", 1) for part in args.paths.split(";") if ":" in part)
    for method in args.methods.split(","):
        for path in filter(None, per_method.get(method, args.paths).split(",")):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--path",
                path,
                "--method",
                method,
                "--folder",
                str(folder),
                "--device",
                args.device,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            if args.no_fused:
                cmd.append("--no-fused")
            cmd += ["--rows", str(args.rows), "--seq", str(args.seq)] + (
                ["--trace-memory"] if args.trace_memory else []
            )
            row = {"method": method, "path": path, "rows": args.rows, "seq": args.seq}
            try:  # a hung or slow variant must not take the rest of the call with it
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                row.update(json.loads(line[7:]) if line else {"error": proc.stderr[-2000:]})
            except subprocess.TimeoutExpired as exc:
                row["error"] = f"timed out after {exc.timeout} s"
            print(
                json.dumps({k: v for k, v in row.items() if k not in ("peak_gb_by_phase", "losses")}),
                flush=True,
            )
            results.append(row)
            if args.out:  # after every row: a call cut short still brings back what it measured
                args.out.write_text(json.dumps({"environment": env, "results": results}, indent=2))
    by = {(r["method"], r["path"]): r for r in results}
    print(
        "\n| method | path | real tokens/s | padded tokens/s | peak GPU GB | warm-up s | vs baseline |"
        "\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        base = by.get((r["method"], "baseline"), {})
        ratio = (
            r.get("real_tokens_per_s", 0) / base["real_tokens_per_s"] if base.get("real_tokens_per_s") else 0
        )
        print(
            f"| {r['method']} | {r['path']} | {r.get('real_tokens_per_s', 0):,.0f} | "
            f"{r.get('padded_tokens_per_s', 0):,.0f} | {r.get('peak_gpu_gb', 0):.2f} | "
            f"{r.get('warmup_seconds', 0):.1f} | {ratio:.2f}x |" + (" ERROR" if "error" in r else "")
        )


def environment(args) -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": __import__("peft").__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": "Llama-2-7B architecture, RANDOM weights" if not args.small else "small random Llama",
    }


if __name__ == "__main__":
    main()
