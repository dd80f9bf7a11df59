"""Chat data (messages and ShareGPT, JSON and JSONL) rendered with a chat template, loss on the
assistant turns only, with stories260K's real tokenizer (which has no template of its own)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from support.threads import torch_threads

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_trainer.datasets import IGNORE, Templates, build_examples
from tailor_trainer.lora import LoraTrainConfig, finetune_lora

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"

# A ChatML-like template written with stories260K's own special tokens: each assistant reply ends with
# EOS, so the model learns where a reply stops.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WITH_TEMPLATE = Templates(chat_template=TEMPLATE)

CONVERSATION = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell a story about a cat."},
    {"role": "assistant", "content": "A cat sat in the sun."},
    {"role": "user", "content": "And a dog?"},
    {"role": "assistant", "content": "The dog ran to the park."},
]
SHAREGPT = [
    {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
    for m in CONVERSATION
]

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit._script"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


@pytest.fixture(scope="module")
def tok():
    return load_causal_lm(MODEL)[1]


def write(path: Path, records: list[dict], jsonl: bool) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records))
    return path


def trained_text(tok, example) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token  # a trained token keeps its own id as its label
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


@pytest.mark.parametrize("jsonl", [True, False], ids=["jsonl", "json"])
@pytest.mark.parametrize("key", ["messages", "conversations"])
def test_chat_records_train_on_assistant_tokens_only(tmp_path, tok, key, jsonl):
    record = {"messages": CONVERSATION} if key == "messages" else {"conversations": SHAREGPT}
    path = write(tmp_path / ("chat.jsonl" if jsonl else "chat.json"), [record, record], jsonl)
    examples, stats = build_examples(path, tok, "auto", 512, "truncate", WITH_TEMPLATE)
    assert stats["data_format"] == "chat" and stats["examples"] == 2
    example = examples[0]
    rendered = tok.apply_chat_template(CONVERSATION, chat_template=TEMPLATE, tokenize=False)
    # The whole conversation is the template's rendering, tokenized as one text (as at inference).
    assert example.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert example.input_ids[0] == tok.bos_token_id
    runs = trained_text(tok, example)
    assert [r.replace("</s>", "").strip() for r in runs] == [
        "A cat sat in the sun.",
        "The dog ran to the park.",
    ]
    assert all(r.rstrip().endswith("</s>") for r in runs)  # each reply's end of turn is learned
    untrained = tok.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == IGNORE]
    )
    assert "Tell a story about a cat." in untrained and "You tell short stories." in untrained
    assert "<|assistant|>" in untrained  # the generation prompt is given, not learned


def test_alpaca_records_keep_the_alpaca_layout_with_a_chat_template(tok):
    alpaca = REPO.parent / "shared" / "data" / "sft" / "alpaca" / "alpaca_100.json"
    with_template, _ = build_examples(alpaca, tok, "auto", 512, "truncate", WITH_TEMPLATE)
    plain, _ = build_examples(alpaca, tok, "auto", 512, "truncate")
    assert [e.input_ids for e in with_template] == [e.input_ids for e in plain]
    assert "### Response:" in tok.decode(with_template[0].input_ids)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (
            [{"messages": CONVERSATION}, {"messages": []}],
            "record 1: field 'messages' must be a non-empty list",
        ),
        (
            [{"conversations": SHAREGPT}, {"conversations": []}],
            "record 1: field 'conversations' must be a non-empty list",
        ),
        (
            [{"messages": CONVERSATION}, {"messages": [{"role": "robot", "content": "hi"}]}],
            "record 1: messages[0].role is 'robot'; expected system, user, assistant",
        ),
        (
            [{"conversations": [{"from": "bot", "value": "hi"}]}],
            "record 0: conversations[0].from is 'bot'; expected system, human, user, gpt, assistant",
        ),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "record 0: no assistant message to learn from"),
    ],
)
def test_bad_conversations_are_refused_naming_the_record(tmp_path, tok, records, expected):
    path = write(tmp_path / "chat.json", records, jsonl=False)
    with pytest.raises(InvalidArgument) as err:
        build_examples(path, tok, "chat", 512, "truncate", WITH_TEMPLATE)
    assert f"chat.json {expected}" in err.value.message


def test_chat_data_without_any_template_names_the_config_field(tmp_path, tok):
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}], jsonl=True)
    with pytest.raises(InvalidArgument, match="has no chat template: set chat_template in the config"):
        build_examples(path, tok, "auto", 512, "truncate")


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, tok):
    # Renders only the last assistant reply: earlier replies vanish once the conversation goes on.
    rewriting = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}], jsonl=True)
    with pytest.raises(InvalidArgument, match="line 1: the chat template renders turn 2 differently"):
        build_examples(path, tok, "chat", 512, "truncate", Templates(chat_template=rewriting))


def test_config_refuses_a_broken_template_naming_the_field():
    with pytest.raises(ValidationError, match="chat_template"):
        LoraTrainConfig(chat_template="{% for m in messages %}{{ m }")
    with pytest.raises(ValidationError, match="not both"):
        LoraTrainConfig(chat_template=TEMPLATE, chat_turn_template="{role}: {content}\n")


def test_chat_finetune_keeps_the_template_in_the_merged_tokenizer(tmp_path):
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 8, jsonl=True)
    cfg = LoraTrainConfig(steps=2, batch_size=2, seq_len=256, chat_template=TEMPLATE, eval_fraction=0.25)
    with torch_threads(1):
        metrics = finetune_lora(
            MODEL, path, tmp_path / "merged", tmp_path / "adapter", cfg, lambda *a, **k: None
        )
    assert metrics["data_format"] == "chat" and metrics["train_examples"] == 6
    _, merged_tok = load_causal_lm(tmp_path / "merged")
    assert merged_tok.chat_template == TEMPLATE
