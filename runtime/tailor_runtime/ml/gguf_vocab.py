"""A Hugging Face SentencePiece-style tokenizer.json as a SentencePiece model, for llama.cpp's converter.

Many folders (every save_pretrained of a `tokenizers`-only tokenizer, llama2.c imports, the tiny test
models) carry only tokenizer.json, no tokenizer.model. llama.cpp's converter then either fails (Phi-3 and
Gemma read tokenizer.model; GPT-2 and Qwen3 expect a byte-level BPE with a pre-tokenizer it recognises), or
reads the tokenizer with placeholder scores of -1000 for every token, which makes llama.cpp's SPM
tokenizer merge in text order and tokenize differently from the source. `sentencepiece_model` writes the
tokenizer.json as the SentencePiece model it was derived from, with real scores, and the converter reads
that as llama.cpp's "llama" (SPM) vocabulary for any family (see tailor_runtime.ml.llama_cpp_convert).

Scores. llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is the vocabulary
entry with the highest score (leftmost on ties), falling back to <0xXX> byte tokens. A tokenizer.json
stores no scores, only BPE merges in rank order; HF's BPE merges the adjacent pair of lowest rank. Giving
each piece the score -rank of its best merge makes the two the same algorithm (Tailor's llama2.c import
derives the merges the other way, from the original scores).

Supported: BPE with byte fallback (Llama 1/2, Mistral v0.1, TinyLlama, llama2.c models). Byte-level BPE
(GPT-2, Llama 3, Qwen) is left to the converter, which knows those tokenizers by their pre-tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument

METASPACE = "\u2581"
# sentencepiece_model.proto's SentencePiece.Type values.
NORMAL, UNKNOWN, CONTROL, BYTE, UNUSED = 1, 2, 3, 6, 5


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def is_sentencepiece_style(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a tokenizer.json is SentencePiece's BPE (byte fallback), the kind written here."""
    model = tokenizer_json.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def spm_vocab(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, SentencePiece types) for ids 0..vocab_size-1 from a byte-fallback BPE tokenizer.json."""
    model = tokenizer_json.get("model", {})
    if not is_sentencepiece_style(tokenizer_json):
        raise InvalidArgument(
            f"cannot write the tokenizer (model {model.get('type')!r}, byte_fallback "
            f"{model.get('byte_fallback')}) as a SentencePiece model; supported: SentencePiece-style BPE with "
            "byte fallback (Llama 1/2, Mistral v0.1, llama2.c models)"
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
            types.append(UNUSED)
            continue
        tokens.append(piece)
        scores.append(-float(best_rank[piece]) if piece in best_rank else lowest)
        if piece == model.get("unk_token"):
            types.append(UNKNOWN)
        elif i in special:
            types.append(CONTROL)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return tokens, scores, types


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


def sentencepiece_model(tokenizer_json: dict[str, Any], vocab_size: int) -> bytes:
    """A serialized SentencePiece BPE ModelProto (what tokenizer.model holds) equal to `tokenizer_json`."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    tokens, scores, types = spm_vocab(tokenizer_json, vocab_size)
    proto = spm.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)
    ids = {t: i for i, t in enumerate(tokens)}
    unk = tokenizer_json["model"].get("unk_token")
    spec = proto.trainer_spec
    spec.model_type = spm.TrainerSpec.BPE
    spec.vocab_size = vocab_size
    spec.byte_fallback = True
    spec.unk_id = ids.get(unk, 0)
    spec.bos_id = ids.get("<s>", -1)
    spec.eos_id = ids.get("</s>", -1)
    spec.pad_id = -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = adds_space_prefix(tokenizer_json)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def extra_stop_id(model_dir: Path) -> int | None:
    """The first id generation_config stops on besides eos (llama2.c models stop at BOS, which separates
    their training stories): llama.cpp's one further end-of-generation slot, EOT, gets it, so llama.cpp and
    Ollama stop where transformers' generate stops."""
    config = read_json(model_dir / "config.json")
    eos = config.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos])
    stops = read_json(model_dir / "generation_config.json").get("eos_token_id", [])
    extra = [i for i in (stops if isinstance(stops, list) else [stops]) if i not in eos and i is not None]
    return int(extra[0]) if extra else None
