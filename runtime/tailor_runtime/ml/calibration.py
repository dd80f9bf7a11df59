"""Calibration data: a text or JSONL artifact turned into `samples` token sequences of `seq_len` tokens.

Accepted files (UTF-8):
  * plain text: documents separated by blank lines (`tailor_runtime.ml.text`);
  * JSONL, one object per line, with a `text` field, or Alpaca fields (`instruction`, optional `input`,
    `output`), or chat `messages` ([{"role", "content"}, ...]); the fields are joined as plain text.

Every document is encoded with its BOS and the documents are concatenated into one stream, cut into
non-overlapping `seq_len` windows; `samples` of those windows are chosen with `random.Random(seed)`, so
the same file, seed and options always give the same sequences. Too little text fails with the counts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
MIN_SAMPLES = 8
MIN_SEQ_LEN = 16


@dataclass(frozen=True)
class CalibrationSet:
    sequences: list[list[int]]  # `samples` lists of `seq_len` token ids
    seq_len: int
    seed: int
    source_sha256: str
    documents: int
    tokens_available: int
    stats: dict[str, Any] = field(default_factory=dict)

    def manifest_stats(self) -> dict[str, Any]:
        """What goes into the output manifest: enough to reproduce and to judge the calibration."""
        return {
            "calibration_samples": len(self.sequences),
            "calibration_seq_len": self.seq_len,
            "calibration_seed": self.seed,
            "calibration_tokens": len(self.sequences) * self.seq_len,
            "calibration_documents": self.documents,
            "calibration_tokens_available": self.tokens_available,
            "calibration_source_sha256": self.source_sha256,
            **self.stats,
        }

    def as_tensor(self):
        import torch

        return torch.tensor(self.sequences, dtype=torch.long)


def read_documents(path: Path) -> list[str]:
    """Documents of a text or JSONL calibration file; InvalidArgument naming the line and field otherwise."""
    from tailor_runtime.ml.text import split_stories

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"calibration data {path.name} is not UTF-8 text ({exc.reason})") from None
    first = text.lstrip()[:1]
    if first not in ("{", "["):
        return split_stories(text)
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"calibration data {path.name} line {number} is not valid JSON ({exc.msg}); expected one "
                "object per line with 'text', Alpaca 'instruction'/'output' or chat 'messages'"
            ) from None
        documents.append(_record_text(record, path.name, number))
    return [d for d in documents if d.strip()]


def _record_text(record: Any, name: str, number: int) -> str:
    where = f"calibration data {name} line {number}"
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where} is a JSON {type(record).__name__}, expected an object")
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        parts = [record["instruction"], record.get("input") or "", record["output"]]
        return "\n".join(p for p in parts if isinstance(p, str) and p)
    if isinstance(record.get("messages"), list):
        contents = []
        for i, message in enumerate(record["messages"]):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise InvalidArgument(f"{where}: messages[{i}] needs a string 'content'")
            contents.append(message["content"])
        return "\n".join(contents)
    raise InvalidArgument(
        f"{where} has fields {sorted(record)}; expected 'text', 'instruction' + 'output', or 'messages'"
    )


def build_calibration_set(
    tokenizer: Any,
    documents: list[str],
    samples: int,
    seq_len: int,
    seed: int,
    source_sha256: str = "",
    max_seq_len: int | None = None,
) -> CalibrationSet:
    """`samples` windows of `seq_len` tokens drawn with `seed` from the documents' token stream."""
    if samples < MIN_SAMPLES:
        raise InvalidArgument(f"calibration samples must be at least {MIN_SAMPLES}, got {samples}")
    if seq_len < MIN_SEQ_LEN:
        raise InvalidArgument(f"calibration seq_len must be at least {MIN_SEQ_LEN} tokens, got {seq_len}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise InvalidArgument(
            f"calibration seq_len {seq_len} exceeds the model's context of {max_seq_len} tokens"
        )
    from tailor_runtime.ml.text import tokenize_stories

    needed = samples * seq_len
    stream = tokenize_stories(tokenizer, documents, max_tokens=None)
    windows = len(stream) // seq_len
    if windows < samples:
        raise InvalidArgument(
            f"calibration data is too small: {len(documents)} documents give {len(stream)} tokens, "
            f"{windows} sequences of {seq_len}; {samples} were requested ({needed} tokens). Use more text, "
            "fewer samples or a shorter seq_len"
        )
    chosen = sorted(random.Random(seed).sample(range(windows), samples))
    sequences = [stream[i * seq_len : (i + 1) * seq_len] for i in chosen]
    return CalibrationSet(
        sequences=sequences,
        seq_len=seq_len,
        seed=seed,
        source_sha256=source_sha256,
        documents=len(documents),
        tokens_available=len(stream),
    )


def split_holdout(documents: list[str], holdout_chars: int) -> tuple[list[str], list[str]]:
    """(calibration documents, held-out documents): the last documents, about `holdout_chars` of them,
    are kept out of calibration so that the accuracy gate measures on text the method never saw."""
    held: list[str] = []
    size = 0
    while documents[: len(documents) - len(held)] and size < holdout_chars and len(held) < len(documents) - 1:
        doc = documents[len(documents) - len(held) - 1]
        held.insert(0, doc)
        size += len(doc)
    return documents[: len(documents) - len(held)], held
