"""The pipeline spec: typed, strict (unknown keys are errors), turned into a DAG of stages.

A spec names a base model, data and stages. Inputs are artifacts: the CLI uploads local paths and
rewrites them to artifact ids before it submits, so the gateway never reads a client's disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tailor_runtime.errors import InvalidArgument

_STRICT = ConfigDict(extra="forbid", frozen=True)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# Bounds checked before anything is parsed or planned: a huge spec must not hold the gateway.
MAX_SPEC_BYTES = 256 << 10
MAX_CANDIDATES = 64  # quantize entries; each is a quantize and a benchmark stage


class Input(BaseModel):
    """An artifact id, or (in a spec file given to the CLI) a local path the CLI uploads first."""

    model_config = _STRICT
    artifact: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    path: str | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.artifact is None) == (self.path is None):
            raise ValueError("give exactly one of 'artifact' (an id) or 'path' (a local file or folder)")
        return self


class ModelInput(BaseModel):
    """The base model: an artifact id, a local Hugging Face folder (the CLI uploads it), or a Hub repo
    (`hub: org/name`, optional `revision`) that the gateway imports once into the store (the `import`
    stage: the same repo and commit is found in the store's recipe index and not downloaded again)."""

    model_config = _STRICT
    artifact: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    path: str | None = None
    hub: str | None = Field(None, description="A Hugging Face model id, org/name.")
    revision: str | None = Field(None, description="Branch, tag or commit of the hub repo (default main).")

    @model_validator(mode="after")
    def _one_of(self):
        given = [k for k in ("artifact", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'artifact' (an id), 'path' (a local Hugging Face folder) or "
                f"'hub' (org/name on the Hugging Face Hub); got {given or 'none'}"
            )
        if self.revision is not None and self.hub is None:
            raise ValueError("'revision' goes with 'hub' (a branch, tag or commit of the repo)")
        if self.hub is not None:
            from tailor_runtime.ml.hub import check_repo, check_revision  # noqa: PLC0415 - no torch

            try:
                check_repo(self.hub)
                check_revision(self.revision)
            except InvalidArgument as exc:
                raise ValueError(exc.message) from None
        return self


class Data(BaseModel):
    model_config = _STRICT
    train: Input | None = None
    eval: Input


class FineTune(BaseModel):
    model_config = _STRICT
    method: str = "lora"
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, ge=0)


class Calibration(BaseModel):
    model_config = _STRICT
    data: Input | None = Field(None, description="Calibration text or JSONL; defaults to data.train.")
    samples: int | None = Field(None, ge=8, le=100_000, description="Sequences (quantizer default 128).")
    seq_len: int | None = Field(None, ge=16, le=131_072, description="Tokens per sequence (default 512).")


class Gate(BaseModel):
    model_config = _STRICT
    max_perplexity_increase_pct: float | None = Field(
        None, ge=0, le=1000, description="Default: select.constraints.max_perplexity_increase_pct, else 5."
    )
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    disabled: bool = False


class Quantize(BaseModel):
    model_config = _STRICT
    method: str
    name: str | None = Field(None, description="Candidate name; defaults to the method.")
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, ge=0)
    calibration: Calibration | None = None
    gate: Gate = Field(default_factory=Gate)


class Benchmark(BaseModel):
    model_config = _STRICT
    config: dict[str, Any] = Field(default_factory=dict)


class Constraints(BaseModel):
    model_config = _STRICT
    max_memory_mb: float | None = Field(None, gt=0, description="Peak resident memory while running.")
    max_size_mb: float | None = Field(None, gt=0, description="Size on disk.")
    max_perplexity_increase_pct: float | None = Field(None, ge=0, description="Quality loss vs the baseline.")
    max_latency_ms_per_token: float | None = Field(None, gt=0)
    min_tokens_per_s: float | None = Field(None, gt=0)


# Spec shorthand -> (measured metric, comparison).
CONSTRAINT_METRICS = {
    "max_memory_mb": ("peak_memory_mb", "at_most"),
    "max_size_mb": ("size_mb", "at_most"),
    "max_perplexity_increase_pct": ("perplexity_increase_pct", "at_most"),
    "max_latency_ms_per_token": ("latency_ms_per_token", "at_most"),
    "min_tokens_per_s": ("tokens_per_s", "at_least"),
}
OBJECTIVE_METRICS = ("perplexity", "size_mb", "latency_ms_per_token", "peak_memory_mb", "tokens_per_s")


class ObjectiveSpec(BaseModel):
    model_config = _STRICT
    metric: Literal["perplexity", "size_mb", "latency_ms_per_token", "peak_memory_mb", "tokens_per_s"]
    maximize: bool = False
    weight: float = Field(1.0, ge=0)


class Select(BaseModel):
    model_config = _STRICT
    constraints: Constraints = Field(default_factory=Constraints)
    objectives: list[ObjectiveSpec] = Field(
        default_factory=lambda: [
            ObjectiveSpec(metric="perplexity", weight=2.0),
            ObjectiveSpec(metric="size_mb"),
            ObjectiveSpec(metric="latency_ms_per_token"),
        ]
    )


class Export(BaseModel):
    model_config = _STRICT
    format: str | None = Field(
        None, description="Export format; default: the target's default format, or onnx without a target."
    )
    target: str | None = Field(
        None, description="Named hardware target (cpu-x86, cpu-arm64, cuda, android, ios, raspberry-pi)."
    )
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_format(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") is None and data.get("target") is None:
            return {**data, "format": "onnx"}
        return data


class PipelineSpec(BaseModel):
    model_config = _STRICT
    apiVersion: Literal["tailor.dev/v1"] = "tailor.dev/v1"  # noqa: N815 - the YAML key
    kind: Literal["Pipeline"] = "Pipeline"
    name: str
    model: ModelInput
    data: Data
    finetune: FineTune | None = None
    quantize: list[Quantize] = Field(default_factory=list)
    benchmark: Benchmark = Field(default_factory=Benchmark)
    select: Select = Field(default_factory=Select)
    export: Export | None = None

    @model_validator(mode="after")
    def _check(self):
        if not _NAME.match(self.name):
            raise ValueError("name must be 1-63 lowercase letters, digits, '.', '_' or '-'")
        if self.finetune is not None and self.data.train is None:
            raise ValueError("finetune needs data.train")
        names = [q.name or q.method for q in self.quantize]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"quantize candidates need unique names; repeated: {duplicates} (set 'name')")
        reserved = sorted({"original", "base"} & set(names))
        if reserved:
            raise ValueError(
                f"{reserved} reserved: 'original' is the unquantized model, 'base' the model before "
                "fine-tuning (set 'name')"
            )
        return self

    def inputs(self) -> dict[str, Input | ModelInput]:
        """Every input that is an artifact id or a local path (a hub model is the import stage's)."""
        found: dict[str, Input | ModelInput] = {} if self.model.hub is not None else {"model": self.model}
        found["data.eval"] = self.data.eval
        if self.data.train is not None:
            found["data.train"] = self.data.train
        for i, q in enumerate(self.quantize):
            if q.calibration is not None and q.calibration.data is not None:
                found[f"quantize[{i}].calibration.data"] = q.calibration.data
        return found


def parse_spec(text: str, *, require_artifacts: bool = True) -> PipelineSpec:
    """YAML -> PipelineSpec; every problem reported with the path of the offending field."""
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument(
            f"pipeline spec is {size} bytes; at most {MAX_SPEC_BYTES} are accepted "
            "(configs belong in the spec, data and models in artifacts)"
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"pipeline spec is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument("pipeline spec must be a YAML mapping with name, model, data and stages")
    candidates = raw.get("quantize")
    if isinstance(candidates, list) and len(candidates) > MAX_CANDIDATES:
        raise InvalidArgument(
            f"quantize lists {len(candidates)} candidates; at most {MAX_CANDIDATES} per pipeline "
            "(split the search into several pipelines)"
        )
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArgument(f"invalid pipeline spec: {problems}") from None
    if require_artifacts:
        local = [k for k, v in spec.inputs().items() if v.path is not None]
        if local:
            raise InvalidArgument(
                f"the gateway takes artifact ids, not local paths ({', '.join(local)}): "
                "upload them first (`tailor pipeline run` does this for you)"
            )
    return spec


@dataclass
class StagePlan:
    name: str
    kind: str  # import, finetune, quantize, benchmark, select, export, report
    depends_on: list[str] = field(default_factory=list)
    # What the stage needs beyond its dependencies' results (method, config, candidate name...).
    params: dict[str, Any] = field(default_factory=dict)


def plan(spec: PipelineSpec) -> list[StagePlan]:
    """The DAG: [import ->] finetune -> quantize (fan-out) -> benchmark each -> select (fan-in) -> export
    -> report. A hub model is imported by the gateway itself first (the `import` stage)."""
    stages: list[StagePlan] = []
    source = []
    if spec.model.hub is not None:
        params = {"hub": spec.model.hub, "revision": spec.model.revision or "main"}
        stages.append(StagePlan("import", "import", [], params))
        source = ["import"]
    benchmarks = []
    if spec.finetune is not None:
        # The base model is measured too, as a reference row beside the fine-tuned one (not a candidate):
        # what fine-tuning changed, on the same tokens.
        stages.append(StagePlan("benchmark/base", "benchmark", list(source), {"candidate": "base"}))
        benchmarks.append("benchmark/base")
        stages.append(StagePlan("finetune", "finetune", list(source), spec.finetune.model_dump()))
        source = ["finetune"]
    benchmarks.append("benchmark/original")
    stages.append(StagePlan("benchmark/original", "benchmark", list(source), {"candidate": "original"}))
    for q in spec.quantize:
        name = q.name or q.method
        stages.append(
            StagePlan(f"quantize/{name}", "quantize", list(source), {**q.model_dump(), "candidate": name})
        )
        stages.append(StagePlan(f"benchmark/{name}", "benchmark", [f"quantize/{name}"], {"candidate": name}))
        benchmarks.append(f"benchmark/{name}")
    stages.append(StagePlan("select", "select", benchmarks, {}))
    last = "select"
    if spec.export is not None:
        stages.append(StagePlan("export", "export", ["select"], spec.export.model_dump()))
        last = "export"
    stages.append(StagePlan("report", "report", [last], {}))
    return stages
