"""Supervised fine-tuning data: Alpaca, chat and raw text, validated before any compute is spent.

Formats (`data_format`, or "auto" from the file):
  * alpaca: a JSON array or JSONL of {"instruction", "input" (optional), "output"};
  * chat: a JSON array or JSONL of {"messages": [{"role": "system" | "user" | "assistant", "content": str},
    ...]} or ShareGPT's {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]};
  * text: plain text, documents separated by blank lines (trained as one token stream, see data.py).

Layouts: Alpaca records use Stanford Alpaca's prompts (overridable in the config) and become BOS + prompt +
response + EOS, with the loss on the response and EOS only (the prompt is context), so the model learns
to answer, not to repeat prompts. Chat records are rendered with the chat template (the config's
`chat_template`, else the tokenizer's own) through `tokenizer.apply_chat_template`, exactly as the model
will see them in use, and the loss is on the assistant turns only (each turn's text as the template
renders it, its end-of-turn marker included); the template decides BOS and EOS. A tokenizer without a
template needs `chat_template` in the config, or `chat_turn_template` for a plain "### Role:" layout.

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
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
IGNORE = -100  # label of positions that carry no loss (PyTorch cross_entropy's ignore_index)


@dataclass(frozen=True)
class Templates:
    alpaca: str = ALPACA_PROMPT
    alpaca_no_input: str = ALPACA_PROMPT_NO_INPUT
    chat_turn: str | None = None  # a plain turn layout instead of a chat template
    chat_template: str | None = None  # Jinja; None: the tokenizer's own


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
    return "chat" if '"messages"' in head or '"conversations"' in head else "alpaca"


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


def chat_messages(record: dict, where: str) -> list[dict[str, str]]:
    """The record's turns as [{"role", "content"}], from `messages` (role/content) or ShareGPT's
    `conversations` (from/value: human -> user, gpt -> assistant), each checked."""
    if "conversations" in record and "messages" not in record:
        key, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        key, role_key, content_key, roles = "messages", "role", "content", {r: r for r in CHAT_ROLES}
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise InvalidArgument(f"{where}: field '{key}' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidArgument(f"{where}: {key}[{i}] must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise InvalidArgument(f"{where}: {key}[{i}].{role_key} is {role!r}; expected {', '.join(roles)}")
        content = _string_field(turn, content_key, f"{where}: {key}[{i}]")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise InvalidArgument(f"{where}: no assistant message to learn from")
    return messages


def chat_segments(messages: list[dict[str, str]], turn_layout: str) -> list[tuple[str, bool]]:
    """(text, trained) segments of the plain layout: every turn rendered; only assistant content trained."""
    segments: list[tuple[str, bool]] = []
    header, _, tail = turn_layout.partition("{content}")
    for message in messages:
        segments.append((header.format(role=message["role"].capitalize()), False))
        segments.append((message["content"], message["role"] == "assistant"))
        segments.append((tail, False))
    return segments


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], where: str, prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    except Exception as exc:  # jinja2's errors, and the template's own raise_exception
        raise InvalidArgument(f"{where}: the chat template cannot render this conversation: {exc}") from None


def chat_template_spans(
    tokenizer: Any, template: str, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template renders it, and the character spans of the assistant turns.

    Turn i's span runs from the end of the conversation up to it with the generation prompt (what the
    model is given at inference) to the end of the conversation including it: the reply and its end of
    turn. That needs a template that renders each conversation as the start of its continuation, which
    templates that rewrite earlier turns (dropping a past reply's reasoning, say) do not; those are
    refused, as their masks would be wrong."""
    full = _render(tokenizer, template, messages, where, prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], where, prompt=True) if i else ""
        upto = _render(tokenizer, template, messages[: i + 1], where, prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise InvalidArgument(
                f"{where}: the chat template renders turn {i} differently once later turns follow, so the "
                "assistant's tokens cannot be told apart; use a template that appends each turn"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def template_example(
    tokenizer: Any, template: str, messages: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation rendered with `template`: labels only on the assistant
    spans. The whole text is tokenized at once (as at inference), and a token is trained when it starts
    inside an assistant span; tokenizers without offsets encode the spans one by one instead."""
    full, spans = chat_template_spans(tokenizer, template, messages, where)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [
            token if any(a <= begin < b for a, b in spans) else IGNORE
            for token, (begin, _end) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        return ids, labels
    ids, labels, at = [], [], 0
    for a, b in [*spans, (len(full), len(full))]:
        for text, trained in ((full[at:a], False), (full[a:b], True)):
            piece = _encode(tokenizer, text)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        at = b
    return ids, labels


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _with_bos_and_eos(tokenizer: Any, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """BOS + the segments, each encoded (labels where trained) + EOS (trained: the model learns to stop)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = [bos] if bos is not None else []
    labels = [IGNORE] * len(ids)
    for text, trained in segments:
        piece = _encode(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if eos is not None:
        ids.append(eos)
        labels.append(eos)
    return ids, labels


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
    if fmt not in ("alpaca", "chat"):
        raise InvalidArgument(f"unknown data_format {fmt!r}", choices=("alpaca", "chat", "text", "auto"))
    chat_template = templates.chat_template or getattr(tokenizer, "chat_template", None)
    if fmt == "chat" and templates.chat_turn is None and not chat_template:
        raise InvalidArgument(
            f"{Path(path).name} is chat data, and this model's tokenizer has no chat template: set "
            "chat_template in the config to the Jinja template the model should be used with (as in a "
            "tokenizer_config.json), or chat_turn_template for a plain '### {role}:' layout"
        )
    records = read_records(path)
    examples: list[Example] = []
    truncated = dropped = 0
    for where, record in records:
        if fmt == "chat" and templates.chat_turn is None:
            ids, labels = template_example(tokenizer, chat_template, chat_messages(record, where), where)
        else:
            if fmt == "alpaca":
                prompt, response = alpaca_pair(record, where, templates)
                segments = [(prompt, False), (response, True)]
            else:
                segments = chat_segments(chat_messages(record, where), templates.chat_turn)
            ids, labels = _with_bos_and_eos(tokenizer, segments)
        if not any(label != IGNORE for label in labels):
            raise InvalidArgument(f"{where}: the rendered conversation has no assistant tokens to learn from")
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
