"""The llama2.c importer reproduces the original model: its text, its tokens and its perplexity.

Needs the real checkpoint in ../shared/data (skipped without it), except the input-validation tests.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml import llama2c
from tailor_runtime.ml.model_io import load_causal_lm, read_format

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
CKPT = SHARED / "models" / "stories260K" / "stories260K.bin"
TOK = SHARED / "models" / "stories260K" / "tok512.bin"
VAL = SHARED / "eval" / "tinystories" / "tinystories_val_dev.txt"
BUNDLED = REPO / "examples" / "models" / "stories260K"

needs_shared = pytest.mark.skipif(
    not CKPT.is_file(), reason="needs ../shared/data (real stories260K checkpoint)"
)

# stories260K.md: `./run stories260K.bin -z tok512.bin -t 0.0` (256 steps, prompt included).
EXPECTED_SAMPLE = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
    "she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, "
    '"I want to play with your ball, but I can\'t find it."\n'
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she said, \"I'm sorry, mom. I didn't know what to do.\" Her mom "
    "said, \"Don't worry, Lily. We can help you."
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stories260K")
    llama2c.convert_llama2c(CKPT, TOK, out)
    return out


@pytest.fixture(scope="module")
def model_and_tokenizer(converted):
    return load_causal_lm(converted)


@needs_shared
def test_folder_is_hf_safetensors_float32(converted):
    fmt = read_format(converted)
    assert fmt["format"] == "hf-safetensors" and fmt["dtype"] == "float32"
    assert fmt["converted_from"]["checkpoint_sha256"].startswith("b0a507e7ad0f6266")
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)


@needs_shared
def test_greedy_generation_reproduces_llama2c_sample(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # BOS prepended, as run.c does
    # run.c prints 256 tokens including the 4 forced prompt tokens after BOS: 257 - len(prompt) generated.
    out = model.generate(ids, max_new_tokens=257 - ids.shape[1], do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    first_two = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    assert text.startswith(first_two)
    assert text == EXPECTED_SAMPLE


def reference_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """llama2.c run.c `encode(t, text, bos=1, eos=0)`, written independently of the converter."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])  # add_dummy_prefix
    for ch in text:  # run.c groups UTF-8 bytes into code points, then looks each one up
        b = ch.encode("utf-8")
        if b in lookup:
            tokens.append(lookup[b])
        else:
            tokens.extend(byte + 3 for byte in b)  # byte fallback: <0x00> is token 3
    while True:
        best = (-1e10, -1, -1)  # (score, id, index)
        for i in range(len(tokens) - 1):
            tid = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if tid != -1 and scores[tid] > best[0]:
                best = (scores[tid], tid, i)
        if best[2] == -1:
            return tokens
        _, tid, i = best
        tokens[i : i + 2] = [tid]


def read_tok512() -> tuple[list[bytes], list[float]]:
    data = TOK.read_bytes()
    off, pieces, scores = 4, [], []
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return pieces, scores


@needs_shared
def test_tokenizer_matches_llama2c_encode(model_and_tokenizer):
    _, tok = model_and_tokenizer
    pieces, scores = read_tok512()
    lines = [line for line in VAL.read_text(encoding="utf-8").splitlines() if line.strip()][:300]
    # Edge cases llama2.c treats specially: leading/double spaces, characters outside the vocabulary
    # (byte fallback), digits, the mojibake present in the data, an empty string.
    lines += ["  two leading spaces", "a  b   c", "naïve café — 123 😀", "â€œquotedâ€\x9d", " ", ""]
    for line in lines:
        assert tok(line)["input_ids"] == reference_encode(line, pieces, scores), line
        assert tok.decode(tok(line)["input_ids"], skip_special_tokens=True) == line


@needs_shared
@pytest.mark.slow
def test_perplexity_close_to_reported(model_and_tokenizer):
    from tailor_runtime.ml.perplexity import perplexity

    model, tok = model_and_tokenizer
    # llama2.c's own protocol: non-overlapping windows of the model's full context (512).
    result = perplexity(model, tok, VAL.read_text(), context_length=512, stride=512, max_tokens=32768)
    print(
        f"stories260K perplexity, first 32768 tokens of tinystories_val_dev.txt, ctx 512 non-overlapping: {result}"
    )
    # stories260K.md: val loss 1.2968 (ppl 3.66) on llama2.c's own val split; this text cuts stories into
    # paragraphs that each start with BOS, which costs a little (MANIFEST: about 4). We measure about 3.9 (the test prints it).
    assert 3.5 < result["perplexity"] < 4.5


@needs_shared
def test_bundled_model_equals_fresh_conversion(converted):
    from safetensors.torch import load_file

    assert BUNDLED.is_dir(), "examples/models/stories260K is missing"
    fresh, bundled = load_file(converted / "model.safetensors"), load_file(BUNDLED / "model.safetensors")
    assert fresh.keys() == bundled.keys()
    for name, tensor in fresh.items():
        assert bundled[name].dtype == tensor.dtype and bundled[name].equal(tensor), name
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (BUNDLED / name).read_text() == (converted / name).read_text(), name


def header(*fields: int) -> bytes:
    return struct.pack("<7i", *fields)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x00" * 10, "28-byte header"),
        (header(0x616B3432, 0, 0, 0, 0, 0, 0), "versioned"),
        (header(64, 172, 0, 8, 4, 512, 512), "n_layers=0"),
        (header(64, 172, 5, 7, 4, 512, 512), "divisible"),
        (header(64, 172, 5, 8, 4, 512, 512) + b"\x00" * 100, "implies 1056540 bytes"),
        (header(64, 172, 5, 8, 4, -512, 512) + b"\x00" * 100, "implies 1187612 bytes"),
    ],
)
def test_bad_checkpoint_is_invalid_argument(tmp_path, data, needle):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data)
    tok = tmp_path / "tok.bin"
    tok.write_bytes(struct.pack("<i", 7))
    with pytest.raises(InvalidArgument, match=needle):
        llama2c.convert_llama2c(bad, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_shared
def test_bad_tokenizer_is_invalid_argument(tmp_path):
    tok = tmp_path / "tok.bin"
    tok.write_bytes(TOK.read_bytes()[:-20])
    with pytest.raises(InvalidArgument, match="tok.bin"):
        llama2c.convert_llama2c(CKPT, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@needs_shared
def test_command_line(tmp_path, capsys):
    assert llama2c.main([str(CKPT), str(TOK), str(tmp_path / "cli")]) == 0
    assert '"vocab_size": 512' in capsys.readouterr().out
    assert llama2c.main([str(TOK), str(TOK), str(tmp_path / "bad")]) == 2
    assert "header" in capsys.readouterr().err
