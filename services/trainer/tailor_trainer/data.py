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
    """Random (input, target) windows from a token stream, reproducible for a seed."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int):
        import torch

        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[Any, Any]:
        import torch

        starts = torch.randint(
            0, len(self.stream) - self.seq_len, (self.batch_size,), generator=self.generator
        )
        windows = torch.stack([self.stream.ids[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
