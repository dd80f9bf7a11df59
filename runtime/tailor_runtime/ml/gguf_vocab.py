"""A Hugging Face SentencePiece-style tokenizer.json as llama.cpp's "llama" (SPM) vocabulary in a GGUF.

llama.cpp's SPM tokenizer splits text into characters and repeatedly merges the adjacent pair whose
concatenation is the vocabulary entry with the highest *score* (leftmost on ties), falling back to <0xXX>
byte tokens for characters outside the vocabulary. A tokenizer.json stores no scores, only BPE merges in
rank order; HF's BPE merges the adjacent pair of lowest *rank*. Giving each piece the score -rank of its
best merge makes the two the same algorithm (Tailor's llama2.c import derives the merges the other way, from
the original scores). llama.cpp's own converter writes a placeholder score of -1000 for every token of such
a tokenizer, which makes it merge in text order instead and tokenize differently from the source.

Supported: BPE with byte fallback (Llama 1/2, Mistral v0.1, llama2.c models). Byte-level BPE (GPT-2,
Llama 3) needs llama.cpp's "gpt2" vocabulary with a pre-tokenizer name, which is not written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument

METASPACE = "\u2581"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def spm_vocab(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) for ids 0..vocab_size-1 from a byte-fallback BPE tokenizer.json."""
    from gguf import TokenType

    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise InvalidArgument(
            f"cannot write the tokenizer (model {model.get('type')!r}, byte_fallback "
            f"{model.get('byte_fallback')}) to GGUF; supported: SentencePiece-style BPE with byte fallback "
            "(Llama 1/2, Mistral v0.1, llama2.c models)"
        )
    pieces = {i: p for p, i in model["vocab"].items()}
    special = set()
    for added in tokenizer_json.get("added_tokens", []):
        pieces[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    if max(pieces) >= vocab_size:
        raise InvalidArgument(f"the tokenizer has token id {max(pieces)}, the model only {vocab_size} rows")

    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model.get("merges", [])]
    lowest = -float(len(merges) + 1)  # below every merge: pieces no merge produces are never preferred
    best_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        best_rank.setdefault(left + right, rank)

    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        piece = pieces.get(i)
        if piece is None:  # rows the embedding has beyond the tokenizer (padding), as llama.cpp names them
            tokens.append(f"[PAD{i}]")
            scores.append(lowest)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(piece)
        scores.append(-float(best_rank[piece]) if piece in best_rank else lowest)
        if piece == model.get("unk_token"):
            types.append(TokenType.UNKNOWN)
        elif i in special:
            types.append(TokenType.CONTROL)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


def adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends "▁" to the text (SentencePiece's add_dummy_prefix)."""
    steps = []
    for part in ("normalizer", "pre_tokenizer"):
        block = tokenizer_json.get(part) or {}
        steps += block.get("normalizers") or block.get("pretokenizers") or [block]
    for step in steps:
        if step.get("type") == "Prepend" and step.get("prepend") == METASPACE:
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            return True
    return False


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def add_vocab(writer: Any, model_dir: Path, vocab_size: int) -> dict[str, Any]:
    """Add the tokenizer of `model_dir` to a GGUFWriter; returns the special token ids written."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InvalidArgument(f"{model_dir} has no tokenizer.json; GGUF needs the tokenizer in the file")
    tok = json.loads(path.read_text())
    tokens, scores, types = spm_vocab(tok, vocab_size)
    config = _read_json(model_dir / "config.json")
    tok_config = _read_json(model_dir / "tokenizer_config.json")
    generation = _read_json(model_dir / "generation_config.json")
    ids = {t: i for i, t in enumerate(tokens)}
    bos = _first(config.get("bos_token_id")) if config.get("bos_token_id") is not None else ids.get("<s>")
    eos = _first(config.get("eos_token_id")) if config.get("eos_token_id") is not None else ids.get("</s>")
    # generation_config may stop on more ids than eos (llama2.c models stop at BOS, which separates their
    # training stories); llama.cpp has one more end-of-generation slot, EOT, so the first extra id goes there
    # and llama.cpp / Ollama stop where transformers' generate stops.
    stops = generation.get("eos_token_id", [])
    extra = [i for i in (stops if isinstance(stops, list) else [stops]) if i != eos]

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    written = {"bos": bos, "eos": eos, "unk": ids.get(tok["model"].get("unk_token"))}
    if extra:
        written["eot"] = extra[0]
    for key, value in written.items():
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:  # tokenizers-only folders say it in the post-processor's template
        add_bos = bos is not None and tokens[bos] in json.dumps(tok.get("post_processor") or {})
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    writer.add_add_space_prefix(adds_space_prefix(tok))
    return written
