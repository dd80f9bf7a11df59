"""Does a GGUF compute what its PyTorch source computes? Two checks, numbers reported the way ONNX's are.

* Dequantized: the GGUF's tensors decoded back into a PyTorch Llama (`tailor_runtime.ml.gguf_io`) against
  the source, on the same left-padded sample batches as the ONNX check. This checks the file itself (names,
  Q/K permutation, quantization error) and runs wherever gguf-py does.
* llama.cpp: the file loaded by llama.cpp (llama-cpp-python) and run on the sample texts with the source
  tokenizer's ids: logits at every position against the source's, whether llama.cpp's own tokenizer gives
  the same ids, and greedy generation from a few prompts against the source's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tailor_exporter.onnx_verify import SAMPLE_TEXT, reference_logits

# Story openings: the greedy continuations are compared token by token.
GREEDY_PROMPTS = (
    "Once upon a time",
    "One day, a little boy named Tom",
    "The cat sat on the",
    "Lily and her mom went to the park. They",
)


def logit_stats(got: Any, want: Any) -> dict[str, Any]:
    """max/mean |difference| and top-1 agreement of two [positions, vocab] float arrays."""
    import numpy as np

    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()),  # NaN stays NaN, and then fails every tolerance
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "positions": int(got.shape[0]),
    }


def compare_dequantized(gguf_model: Any, source: Any, batches: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The dequantized GGUF model against the source at the unpadded positions of `batches`."""
    import numpy as np

    got, want = [], []
    for ids, mask in batches:
        valid = mask.numpy().astype(bool)
        got.append(reference_logits(gguf_model, ids, mask)[valid])
        want.append(reference_logits(source, ids, mask)[valid])
    return logit_stats(np.concatenate(got), np.concatenate(want))


def greedy_source(model: Any, prompt_ids: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens from the PyTorch model, without stopping at EOS (fixed length to compare)."""
    import torch

    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    past = None
    with torch.inference_mode():
        for _ in range(steps):
            step = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = step.past_key_values
            out.append(int(step.logits[0, -1].argmax()))
            ids = torch.tensor([[out[-1]]])
    return out


def greedy_llama_cpp(llm: Any, prompt_ids: list[int], steps: int) -> list[int]:
    """The same in llama.cpp: evaluate the prompt, then feed back the argmax of the last logits."""
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def open_llama_cpp(path: Path, n_ctx: int) -> Any:
    from llama_cpp import Llama

    # logits_all keeps every position's logits (llm.scores), not only the last one's.
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)


def compare_llama_cpp(path: Path, source: Any, tokenizer: Any, greedy_steps: int) -> dict[str, Any]:
    """llama.cpp running the GGUF against the PyTorch source: logits, tokenizer and greedy tokens."""
    import numpy as np

    texts = [tokenizer(t)["input_ids"] for t in SAMPLE_TEXT]
    prompts = [tokenizer(p)["input_ids"] for p in GREEDY_PROMPTS]
    context = source.config.max_position_embeddings
    n_ctx = min(context, max(len(t) for t in texts + [p + [0] * greedy_steps for p in prompts]) + 8)
    llm = open_llama_cpp(path, n_ctx)
    try:
        got, want = [], []
        for ids in texts:
            llm.reset()
            llm.eval(ids)
            got.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
            want.append(reference_logits(source, _tensor(ids), _tensor([1] * len(ids)))[0])
        stats = logit_stats(np.concatenate(got), np.concatenate(want))
        # llama.cpp's tokenizer (SPM, from the GGUF's vocabulary) against the source tokenizer's ids.
        same = [
            llm.tokenize(t.encode(), add_bos=True, special=False) == ids
            for t, ids in zip(SAMPLE_TEXT, texts, strict=True)
        ]
        agree, identical, runs = 0, 0, []
        for ids in prompts:
            mine, theirs = greedy_llama_cpp(llm, ids, greedy_steps), greedy_source(source, ids, greedy_steps)
            prefix = next(
                (i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b), greedy_steps
            )
            agree += prefix
            identical += prefix == greedy_steps
            runs.append({"prompt_tokens": len(ids), "agreeing_prefix": prefix})
    finally:
        llm.close()
    return {
        **stats,
        "tokenizer_agreement": sum(same) / len(same),
        # Share of generated tokens equal to the source's, position by position up to the first divergence.
        "greedy_agreement": agree / (greedy_steps * len(prompts)),
        "greedy_identical_prompts": identical,
        "greedy_prompts": len(prompts),
        "greedy_steps": greedy_steps,
        "greedy_runs": runs,
    }


def _tensor(row: list[int]) -> Any:
    import torch

    return torch.tensor([row], dtype=torch.long)
