"""Instruction and chat data: validation, templates, loss masks, splits and packing, on real Alpaca."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_trainer import datasets
from tailor_trainer.datasets import IGNORE, ExampleBatches, Templates, build_examples, collate, split

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
ALPACA = REPO.parent / "shared" / "data" / "sft" / "alpaca" / "alpaca_100.json"
PLAIN_CHAT = Templates(chat_turn=datasets.CHAT_TURN)  # stories260K's tokenizer has no chat template


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_causal_lm(MODEL)


@pytest.fixture(scope="module")
def tok(model_and_tokenizer):
    return model_and_tokenizer[1]


def test_real_alpaca_examples_train_on_the_response_only(tok):
    examples, stats = build_examples(ALPACA, tok, "auto", seq_len=512, overlong="truncate")
    assert stats["data_format"] == "alpaca" and stats["records"] == 100
    assert stats["examples"] + stats["dropped"] == 100 and stats["examples"] > 80
    first = json.loads(ALPACA.read_text())[0]
    ex = examples[0]
    assert ex.input_ids[0] == tok.bos_token_id and len(ex.input_ids) <= 512
    trained = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    prompt = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label == IGNORE]
    assert tok.decode(prompt).strip().endswith("### Response:")
    assert first["instruction"] in tok.decode(prompt)
    if trained[-1] == tok.eos_token_id:  # not truncated: the response and EOS are the trained part
        assert tok.decode(trained[:-1]).strip() == first["output"].strip()


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok):
    truncated, t_stats = build_examples(ALPACA, tok, "alpaca", seq_len=300, overlong="truncate")
    dropped, d_stats = build_examples(ALPACA, tok, "alpaca", seq_len=300, overlong="drop")
    assert t_stats["truncated"] > 0 and all(len(e.input_ids) <= 300 for e in truncated)
    assert d_stats["dropped"] >= t_stats["truncated"] and d_stats["truncated"] == 0
    assert len(dropped) == 100 - d_stats["dropped"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('[{"instruction": "x", "output": 3}]', "record 0: field 'output' must be a string, got a int"),
        ('[{"instruction": "x"}]', "record 0: field 'output' must be a string, got missing"),
        ('{"instruction": "a", "output": "b"}\n{oops\n', "line 2 is not valid JSON"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "messages[0].role is 'robot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message to learn from"),
        ('["just a string"]', "record 0 is a JSON str; expected an object"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, tok, content, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidArgument) as err:
        build_examples(path, tok, "auto", seq_len=256, overlong="truncate", templates=PLAIN_CHAT)
    assert "data.jsonl" in err.value.message and expected in err.value.message


def test_no_usable_examples_reports_the_counts(tmp_path, tok):
    path = tmp_path / "long.json"
    path.write_text(json.dumps([{"instruction": "word " * 200, "output": "ok"}] * 3))
    with pytest.raises(InvalidArgument, match="no usable examples: 3 records, 3 dropped .*prompts alone"):
        build_examples(path, tok, "alpaca", seq_len=64, overlong="truncate")


def test_plain_chat_layout_trains_on_assistant_turns_only(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    record = {
        "messages": [
            {"role": "user", "content": "Tell a story."},
            {"role": "assistant", "content": "A cat sat."},
        ]
    }
    path.write_text(json.dumps(record) + "\n")
    (ex,), stats = build_examples(path, tok, "auto", seq_len=256, overlong="truncate", templates=PLAIN_CHAT)
    assert stats["data_format"] == "chat"
    trained = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE]
    assert tok.decode(trained[:-1]).strip() == "A cat sat." and trained[-1] == tok.eos_token_id


def test_split_is_seeded_and_disjoint(tok):
    examples, _ = build_examples(ALPACA, tok, "alpaca", seq_len=512, overlong="truncate")
    train_a, eval_a = split(examples, 0.1, seed=3)
    train_b, eval_b = split(examples, 0.1, seed=3)
    _, eval_c = split(examples, 0.1, seed=4)
    assert [e.input_ids for e in eval_a] == [e.input_ids for e in eval_b] != [e.input_ids for e in eval_c]
    assert len(eval_a) == round(len(examples) * 0.1) and len(train_a) + len(eval_a) == len(examples)
    with pytest.raises(InvalidArgument, match="leaves no training examples"):
        split(examples[:1], 0.4, seed=0)


def test_packing_keeps_attention_within_each_example(model_and_tokenizer):
    model, tok = model_and_tokenizer
    a_ids = tok("Once upon a time there was a cat")["input_ids"]
    a = datasets.Example(a_ids, a_ids)
    b_ids = tok("The dog ran fast to the big park")["input_ids"]
    b = datasets.Example(b_ids, b_ids)
    batch = collate([[a, b]], pad_id=0)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits[0]
        alone = model(input_ids=torch.tensor([b_ids])).logits[0]
    assert (packed[len(a.input_ids) :] - alone).abs().max() < 1e-4
    # Labels: next-token targets within an example, nothing across the boundary.
    assert batch["labels"][0, len(a.input_ids) - 1] == IGNORE
    assert batch["labels"][0, len(a.input_ids)].item() == b_ids[1]


def test_batches_depend_only_on_seed_and_step(tok):
    examples, _ = build_examples(ALPACA, tok, "alpaca", seq_len=512, overlong="truncate")
    first = ExampleBatches(examples, 4, 512, packing=True, seed=0, pad_id=0)
    again = ExampleBatches(examples, 4, 512, packing=True, seed=0, pad_id=0)
    assert torch.equal(first.batch(7)["input_ids"], again.batch(7)["input_ids"])
    assert len(first.rows) < len(examples)  # packing put several examples in a row
    assert all(sum(len(e.input_ids) for e in row) <= 512 for row in first.rows)
    padded = ExampleBatches(examples, 4, 512, packing=False, seed=0, pad_id=0)
    assert first.batch(1)["real_tokens"] > padded.batch(1)["real_tokens"]
