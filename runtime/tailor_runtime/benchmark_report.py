"""The benchmark report: what the benchmarker writes (`report.json`, kind "report", format
"tailor-benchmark") and the selector, the pipeline report and the CLI read. Pure pydantic: no torch.

One type for one document, so the keys are known in one place: the benchmarker builds a
`BenchmarkReport`, every reader parses with `BenchmarkReport.parse` (or `Environment.parse` for the
machine block a pipeline summary carries), and a document that does not match is an `InvalidArgument`
naming the field, not a KeyError three modules away. `headline()` turns a report into the headline
metrics under the names of `tailor_runtime.metrics_catalogue`.

Units: every `_ms` is milliseconds, every `_mb` MiB (2**20 bytes), rates are tokens per second.

Compatibility: reports stored by earlier versions carry no `schema_version` (read as 1), may lack the
figures measured later (p99, the environment, the compile flags: optional here), and the first ones held
the model's artifact id under `model` (read into `model_id`). A report from a newer schema is refused with
the version it has.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tailor_runtime.errors import InvalidArgument

SCHEMA_VERSION = 1
FORMAT = "tailor-benchmark"  # the artifact format of a stored report


class _Strict(BaseModel):
    """A part written by one function of the benchmarker: its keys are known, an unknown one is an error."""

    model_config = ConfigDict(extra="forbid")


class Gpu(_Strict):
    """The CUDA device a model was measured on (`tailor_benchmarker.child.gpu_info`)."""

    name: str = ""
    compute_capability: str | None = None
    memory_total_mb: float | None = None
    cuda: str | None = None  # the CUDA version torch was built with


class Threads(_Strict):
    torch_intra_op: int | None = None
    torch_inter_op: int | None = None
    llama_cpp: int | None = None  # a gguf model's llama.cpp threads


class Environment(_Strict):
    """The machine and software a result was measured with (`tailor_benchmarker.run.environment`)."""

    cpu_model: str = ""
    cpu_count: int | None = None
    cpus_usable: int | None = None  # what a container or taskset allows
    memory_total_mb: float | None = None
    gpu: Gpu | None = None  # None: measured on the CPU
    threads: Threads = Field(default_factory=Threads)
    hostname: str = ""
    platform: str = ""
    python: str = ""
    versions: dict[str, str | None] = Field(default_factory=dict)  # package -> version, None: not installed

    @classmethod
    def parse(cls, data: Any, source: str = "environment") -> Environment:
        """The environment block of a report or a pipeline summary; empty or missing: nothing known."""
        return _validate(cls, data or {}, source)

    def cores(self) -> int | None:
        return self.cpus_usable or self.cpu_count

    def describe(self) -> str:
        """One line naming what a measurement ran on (the CLI's "measured on")."""
        threads = self.threads.torch_intra_op
        parts = [
            self.cpu_model or "unknown CPU",
            f"{self.cores() or '?'} cores",
            f"{threads} torch thread(s)" if threads else "",
            *(
                f"{name} {self.versions[name]}"
                for name in ("torch", "transformers")
                if self.versions.get(name)
            ),
        ]
        return ", ".join(p for p in parts if p)


class ModelInfo(BaseModel):
    """How the measured model was loaded; runtime-specific keys (ONNX Runtime threads, llama.cpp's
    context and vocabulary check, packed 4-bit layers) are kept as they are."""

    model_config = ConfigDict(extra="allow")

    format: str | None = None
    runtime: str | None = None  # "torch", "onnxruntime" or llama.cpp's
    dtype: str | None = None
    device: str | None = None
    folder: str | None = None  # a reference model's folder name


class Memory(_Strict):
    """Process and GPU memory, MiB (`tailor_benchmarker.child.measure`)."""

    baseline_rss_mb: float | None = None  # after imports, before the model
    rss_after_load_mb: float | None = None
    peak_rss_mb: float  # ru_maxrss, read before any reference model was loaded
    peak_rss_over_baseline_mb: float | None = None
    gpu_allocated_after_load_mb: float | None = None  # present only for a model measured on a GPU
    gpu_peak_allocated_mb: float | None = None


class Perplexity(_Strict):
    perplexity: float
    mean_nll: float | None = None
    tokens_scored: int = 0
    tokens_total: int | None = None
    windows: int | None = None
    context_length: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    split_documents: bool | None = None
    text_truncated: bool | None = None
    protocol: str | None = None


class Stats(_Strict):
    """Milliseconds over the timed runs (`tailor_benchmarker.latency._ms_stats`)."""

    median: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None  # reports written before p99 was measured have none
    mean: float | None = None
    stdev: float | None = None
    iqr: float | None = None
    min: float | None = None
    max: float | None = None
    count: int | None = None


class Throughput(_Strict):
    """The decode rate of one batch size (tokens of all rows per second)."""

    batch_size: int | None = None
    tokens_per_s: float
    ms_per_step: float | None = None
    ttft_ms: float | None = None
    compiled: bool | None = None
    pipelined_tokens_per_s: float | None = None


class Latency(_Strict):
    """Greedy-decoding timing at batch 1, and the batch throughput (`tailor_benchmarker.latency`)."""

    prompt_tokens: int | None = None
    new_tokens: int | None = None
    warmup: int | None = None
    repetitions: int | None = None
    kv_cache: bool | None = None
    kv_cache_kind: Literal["static", "dynamic"] | None = None
    compiled: bool | None = None
    compile_error: str | None = None
    ttft_ms: Stats = Field(default_factory=Stats)
    per_token_ms: Stats = Field(default_factory=Stats)  # inter-token latency
    ms_per_token: float  # the median of per_token_ms
    tokens_per_s: float | None = None  # the median run's decode rate (the headline is 1000 / ms_per_token)
    pipelined_tokens_per_s: float | None = None  # static cache: decoded without per-token waits
    end_to_end_tokens_per_s: float | None = None
    total_ms: Stats | None = None
    throughput: dict[str, Throughput] = Field(default_factory=dict)  # batch size (a string key) -> rate
    torch_threads: int | None = None
    sample: str | None = None  # the prompt and its greedy continuation


class Agreement(_Strict):
    """Agreement with the reference (parent) model (`tailor_runtime.ml.agreement`)."""

    top1_agreement: float
    kl_divergence: float  # mean KL(reference || model), nats
    kl_divergence_max: float | None = None
    positions: int | None = None
    context_length: int | None = None
    stride: int | None = None
    max_tokens: int | None = None
    protocol: str | None = None
    reference: ModelInfo | None = None


class MultipleChoice(_Strict):
    accuracy: float
    accuracy_norm: float | None = None
    examples: int | None = None
    chance: float | None = None
    template: str | None = None
    choices: list[str] | None = None


class GenerationSample(_Strict):
    prediction: str
    reference: str


class Generation(_Strict):
    exact_match: float
    bleu: float
    rouge_l: float
    examples: int | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    sample: GenerationSample | None = None


class BenchmarkReport(_Strict):
    """One model's benchmark: the stored `report.json`."""

    schema_version: int = SCHEMA_VERSION
    model_id: str = ""  # the measured model's artifact id
    reference_model: str = ""  # the reference model's artifact id, when agreement was measured
    model: ModelInfo = Field(default_factory=ModelInfo)
    model_memory_mb: float  # weight bytes
    size_on_disk_mb: float | None = None  # the folder; reports without it fall back to model_memory_mb
    memory: Memory
    perplexity: Perplexity
    latency: Latency
    agreement: Agreement | None = None
    multiple_choice: MultipleChoice | None = None
    generation: Generation | None = None
    threads: Threads | None = None
    gpu: Gpu | None = None
    wall_s: float | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the BenchmarkConfig it was measured with
    environment: Environment = Field(default_factory=Environment)

    @model_validator(mode="before")
    @classmethod
    def _old_model_id(cls, data: Any) -> Any:
        # The first reports held the artifact id under "model"; later ones the load info.
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model_id": data["model"]}
            data.pop("model")
        return data

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if not 1 <= version <= SCHEMA_VERSION:
            raise ValueError(f"schema version {version} is not one this Tailor reads (1 to {SCHEMA_VERSION})")
        return version

    @classmethod
    def parse(cls, data: Any, source: str = "benchmark report") -> BenchmarkReport:
        """A report from its JSON text (str or bytes) or decoded dict; InvalidArgument naming the field."""
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise InvalidArgument(f"{source}: not JSON ({exc})") from None
        return _validate(cls, data, source)

    def dump(self) -> dict[str, Any]:
        """The JSON-ready dict that is stored: the fields that were given (a report parsed from a stored
        one dumps as it was read; the parts a run did not measure stay out)."""
        return self.model_dump(mode="python", exclude_unset=True)

    def dump_json(self) -> str:
        return json.dumps(self.dump(), indent=2)

    @property
    def device(self) -> str:
        """Where the model ran: "cuda" when the GPU allocator was read, else "cpu"."""
        return "cuda" if self.memory.gpu_peak_allocated_mb is not None else "cpu"

    def headline(self) -> dict[str, Any]:
        """The numbers the selector and the report compare, under the names the whole platform uses.

        `peak_memory_mb` is the memory the model needed where it ran: the GPU's peak allocation for a model
        measured on a GPU (`device` "cuda"), the process's peak RSS on a CPU; `peak_rss_mb` is always the
        RSS (the roofline's CPU targets use it). `tokens_per_s` is 1000 / the median ms per token, so the
        two columns shown side by side are one aggregation (the catalogue, `tailor_runtime.metrics_catalogue`,
        labels them); the report keeps the median run's rate as `latency.tokens_per_s`."""
        memory, ms_per_token = self.memory, self.latency.ms_per_token
        on_gpu = self.device == "cuda"
        return {
            "perplexity": self.perplexity.perplexity,
            "latency_ms_per_token": ms_per_token,
            "tokens_per_s": 1000.0 / ms_per_token if ms_per_token > 0 else math.nan,
            "device": self.device,
            "peak_memory_mb": memory.gpu_peak_allocated_mb if on_gpu else memory.peak_rss_mb,
            "peak_rss_mb": memory.peak_rss_mb,
            "model_memory_mb": self.model_memory_mb,
            "size_mb": self.model_memory_mb if self.size_on_disk_mb is None else self.size_on_disk_mb,
            "eval_tokens": self.perplexity.tokens_scored,
            "environment": self.environment.model_dump(mode="python", exclude_unset=True),
            **self.optional_metrics(),
        }

    def optional_metrics(self) -> dict[str, float]:
        """Headline numbers of the measurements a request asked for (reference model, tasks, batches)."""
        lat = self.latency
        candidates = {
            "ttft_ms": lat.ttft_ms.median,
            "latency_p95_ms": lat.per_token_ms.p95,
            "latency_p99_ms": lat.per_token_ms.p99,
            "tokens_per_s_pipelined": lat.pipelined_tokens_per_s,
        }
        found = {k: v for k, v in candidates.items() if v is not None}
        for b, row in lat.throughput.items():
            found[f"tokens_per_s_batch_{b}"] = row.tokens_per_s
        if self.agreement is not None:
            found["top1_agreement"] = self.agreement.top1_agreement
            found["kl_divergence"] = self.agreement.kl_divergence
        if self.multiple_choice is not None:
            found["choice_accuracy"] = self.multiple_choice.accuracy
        if self.generation is not None:
            gen = self.generation
            found.update(exact_match=gen.exact_match, bleu=gen.bleu, rouge_l=gen.rouge_l)
        return found


def _validate(model: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors()[:5])
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise InvalidArgument(f"{source}: not a valid {_TITLES[model]}: {problems}{more}") from None


def _problem(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(the document)"
    if error["type"] == "missing":
        return f"{where}: missing"
    if error["type"] == "extra_forbidden":
        return f"{where}: not a field of this schema"
    return f"{where}: {error['msg']}"


_TITLES: dict[type[BaseModel], str] = {
    BenchmarkReport: f"benchmark report (schema {SCHEMA_VERSION})",
    Environment: "environment block",
}
