"""Training data for causal-LM fine-tuning: plain text, stories separated by blank lines.

The stories are tokenized one by one, each with its BOS (as the model saw its pretraining data), and
concatenated into a single token stream. Training batches are windows of seq_len + 1 tokens at start
positions drawn from a seeded generator: the same seed gives the same batches, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.text import read_stories, tokenize_stories


@dataclass(frozen=True)
class TokenStream:
    ids: Any  # 1-D torch.long tensor
    stories: int

    def __len__(self) -> int:
        return int(self.ids.numel())


def load_token_stream(path: Path, tokenizer: Any, seq_len: int) -> TokenStream:
    """Tokenized text of `path`; InvalidArgument (with the counts) if it cannot fill one window."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"training text {path} does not exist")
    try:
        stories = read_stories(path)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"training text {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    ids = tokenize_stories(tokenizer, stories)
    if len(ids) < seq_len + 1:
        raise InvalidArgument(
            f"training text {path} has {len(stories)} non-empty stories and {len(ids)} tokens; "
            f"need at least seq_len + 1 = {seq_len + 1} tokens (lower seq_len or add text)"
        )
    return TokenStream(torch.tensor(ids, dtype=torch.long), len(stories))


class BatchSampler:
    """Random (input, target) windows from a token stream; batch k depends only on (seed, k), so the
    same seed gives the same batches on any machine and a resumed run continues the same sequence."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int):
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed

    def batch(self, step: int) -> dict[str, Any]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.stream) - self.seq_len, (self.batch_size,), generator=generator)
        windows = torch.stack([self.stream.ids[s : s + self.seq_len + 1] for s in starts.tolist()])
        return {
            "input_ids": windows[:, :-1],
            "labels": windows[:, 1:],
            "real_tokens": windows[:, :-1].numel(),
        }

    def next_batch(self) -> tuple[Any, Any]:
        """A batch outside the training sequence (step 0), e.g. for a fixed evaluation."""
        batch = self.batch(0)
        return batch["input_ids"], batch["labels"]
