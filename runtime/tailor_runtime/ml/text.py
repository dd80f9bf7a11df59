"""Plain-text corpora as Tailor uses them: documents ("stories") separated by blank lines."""

from __future__ import annotations

import re
from pathlib import Path

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def split_stories(text: str) -> list[str]:
    """Documents of `text`, separated by one or more blank lines, stripped, empty ones dropped."""
    return [s.strip() for s in _BLANK_LINE.split(text.replace("\r\n", "\n")) if s.strip()]


def read_stories(path: Path) -> list[str]:
    return split_stories(Path(path).read_text(encoding="utf-8"))


def tokenize_stories(tokenizer, stories: list[str], max_tokens: int | None = None) -> list[int]:
    """One token stream: each story encoded with its BOS (as llama2.c's pretokenizer does), concatenated.

    Stops once `max_tokens` tokens are collected (the last story is cut), so callers can bound the work.
    """
    ids: list[int] = []
    for story in stories:
        # verbose=False: a story longer than the model's context is expected here; callers cut the stream
        # into windows, so the tokenizer's "longer than the maximum" warning would only be noise.
        ids.extend(tokenizer(story, add_special_tokens=True, verbose=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids
