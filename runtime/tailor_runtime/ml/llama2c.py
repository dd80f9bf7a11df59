"""Import a llama2.c checkpoint (legacy format) and its tokenizer as a Hugging Face LlamaForCausalLM folder.

llama2.c (github.com/karpathy/llama2.c) stores a model as a 7 x int32 header followed by raw float32
tensors, and its tokenizer as (score, bytes) pairs. Three things differ from Hugging Face's Llama and must
be translated, not just copied:

* RoPE layout. llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; HF's
  `rotate_half` rotates (x_i, x_{i + d/2}). Permuting the output rows of wq and wk per head turns one into
  the other (the same permutation Meta's checkpoints need, see HF's convert_llama_weights_to_hf.py).
* Grouped-query attention: wk/wv have n_kv_heads heads, so their permutation uses n_kv_heads.
* Tokenizer. llama2.c's `encode` prepends a dummy " " to any non-empty text, looks each UTF-8 character up
  (falling back to <0xXX> byte tokens), then repeatedly merges the adjacent pair whose concatenation is the
  best-scoring vocabulary entry. That is SentencePiece-BPE with byte fallback; we rebuild it with the
  `tokenizers` library, deriving BPE merges from the scores, and without any whitespace splitting or
  collapsing (llama2.c does neither).

Usage: python -m tailor_runtime.ml.llama2c CHECKPOINT TOKENIZER OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.store.manifest import sha256_file

HEADER = struct.Struct("<7i")
# llama2.c's newer export formats start with this magic ("ak42"); only the legacy format is supported.
VERSIONED_MAGIC = 0x616B3432
METASPACE = "\u2581"  # SentencePiece's visible space, "▁"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 in every llama2.c/SentencePiece vocabulary
RMS_NORM_EPS = 1e-5  # hard-coded in llama2.c's model.py and run.c


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.n_kv_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The float32 tensors after the header, in file order (llama2.c's legacy `export`)."""
        L, d, h, kv = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
        shapes = [
            ("token_embedding", (self.vocab_size, d)),
            ("rms_att", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("rms_ffn", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_size // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_size // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, d)))
        return shapes

    def expected_file_size(self) -> int:
        return HEADER.size + 4 * sum(math.prod(s) for _, s in self.tensor_shapes())


def read_header(data: bytes, name: str = "checkpoint") -> Llama2cHeader:
    if len(data) < HEADER.size:
        raise InvalidArgument(
            f"{name} is {len(data)} bytes; a llama2.c checkpoint starts with a 28-byte header"
        )
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(data)
    if dim == VERSIONED_MAGIC:
        raise InvalidArgument(
            f"{name} is a versioned llama2.c export (magic 'ak42'); only the legacy format "
            "(export.py --version 0 / the original tinyllamas .bin files) is supported"
        )
    fields = {"dim": dim, "hidden_dim": hidden, "n_layers": n_layers, "n_heads": n_heads}
    fields |= {"n_kv_heads": n_kv_heads, "seq_len": seq_len}
    bad = [f"{k}={v}" for k, v in fields.items() if not 0 < v <= 1 << 20]
    if bad or vocab == 0 or abs(vocab) > 1 << 20:
        raise InvalidArgument(
            f"{name} header is not a llama2.c legacy header ({', '.join(bad) or f'vocab_size={vocab}'}); "
            "expected 7 int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, all positive "
            "except vocab_size, which is negative when the classifier is not shared"
        )
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise InvalidArgument(
            f"{name} header has dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv_heads}; expected dim divisible "
            "by n_heads into an even head size, and n_heads divisible by n_kv_heads"
        )
    return Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len, vocab > 0)


def read_checkpoint(path: Path) -> tuple[Llama2cHeader, dict[str, Any]]:
    """Header and float32 tensors (named as in llama2.c) of a legacy llama2.c checkpoint."""
    import numpy as np
    import torch

    data = Path(path).read_bytes()
    hdr = read_header(data, str(path))
    if len(data) != hdr.expected_file_size():
        raise InvalidArgument(
            f"{path} is {len(data)} bytes but its header ({hdr}) implies {hdr.expected_file_size()} "
            "bytes (28-byte header + float32 weights, with a separate classifier when vocab_size < 0)"
        )
    flat = np.frombuffer(data, dtype="<f4", offset=HEADER.size)
    tensors, off = {}, 0
    for name, shape in hdr.tensor_shapes():
        n = math.prod(shape)
        tensors[name] = torch.from_numpy(flat[off : off + n].reshape(shape).copy())
        off += n
    return hdr, tensors


def rope_theta_from_tables(hdr: Llama2cHeader, real: Any, imag: Any) -> float:
    """Recover RoPE's base from llama2.c's stored cos/sin tables and check the tables are standard RoPE.

    llama2.c precomputes freq_cis[p, i] = exp(1j * p * theta ** (-2i / head_size)); HF recomputes them from
    `rope_theta`, so the tables are not copied, only checked.
    """
    import torch

    hs = hdr.head_size
    if hs < 4 or hdr.seq_len < 2:
        return 10000.0  # too small to measure; llama2.c's default base
    freq1 = math.atan2(float(imag[1, 1]), float(real[1, 1]))  # angle at position 1 for pair i=1
    theta = freq1 ** (-hs / 2)
    if abs(theta - round(theta)) < 1e-4 * theta:
        theta = float(round(theta))  # float32 tables only give ~6 digits; bases are integers in practice
    inv = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = torch.arange(hdr.seq_len, dtype=torch.float64)[:, None] * inv[None, :]
    if not (
        torch.allclose(torch.cos(ang).float(), real, atol=1e-4)
        and torch.allclose(torch.sin(ang).float(), imag, atol=1e-4)
    ):
        raise InvalidArgument("the checkpoint's freq_cis tables are not standard RoPE tables; cannot convert")
    return theta


def permute_rope(w: Any, n_heads: int) -> Any:
    """Reorder each head's output rows from interleaved pairs (llama2.c) to half-split (HF rotate_half)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(hdr: Llama2cHeader, t: dict[str, Any]) -> dict[str, Any]:
    sd = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    for i in range(hdr.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = permute_rope(t["wq"][i], hdr.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_rope(t["wk"][i], hdr.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]  # llama2.c: w2(silu(w1 x) * w3 x)
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    if not hdr.shared_classifier:
        sd["lm_head.weight"] = t["wcls"]
    return {k: v.contiguous() for k, v in sd.items()}


def read_tokenizer_bin(path: Path, vocab_size: int) -> list[tuple[bytes, float]]:
    """(piece bytes, score) for each token id of a llama2.c tokenizer.bin."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise InvalidArgument(f"{path} is {len(data)} bytes; a llama2.c tokenizer starts with an int32")
    (max_len,) = struct.unpack_from("<i", data)
    off, tokens = 4, []
    while off < len(data) and len(tokens) <= vocab_size:
        if off + 8 > len(data):
            raise InvalidArgument(f"{path} ends inside the record of token {len(tokens)} (truncated file?)")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if not 0 < n <= max_len or off + n > len(data):
            raise InvalidArgument(
                f"{path}: token {len(tokens)} has length {n}; expected 1..{max_len} bytes within the file"
            )
        tokens.append((data[off : off + n], score))
        off += n
    if len(tokens) > vocab_size or off != len(data):
        raise InvalidArgument(
            f"{path} holds more than {vocab_size} tokens; the checkpoint's vocab_size is {vocab_size}"
        )
    if len(tokens) < vocab_size:
        raise InvalidArgument(
            f"{path} holds {len(tokens)} tokens; the checkpoint's vocab_size is {vocab_size}"
        )
    return tokens


def hf_vocab(tokens: list[tuple[bytes, float]]) -> tuple[dict[str, int], list[float]]:
    """Piece strings in SentencePiece spelling ("▁" for space) -> id, plus the scores."""
    vocab: dict[str, int] = {}
    for i, (raw, _) in enumerate(tokens):
        if i < len(SPECIAL_TOKENS):
            piece = SPECIAL_TOKENS[i]  # llama2.c stores these as "<unk>", "\n<s>\n", "\n</s>\n"
            if raw.strip() != piece.encode():
                raise InvalidArgument(
                    f"tokenizer token {i} is {raw!r}; expected {piece!r} (SentencePiece layout)"
                )
        else:
            try:
                piece = raw.decode("utf-8").replace(" ", METASPACE)
            except UnicodeDecodeError:
                raise InvalidArgument(f"tokenizer token {i} ({raw!r}) is not valid UTF-8") from None
        if piece in vocab:
            raise InvalidArgument(f"tokenizer tokens {vocab[piece]} and {i} are both {piece!r}")
        vocab[piece] = i
    return vocab, [s for _, s in tokens]


def bpe_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) pair of pieces whose concatenation is a piece, best-scoring result first.

    llama2.c merges whichever adjacent pair forms the highest-scoring piece; BPE merges whichever pair has
    the lowest rank. Ranking each split by its result's score makes the two the same algorithm. Special and
    byte tokens take no part (llama2.c could only merge them into strings such as "<0x0A>x" that never
    exist).
    """
    mergeable = {p: i for p, i in vocab.items() if i >= len(SPECIAL_TOKENS) and not is_byte_token(p)}
    merges = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[pid], pid, cut, left, right))
    merges.sort()  # by score (descending), then id and cut only to make the order deterministic
    return [(left, right) for *_, left, right in merges]


def is_byte_token(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def build_tokenizer(tokens: list[tuple[bytes, float]]):
    """A `tokenizers.Tokenizer` that encodes exactly like llama2.c's `encode(text, bos=1, eos=0)`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab, scores = hf_vocab(tokens)
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise InvalidArgument(f"tokenizer lacks byte-fallback tokens ({', '.join(missing[:4])}, ...)")
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=bpe_merges(vocab, scores),
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    # llama2.c prepends " " to any non-empty text (even one starting with a space) and never splits or
    # collapses whitespace: Prepend + Replace, and no pre-tokenizer (Metaspace would skip the prefix
    # before a leading space).
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(METASPACE), normalizers.Replace(" ", METASPACE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(METASPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def hf_config(hdr: Llama2cHeader, rope_theta: float):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=hdr.vocab_size,
        hidden_size=hdr.dim,
        intermediate_size=hdr.hidden_dim,
        num_hidden_layers=hdr.n_layers,
        num_attention_heads=hdr.n_heads,
        num_key_value_heads=hdr.n_kv_heads,
        head_dim=hdr.head_size,
        hidden_act="silu",
        max_position_embeddings=hdr.seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=hdr.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        dtype="float32",
    )


def convert_llama2c(checkpoint: Path, tokenizer_bin: Path, out_dir: Path) -> dict[str, Any]:
    """Write a Hugging Face Llama folder (hf-safetensors, float32) converted from llama2.c files.

    Returns a summary: the header fields, parameter count, rope_theta and the sources' sha256.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tailor_runtime.ml.formats import HF_SAFETENSORS
    from tailor_runtime.ml.model_io import write_format

    checkpoint, tokenizer_bin, out_dir = Path(checkpoint), Path(tokenizer_bin), Path(out_dir)
    for p in (checkpoint, tokenizer_bin):
        if not p.is_file():
            raise InvalidArgument(f"{p} is not a file")
    hdr, tensors = read_checkpoint(checkpoint)
    theta = rope_theta_from_tables(hdr, tensors["freq_cis_real"], tensors["freq_cis_imag"])
    tok = build_tokenizer(read_tokenizer_bin(tokenizer_bin, hdr.vocab_size))  # validate before writing

    config = hf_config(hdr, theta)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = hf_state_dict(hdr, tensors)
    # assign=True adopts our tensors instead of copying into the meta (unallocated) ones.
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and hdr.shared_classifier)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if hdr.shared_classifier:
        model.tie_weights()
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=1,
        # llama2.c's run.c stops at BOS: its training data separates stories by BOS and never contains EOS.
        eos_token_id=[2, 1],
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=hdr.seq_len,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out_dir)
    summary = {
        "source": "llama2.c",
        "checkpoint_sha256": sha256_file(checkpoint),
        "tokenizer_sha256": sha256_file(tokenizer_bin),
        "parameters": sum(v.numel() for v in state.values()),
        "rope_theta": theta,
        **{k: getattr(hdr, k) for k in Llama2cHeader.__dataclass_fields__},
    }
    write_format(out_dir, HF_SAFETENSORS, dtype="float32", converted_from=summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tailor_runtime.ml.llama2c",
        description="Convert a legacy llama2.c checkpoint + tokenizer.bin into a Hugging Face Llama folder.",
    )
    ap.add_argument("checkpoint", type=Path, help="llama2.c model .bin (legacy format)")
    ap.add_argument("tokenizer", type=Path, help="llama2.c tokenizer .bin (e.g. tok512.bin)")
    ap.add_argument("out_dir", type=Path, help="output folder (created)")
    args = ap.parse_args(argv)
    try:
        summary = convert_llama2c(args.checkpoint, args.tokenizer, args.out_dir)
    except InvalidArgument as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
