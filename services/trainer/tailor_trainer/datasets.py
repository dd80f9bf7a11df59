"""Supervised fine-tuning data: Alpaca, chat and raw text, validated before any compute is spent.

Formats (`data_format`, or "auto" from the file):
  * alpaca: a JSON array or JSONL of {"instruction", "input" (optional), "output"};
  * chat: JSONL of {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]};
  * text: plain text, documents separated by blank lines (trained as one token stream, see data.py).

Templates (the defaults are Stanford Alpaca's prompts and a plain "### Role:" chat layout; both are
overridable in the config). Every example becomes BOS + prompt + response + EOS; the loss is computed on
the response and EOS only (the prompt is context), so the model learns to answer, not to repeat prompts.

Validation names the file, the line (JSONL) or record index (JSON array) and the field. Examples longer
than `seq_len` are truncated (the response is cut, never the prompt) or dropped, as configured; examples
whose prompt alone does not fit are dropped; the counts are reported. The examples are split into train
and eval with a seed. Batches: packed (several examples per row, each with its own position ids, so the
model's attention stays within the example) or padded to the longest example in the batch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CHAT_TURN = "### {role}:\n{content}\n\n"  # role capitalised; the assistant's content is the trained part
IGNORE = -100  # label of positions that carry no loss (PyTorch cross_entropy's ignore_index)


@dataclass(frozen=True)
class Templates:
    alpaca: str = ALPACA_PROMPT
    alpaca_no_input: str = ALPACA_PROMPT_NO_INPUT
    chat_turn: str = CHAT_TURN


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


@dataclass
class SftData:
    train: list[Example]
    eval: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    head = Path(path).read_text(encoding="utf-8", errors="replace")[:4096].lstrip()
    if not head.startswith(("{", "[")):
        return "text"
    return "chat" if '"messages"' in head else "alpaca"


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) of a JSON array or JSONL file; `where` is 'file line N' or 'file record N'."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        records = [(f"{path.name} record {i}", r) for i, r in enumerate(items)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path.name} line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path.name} line {number} is not valid JSON ({exc.msg})") from None
    for where, record in records:
        if not isinstance(record, dict):
            raise InvalidArgument(f"{where} is a JSON {type(record).__name__}; expected an object")
    return records


def _string_field(record: dict, name: str, where: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise InvalidArgument(f"{where}: field '{name}' must be a string, got {got}")
    return value


def alpaca_pair(record: dict, where: str, templates: Templates) -> tuple[str, str]:
    instruction = _string_field(record, "instruction", where)
    extra = _string_field(record, "input", where, required=False)
    output = _string_field(record, "output", where)
    if not instruction.strip() or not output.strip():
        raise InvalidArgument(f"{where}: 'instruction' and 'output' must not be empty")
    template = templates.alpaca if extra.strip() else templates.alpaca_no_input
    return template.format(instruction=instruction, input=extra), output


def chat_segments(record: dict, where: str, templates: Templates) -> list[tuple[str, bool]]:
    """(text, trained) segments: every turn rendered; only assistant content is trained."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(f"{where}: field 'messages' must be a non-empty list")
    segments: list[tuple[str, bool]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"{where}: messages[{i}] must be an object")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise InvalidArgument(
                f"{where}: messages[{i}].role is {role!r}; expected system, user or assistant"
            )
        content = _string_field(message, "content", f"{where}: messages[{i}]")
        header, _, tail = templates.chat_turn.partition("{content}")
        segments.append((header.format(role=role.capitalize()), False))
        segments.append((content, role == "assistant"))
        segments.append((tail, False))
    if not any(trained and text.strip() for text, trained in segments):
        raise InvalidArgument(f"{where}: no assistant message to learn from")
    return segments


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def build_examples(
    path: Path,
    tokenizer: Any,
    data_format: str,
    seq_len: int,
    overlong: str,
    templates: Templates = Templates(),
) -> tuple[list[Example], dict[str, Any]]:
    """Tokenized examples with labels, and the counts (read, truncated, dropped)."""
    fmt = detect_format(path) if data_format == "auto" else data_format
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    records = read_records(path)
    examples: list[Example] = []
    truncated = dropped = 0
    for where, record in records:
        if fmt == "alpaca":
            prompt, response = alpaca_pair(record, where, templates)
            segments = [(prompt, False), (response, True)]
        elif fmt == "chat":
            segments = chat_segments(record, where, templates)
        else:
            raise InvalidArgument(f"unknown data_format {fmt!r}", choices=("alpaca", "chat", "text", "auto"))
        ids = [bos] if bos is not None else []
        labels = [IGNORE] * len(ids)
        for text, trained in segments:
            piece = _encode(tokenizer, text)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        if eos is not None:
            ids.append(eos)
            labels.append(eos)
        if len(ids) > seq_len:
            first_trained = next((i for i, v in enumerate(labels) if v != IGNORE), len(ids))
            if overlong == "drop" or first_trained >= seq_len - 1:
                dropped += 1
                continue
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        examples.append(Example(ids, labels))
    stats = {
        "data_format": fmt,
        "records": len(records),
        "examples": len(examples),
        "truncated": truncated,
        "dropped": dropped,
    }
    if not examples:
        advice = (
            "raise seq_len or set overlong=truncate"
            if overlong == "drop"
            else "their prompts alone do not fit; raise seq_len"
        )
        raise InvalidArgument(
            f"{Path(path).name} has no usable examples: {len(records)} records, {dropped} dropped as longer than "
            f"seq_len {seq_len} ({advice})"
        )
    return examples, stats


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffled with `seed`; the first `eval_fraction` (at least one when asked for) is held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction <= 0 else max(1, round(len(examples) * eval_fraction))
    if n_eval >= len(examples):
        raise InvalidArgument(
            f"eval_fraction {eval_fraction} leaves no training examples out of {len(examples)}; lower it"
        )
    held = [examples[i] for i in order[:n_eval]]
    train = [examples[i] for i in order[n_eval:]]
    return train, held


def pack(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Rows of whole examples, each row at most seq_len tokens (first fit, in the given order)."""
    rows: list[list[Example]] = []
    sizes: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        for i, size in enumerate(sizes):
            if size + n <= seq_len:
                rows[i].append(example)
                sizes[i] += n
                break
        else:
            rows.append([example])
            sizes.append(n)
    return rows


def collate(rows: list[list[Example]], pad_id: int) -> dict[str, Any]:
    """Tensors for a batch of rows (packed or one example each), padded to the longest row.

    Labels are shifted here: position t predicts token t + 1, so `labels[t]` is the next token's label,
    and IGNORE at each example's last position (nothing to predict across an example boundary).
    position_ids restart at 0 for every example, and `attention_mask` is a 4-D block-diagonal causal
    mask [batch, 1, T, T] (True = may attend): a token sees only earlier tokens of its own example.
    transformers 5.17 does not infer this from restarting position ids with SDPA (measured: logits of a
    packed example then differ from the example alone by 11), with the explicit mask they agree to 1e-5.
    """
    import torch

    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: a segment of its own
    row_tokens = torch.zeros(len(rows), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for s, example in enumerate(row):
            n = len(example.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(example.input_ids)
            labels[r, offset : offset + n - 1] = torch.tensor(example.labels[1:])
            position_ids[r, offset : offset + n] = torch.arange(n)
            segments[r, offset : offset + n] = s
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)
        row_tokens[r] = offset
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    attention_mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask[:, None],
        "real_tokens": int(row_tokens.sum()),
        "row_tokens": row_tokens,  # per row, so a data-parallel shard can count its own
    }


class ExampleBatches:
    """Deterministic batches by step: batch k depends only on (seed, k), so a resumed run sees exactly
    the batches the interrupted one would have. Each epoch is a fresh shuffle of the training rows."""

    def __init__(
        self, train: list[Example], batch_size: int, seq_len: int, packing: bool, seed: int, pad_id: int
    ):
        self.rows = pack(train, seq_len) if packing else [[e] for e in train]
        self.batch_size, self.seq_len, self.seed, self.pad_id = batch_size, seq_len, seed, pad_id
        self.packing = packing
        self._orders: dict[int, list[int]] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time is all a run needs
        return self._orders[epoch]

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of optimizer step `step` (1-based)."""
        start = (step - 1) * self.batch_size
        picked = []
        for i in range(start, start + self.batch_size):
            epoch, within = divmod(i, len(self.rows))
            picked.append(self.rows[self._epoch_order(epoch)[within]])
        return collate(picked, self.pad_id)
