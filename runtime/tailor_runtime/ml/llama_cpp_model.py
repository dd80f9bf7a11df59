"""LlamaCppCausalLM: a `gguf` model folder run by llama.cpp (llama-cpp-python) on CPU, called like an HF causal LM.

`model(input_ids=..., past_key_values=..., use_cache=...)` returns an object with `.logits` (float32 torch
tensor [batch, tokens, vocab]) and `.past_key_values`, and `model.config` is the folder's HF config, so the
code written for PyTorch models (sliding-window perplexity, agreement with the parent, the benchmarker's
greedy decoding with a KV cache, its task metrics) measures a GGUF in llama.cpp unchanged, as
`tailor_runtime.ml.onnx.session.OnnxCausalLM` does for ONNX Runtime.

Tokens. The ids are the folder's tokenizer's (the source model's, copied beside the GGUF), fed to llama.cpp
as ids, so both runtimes see identical tokens; `check_vocab` makes sure the GGUF's vocabulary gives those
ids the same pieces.

Logits. As an HF model's forward, every call returns the logits of every position it evaluates
(`logits_all`): llama.cpp computes the output matrix for all of them, as PyTorch does.

KV cache. llama.cpp keeps the cache inside its context, so `past_key_values` is only a ticket
(`LlamaCppPast`: how many tokens the context holds for this sequence); a call with a ticket continues the
sequence, a call without one starts a new sequence. One sequence (or one batch) is live at a time: a stale
ticket is refused rather than silently decoding against another sequence's cache.

Batches. Batch 1 runs in llama-cpp-python's `Llama` (its `eval`). A batch of `b > 1` rows (equal lengths, no
padding) runs in a second llama.cpp context opened with `n_seq_max = max_batch`, one sequence per row, every
row's tokens in the same `llama_decode` call (llama.cpp's own parallel decoding, as llama-batched-bench and
the server's slots use it), so batch throughput is really batched, not rows run one after another.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.ml.gguf_io import require_llama_cpp

RUNTIME = "llama.cpp"
PACKAGE = "llama-cpp-python"
# Tokens per physical llama.cpp batch (llama.cpp's own default n_ubatch); a window may span several.
UBATCH = 512
CTX_PAD = 256  # llama.cpp rounds context sizes up to a multiple of this


def llama_cpp_version() -> str | None:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class LlamaCppPast:
    """Where a sequence stands in its llama.cpp context: the context keeps the cache itself."""

    epoch: int  # which sequence (a new one starts with every call without a ticket)
    tokens: int  # tokens of each row the context holds
    rows: int


class _Native:
    """The llama.cpp objects of one model, freed in the right order (contexts before the model)."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.batch_ctx = None
        self.batch = None

    def close(self) -> None:
        import llama_cpp

        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.batch_ctx is not None:
            llama_cpp.llama_free(self.batch_ctx)
            self.batch_ctx = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class LlamaCppCausalLM(torch.nn.Module):
    """The GGUF of a `gguf` folder in llama.cpp, behind a torch.nn.Module forward (CPU only)."""

    def __init__(
        self,
        folder: Path,
        threads: int | None = None,
        n_ctx: int | None = None,
        max_batch: int = 1,
        batch_n_ctx: int | None = None,
        seed: int = 0,
    ):
        """`n_ctx`: tokens a batch-1 sequence may hold (default and cap: the model's context); `max_batch`: the
        largest batch to decode, each row holding up to `batch_n_ctx` tokens (default `n_ctx`). llama.cpp
        allocates the KV cache for all of them when the model is opened."""
        require_llama_cpp("running a GGUF model")
        import llama_cpp
        from transformers import AutoConfig

        from tailor_runtime.ml.model_io import read_format

        super().__init__()
        folder = Path(folder)
        fmt = read_format(folder)
        self.path = folder / fmt.get("file", "model.gguf")
        if not self.path.is_file():
            raise FailedPrecondition(f"{folder} declares format 'gguf' but has no {self.path.name}")
        self.gguf_type = fmt.get("gguf_type")
        self.config = AutoConfig.from_pretrained(folder, local_files_only=True)
        train_ctx = int(self.config.max_position_embeddings)
        self.n_ctx = min(n_ctx or train_ctx, train_ctx)
        self.batch_n_ctx = min(batch_n_ctx or self.n_ctx, train_ctx)
        if max_batch < 1:
            raise InvalidArgument(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        # llama.cpp threads: as many as torch uses in this process (the benchmarker sets both), as ONNX does.
        self.threads = threads or torch.get_num_threads()
        llm = llama_cpp.Llama(
            model_path=str(self.path),
            n_ctx=self.n_ctx,
            n_batch=self.n_ctx,  # one perplexity window is one llama_decode call
            n_ubatch=min(self.n_ctx, UBATCH),
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=True,  # every position's logits, as an HF forward gives them
            seed=seed,
            verbose=False,
        )
        self._native = _Native(llm)
        weakref.finalize(self, self._native.close)  # at exit too, before llama_cpp's own module teardown
        self.n_vocab = llm.n_vocab()
        if self.n_vocab != self.config.vocab_size:
            raise FailedPrecondition(
                f"{self.path.name} has {self.n_vocab} tokens, its folder's config.json {self.config.vocab_size}"
            )
        if max_batch > 1:
            self._open_batch_context(max_batch)
        self._epoch = 0
        self._tokens = 0
        self._rows = 0

    # --- what the benchmark records ----------------------------------------------------------------------

    def weight_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them (llama_model_size)."""
        import llama_cpp

        return int(llama_cpp.llama_model_size(self._native.llm.model))

    def info(self) -> dict[str, Any]:
        import llama_cpp

        return {
            "runtime": RUNTIME,
            "llama_cpp_python": llama_cpp_version(),
            "llama_cpp_threads": self.threads,
            "gguf_type": self.gguf_type,
            "gguf_file": self.path.name,
            "n_ctx": self.n_ctx,
            "max_batch": self.max_batch,
            "batch_n_ctx": self.batch_n_ctx if self.max_batch > 1 else None,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }

    def check_vocab(self, tokenizer: Any, sample: str | None = None) -> dict[str, Any]:
        """FailedPrecondition unless every id of `tokenizer` names the same piece in the GGUF's vocabulary.

        With `sample`, also records whether llama.cpp's own tokenizer encodes it to the same ids (it is not
        used for measuring: the tokenizer's ids are fed to llama.cpp directly)."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self._native.llm.model)
        count = min(len(tokenizer), self.n_vocab)
        pieces = tokenizer.convert_ids_to_tokens(list(range(count)))
        differ = [
            i
            for i, piece in enumerate(pieces)
            if llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", errors="replace") != piece
        ]
        if len(tokenizer) > self.n_vocab or differ:
            shown = ", ".join(
                f"{i}: {pieces[i]!r} vs {llama_cpp.llama_vocab_get_text(vocab, i)!r}" for i in differ[:5]
            )
            raise FailedPrecondition(
                f"{self.path.name}'s vocabulary ({self.n_vocab} tokens) does not match the folder's tokenizer "
                f"({len(tokenizer)} tokens; {len(differ)} pieces differ{': ' + shown if shown else ''}): the "
                "token ids fed to llama.cpp would not mean the same text"
            )
        result: dict[str, Any] = {"pieces_compared": count, "pieces_differing": 0}
        if sample is not None:
            ids = list(tokenizer(sample, add_special_tokens=True)["input_ids"])
            add_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
            own = self._native.llm.tokenize(sample.encode(), add_bos=add_bos, special=False)
            result["llama_cpp_tokenizer_agrees_on_sample"] = own == ids
        return result

    def close(self) -> None:
        """Free llama.cpp's context(s) and model now (they are freed at exit otherwise)."""
        self._native.close()

    # --- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: LlamaCppPast | None = None,
        use_cache: bool = False,
        **_: Any,
    ) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if self._native.llm is None:
            raise FailedPrecondition(f"{self.path.name}: the llama.cpp model was closed")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise InvalidArgument(
                "llama.cpp runs unpadded rows only (an attention_mask with zeros was given)"
            )
        if position_ids is not None:
            raise InvalidArgument("llama.cpp places tokens itself; position_ids are not supported")
        rows = [list(map(int, row)) for row in input_ids.detach().cpu().tolist()]
        if not rows or not rows[0]:
            raise InvalidArgument("no tokens to evaluate")
        start = self._continue(past_key_values, len(rows))
        length = len(rows[0])
        if len(rows) == 1:
            logits = self._eval_one(rows[0], start)
        else:
            logits = self._eval_batch(rows, start)
        self._tokens, self._rows = start + length, len(rows)
        past = LlamaCppPast(self._epoch, self._tokens, self._rows) if use_cache else None
        return CausalLMOutputWithPast(logits=torch.from_numpy(logits), past_key_values=past)

    def _continue(self, past: LlamaCppPast | None, rows: int) -> int:
        """Tokens already in the context for this call: 0 (a new sequence) or the ticket's, if still live."""
        if past is None:
            self._epoch += 1
            return 0
        if not isinstance(past, LlamaCppPast) or (past.epoch, past.tokens, past.rows) != (
            self._epoch,
            self._tokens,
            rows,
        ):
            raise InvalidArgument(
                "stale past_key_values: the llama.cpp context holds one sequence (or batch) at a time, and "
                "it has moved on since this one"
            )
        return past.tokens

    def _eval_one(self, tokens: list[int], start: int) -> np.ndarray:
        llm = self._native.llm
        if start + len(tokens) > self.n_ctx:
            raise InvalidArgument(
                f"{start + len(tokens)} tokens exceed the llama.cpp context of {self.n_ctx} tokens"
            )
        if start == 0:
            llm.reset()  # eval() then drops the cache from position 0 on
        llm.eval(tokens)
        return np.array(llm.scores[start : start + len(tokens)], dtype=np.float32)[None]

    def _open_batch_context(self, max_batch: int) -> None:
        import llama_cpp

        if max_batch > llama_cpp.llama_max_parallel_sequences():
            raise InvalidArgument(
                f"llama.cpp decodes at most {llama_cpp.llama_max_parallel_sequences()} sequences together, "
                f"asked for batches of {max_batch}"
            )
        # llama.cpp pads a context to a multiple of 256 cells and splits it evenly between the sequences (no
        # unified KV cache): ask for that padded size per row, so the split is exact.
        per_row = -(-self.batch_n_ctx // CTX_PAD) * CTX_PAD
        tokens = max_batch * per_row
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = tokens
        params.n_batch = tokens
        params.n_ubatch = min(tokens, UBATCH)
        params.n_seq_max = max_batch
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self._native.llm.model, params)
        if not ctx:
            raise FailedPrecondition(f"llama.cpp could not open a context for batches of {max_batch}")
        self._native.batch_ctx = ctx
        self._native.batch = llama_cpp.llama_batch_init(tokens, 0, 1)

    def _eval_batch(self, rows: list[list[int]], start: int) -> np.ndarray:
        import llama_cpp

        if len(rows) > self.max_batch:
            raise InvalidArgument(
                f"batch of {len(rows)} rows, but the model was opened for up to {self.max_batch}"
            )
        length = len(rows[0])
        if any(len(row) != length for row in rows):
            raise InvalidArgument("llama.cpp batch rows must have the same length (no padding)")
        if start + length > self.batch_n_ctx:
            raise InvalidArgument(
                f"{start + length} tokens per row exceed the batch context of {self.batch_n_ctx} tokens"
            )
        ctx, batch = self._native.batch_ctx, self._native.batch
        if start == 0:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        n = 0
        for seq, row in enumerate(rows):
            for i, token in enumerate(row):
                batch.token[n] = token
                batch.pos[n] = start + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise FailedPrecondition(
                f"llama_decode of a batch of {len(rows)} x {length} tokens returned {rc}"
            )
        # Outputs come in the batch's order: row by row, position by position.
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, self.n_vocab))
        return out.reshape(len(rows), length, self.n_vocab).copy()
