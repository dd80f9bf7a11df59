"""What one benchmark measures, and how (the `config` Struct of a BenchmarkRequest)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tailor_runtime import metrics_catalogue as mc


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Defaults shared with the quantizer's accuracy gate, which measures on the same tokens.
    max_eval_tokens: int = Field(
        mc.PERPLEXITY_EVAL_TOKENS,
        ge=2,
        le=10_000_000,
        description="Perplexity uses the first this many tokens of the text.",
    )
    context_length: int = Field(
        mc.PERPLEXITY_CONTEXT_LENGTH, ge=2, le=131_072, description="Tokens per perplexity window."
    )
    stride: int = Field(
        mc.PERPLEXITY_STRIDE, ge=1, description="Tokens between window starts; <= context_length."
    )
    split_documents: bool = Field(
        True, description="Blank-line-separated documents each start with BOS; False: one document, one BOS."
    )
    latency_prompt: str = Field("Once upon a time", min_length=1, description="Prompt of the decode timing.")
    latency_new_tokens: int = Field(
        32, ge=2, le=4096, description="Tokens generated per timed run (EOS ignored)."
    )
    warmup: int = Field(1, ge=0, le=100, description="Untimed runs before the timed ones.")
    # Bounded: each run takes seconds on a real model; 1e9 of them would hold a worker for ever.
    repetitions: int = Field(3, ge=1, le=1000, description="Timed runs.")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for torch / ONNX Runtime; None: default."
    )
    batch_sizes: tuple[int, ...] = Field(
        (1, 4),
        min_length=1,
        description="Batch sizes of the decode-throughput runs (the same prompt repeated in each row).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where PyTorch formats run: 'auto' (a CUDA GPU when the worker has one, for the formats "
        "that run on one; CPU otherwise), 'cpu', or 'cuda' (fails when there is no GPU or the format runs "
        "on CPU only: int8-dynamic, ONNX, GGUF).",
    )
    static_cache: bool | None = Field(
        None,
        description="Decode timing with a preallocated (static) KV cache; None: on a GPU. Quality metrics "
        "do not depend on it.",
    )
    compile: bool | None = Field(
        None,
        description="With a static cache, compile the decode step (torch.compile, CUDA graphs on a GPU); "
        "None: on a GPU. The first (warm-up) run pays the compilation.",
    )
    agreement_max_tokens: int = Field(
        2048,
        ge=2,
        le=1_000_000,
        description="With a reference model: top-1 agreement and KL(reference || model) over the first this "
        "many eval tokens, in the perplexity windows.",
    )
    choice_max_examples: int = Field(
        64, ge=1, le=100_000, description="With choice data (SST-2 TSV): examples scored by log-likelihood."
    )
    generation_examples: int = Field(
        0,
        ge=0,
        le=10_000,
        description="Eval documents continued greedily and scored against their own text (exact match, "
        "BLEU, ROUGE-L); 0: off.",
    )
    generation_prompt_tokens: int = Field(
        32, ge=1, le=8192, description="Tokens of each document given as the prompt."
    )
    generation_new_tokens: int = Field(
        16, ge=1, le=4096, description="Tokens generated and compared with the document's next tokens."
    )

    @model_validator(mode="after")
    def _stride_within_context(self) -> BenchmarkConfig:
        if self.stride > self.context_length:
            raise ValueError(f"stride ({self.stride}) must not exceed context_length ({self.context_length})")
        if self.compile and self.static_cache is False:
            raise ValueError("compile needs static_cache (a compiled step needs fixed shapes)")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive, got {list(self.batch_sizes)}")
        return self
