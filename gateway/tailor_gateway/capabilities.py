"""Method and format names in a spec checked at submit, against what the worker pools offer.

CreatePipeline asks each pool the spec needs (quantizer ListMethods, trainer ListMethods, exporter
ListFormats) with a short deadline, and caches the answer for a few seconds, so a burst of submissions
costs one round of calls; past that, the last answer still serves while a new round runs in the
background (only a gateway that never had an answer waits, at most the deadline; it asks at start). A name that no answering worker lists is INVALID_ARGUMENT, with the field
path and the valid choices. When no worker of a pool answers (none running yet, all busy restarting,
a pool scaling up from zero), the spec is accepted: dispatch checks the name again on the worker and
fails the stage with the same INVALID_ARGUMENT, so nothing is lost by not knowing now.

With the model's architecture family (read from its config.json in the store), every stage is also
checked against the architecture registry (`tailor_runtime.ml.architectures`: what the code cannot do
for that family, with the reason) and against the families each worker lists for the name
(`MethodInfo.architectures`), so a pipeline whose export cannot take a Qwen2 model is refused before
the fine-tune runs, not after.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc

from tailor.exporter.v1 import exporter_service_pb2 as export_pb
from tailor.exporter.v1 import exporter_service_pb2_grpc as export_grpc
from tailor.quantizer.v1 import quantizer_service_pb2 as quant_pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as quant_grpc
from tailor.trainer.v1 import trainer_service_pb2 as train_pb
from tailor.trainer.v1 import trainer_service_pb2_grpc as train_grpc
from tailor_gateway.config_check import check_config
from tailor_gateway.spec import PipelineSpec
from tailor_gateway.spec import plan as stage_dag
from tailor_gateway.workers import WorkerPools
from tailor_runtime import planner
from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.ml import architectures
from tailor_runtime.stage import config_schema_json

log = logging.getLogger("tailor.gateway.capabilities")


@functools.cache
def _benchmark_schema() -> str:
    """BenchmarkConfig's JSON Schema, built once: pydantic takes ~2.3 ms (idle core) on the event loop, which
    was 15% of the gateway's loop under the 100-client load bench when built per submission."""
    from tailor_benchmarker.config import BenchmarkConfig

    return config_schema_json(BenchmarkConfig)


# pool -> the call that lists its names on one worker's channel.
_LISTERS = {
    "quantizer": lambda ch, t: quant_grpc.QuantizerServiceStub(ch).ListMethods(
        quant_pb.ListMethodsRequest(), timeout=t
    ),
    "trainer": lambda ch, t: train_grpc.TrainerServiceStub(ch).ListMethods(
        train_pb.ListMethodsRequest(), timeout=t
    ),
    "exporter": lambda ch, t: export_grpc.ExporterServiceStub(ch).ListFormats(
        export_pb.ListFormatsRequest(), timeout=t
    ),
}
# kind of name -> (the pool that lists it, what the names are, the reply's field). The exporter's one
# reply lists both its formats and its targets.
_KINDS = {
    "quantizer": ("quantizer", "quantization method", "methods"),
    "trainer": ("trainer", "fine-tuning method", "methods"),
    "exporter": ("exporter", "export format", "formats"),
    "export-target": ("exporter", "export target", "targets"),
}
# kind of name -> the stage prefix of its architecture capability key ("quantize/awq").
_STAGE = {"quantizer": "quantize", "trainer": "finetune", "exporter": "export"}


class Capabilities:
    def __init__(self, pools: WorkerPools, timeout_s: float = 2.0, ttl_s: float = 5.0):
        self.pools, self.timeout_s, self.ttl_s = pools, timeout_s, ttl_s
        # pool -> (when asked, the replies of the workers that answered, or None when none did)
        self._cache: dict[str, tuple[float, list | None]] = {}
        self._inflight: dict[str, asyncio.Future] = {}

    async def offered(self, kind: str) -> frozenset[str] | None:
        """Names of a kind the pool's workers list (the union over those that answered); None if none
        answered."""
        pool, _, field = _KINDS[kind]
        replies = await self._replies(pool)
        if replies is None:
            return None
        return frozenset(item.name for reply in replies for item in getattr(reply, field))

    async def _replies(self, pool: str) -> list | None:
        cached = self._cache.get(pool)
        if cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        # Concurrent submissions (and several kinds of name of one pool) share one round of calls.
        if pool not in self._inflight:
            self._inflight[pool] = asyncio.ensure_future(self._ask(pool))
            self._inflight[pool].add_done_callback(lambda _f: self._inflight.pop(pool, None))
        if cached and cached[1] is not None:
            # (Only a real answer: "nobody answered", from a start before the workers were up, is not
            # served stale, or every submission would skip the checks until a round happened to finish.)
            # The last answer serves while the new round runs: a worker slow to list (a cold one imports
            # every method's libraries first, ~7 s) must not hold up submissions (issue 23's load bar).
            return cached[1]
        return await asyncio.shield(self._inflight[pool])

    async def listing(self) -> dict[str, list | None]:
        """pool -> its workers' replies (None: none answered), for the gateway's ListCapabilities."""
        pools = list(_LISTERS)
        replies = await asyncio.gather(*(self._replies(pool) for pool in pools))
        return dict(zip(pools, replies, strict=True))

    async def warm(self) -> None:
        """Ask every pool now (at gateway start), so that the first submissions find an answer."""
        await asyncio.gather(*(self._replies(pool) for pool in _LISTERS))

    async def _ask(self, pool: str) -> list | None:
        call = _LISTERS[pool]
        addresses = list(self.pools.pools.get(pool) or [])
        replies = await asyncio.gather(
            *(call(self.pools.channel(a), self.timeout_s) for a in addresses), return_exceptions=True
        )
        answered = []
        for address, reply in zip(addresses, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                log.info("%s %s did not list its names: %s", pool, address, reply.code().name)
                continue
            if isinstance(reply, BaseException):
                log.warning("%s %s: listing failed", pool, address, exc_info=reply)
                continue
            answered.append(reply)
        result = answered or None
        self._cache[pool] = (time.monotonic(), result)
        return result

    async def check(self, spec: PipelineSpec, model_config: dict | None = None) -> None:
        """INVALID_ARGUMENT for the first name in the spec that its pool does not offer, or (given the
        model's config.json) that cannot take the model's architecture family."""
        wanted: list[tuple[str, str, str]] = []  # (field path, kind of name, name)
        if spec.finetune is not None:
            wanted.append(("finetune.method", "trainer", spec.finetune.method))
        wanted += [(f"quantize.{i}.method", "quantizer", q.method) for i, q in enumerate(spec.quantize)]
        if spec.export is not None and spec.export.format is not None:
            wanted.append(("export.format", "exporter", spec.export.format))
        if spec.export is not None and spec.export.target is not None:
            wanted.append(("export.target", "export-target", spec.export.target))
        kinds = sorted({kind for _, kind, _ in wanted})
        offered = dict(zip(kinds, await asyncio.gather(*(self.offered(k) for k in kinds)), strict=True))
        for path, kind, name in wanted:
            names = offered[kind]
            if names is None:
                continue  # no worker of the pool answered: accepted; dispatch checks it on the worker
            if name not in names:
                what = _KINDS[kind][1]
                raise InvalidArgument(f"{path}: unknown {what} {name!r}", choices=names)
        await self._check_configs(spec, offered)
        if model_config is not None:
            await self._check_architecture(wanted, architectures.for_config(model_config))
            await self.plan(spec, model_config)

    async def machines(self) -> dict[str, list]:
        """pool -> the distinct hardware (HardwareProfile) its answering workers report; the trainer and
        quantizer pools report theirs in ListMethods, the others none yet."""
        found: dict[str, list] = {}
        for pool in ("trainer", "quantizer"):
            seen = {}
            for reply in await self._replies(pool) or []:
                hw = reply.hardware
                if hw.memory_gb or hw.accelerator_memory_gb:
                    key = (
                        round(hw.memory_gb, 1),
                        hw.accelerator,
                        round(hw.accelerator_memory_gb, 1),
                        hw.cpu_cores,
                    )
                    seen.setdefault(key, hw)
            found[pool] = list(seen.values())
        return found

    async def plan(self, spec: PipelineSpec, model_config: dict) -> list[tuple]:
        """Every stage planned on each machine of its pool: [(stage name, [(HardwareProfile or None,
        Estimate, fits, reason, alternatives)])]. FAILED_PRECONDITION for the first stage that fits no
        machine of a pool that reports its hardware, with the numbers and what would fit."""
        profiles = await self.machines()
        machines = {pool: [_machine(hw) for hw in hws] for pool, hws in profiles.items()}
        by_machine = {
            id(m): hw for pool in profiles for m, hw in zip(machines[pool], profiles[pool], strict=True)
        }
        stages = [(s.name, s.kind, s.params) for s in stage_dag(spec)]
        try:
            planned = planner.plan_pipeline(model_config, stages, machines, spec.benchmark.config)
        except InvalidArgument as exc:
            log.info("no plan: %s", exc.message)  # a config.json without the widths: nothing to plan
            return []
        except Exception:  # a planner bug must not refuse submissions: logged, the spec goes unplanned
            log.warning("planning failed; the spec is accepted unplanned", exc_info=True)
            return []
        out = []
        for name, kind, params, plans in planned:
            rows = []
            for machine, est in plans:
                if machine is None:
                    rows.append((None, est, True, "", []))
                    continue
                ok, reason = planner.fits(est, machine)
                better = [] if ok else planner.alternatives(
                    planner.ModelShape.from_config(model_config), kind, params, machine,
                    benchmark_config=spec.benchmark.config,
                )  # fmt: skip
                rows.append(
                    (by_machine[id(machine)], est, ok, reason, [_alternative(a, e) for a, e in better])
                )
            known = [r for r in rows if r[0] is not None]
            if known and not any(r[2] for r in known):
                raise FailedPrecondition(_refusal(name, known))
            out.append((name, rows))
        return out

    async def _check_configs(self, spec: PipelineSpec, offered: dict[str, frozenset[str] | None]) -> None:
        """Every stage's `config:` against the JSON Schema its pool publishes for the method or format."""
        configs: list[tuple[str, str, str | None, dict]] = []  # (field path, kind of name, name, config)
        if spec.finetune is not None:
            configs.append(("finetune.config", "trainer", spec.finetune.method, spec.finetune.config))
        configs += [
            (f"quantize.{i}.config", "quantizer", q.method, q.config) for i, q in enumerate(spec.quantize)
        ]
        if spec.export is not None and spec.export.config:
            name = spec.export.format or await self._target_format(spec.export.target or "")
            configs.append(("export.config", "exporter", name, spec.export.config))
        for path, kind, name, config in configs:
            if config and name is not None and offered.get(kind) is not None:
                check_config(path, config, await self._schema(kind, name))
        # The benchmarker lists nothing (one method): its config model is checked here directly.
        check_config("benchmark.config", spec.benchmark.config, _benchmark_schema())

    async def _schema(self, kind: str, name: str) -> str:
        """The config schema the pool's workers publish for `name` ("" when none does)."""
        pool, _, field = _KINDS[kind]
        for reply in await self._replies(pool) or []:
            for item in getattr(reply, field):
                if item.name == name and item.config_schema_json:
                    return item.config_schema_json
        return ""

    async def _check_architecture(self, wanted: list[tuple[str, str, str]], arch) -> None:
        """Each stage against the registry's refusals for `arch`, then against the families the
        workers list for it (a worker of another version may know less or more)."""
        reason = arch.refusal("benchmark")
        if reason is not None:
            raise InvalidArgument(f"model: a {arch.family} model cannot be benchmarked: {reason}")
        for path, kind, name in wanted:
            what = f"{_KINDS[kind][1]} {name!r}"
            if kind == "export-target":
                target, name = name, await self._target_format(name)
                if name is None:
                    continue
                what = f"export target {target!r} picks format {name!r}, which"
                kind = "exporter"
            capability = f"{_STAGE[kind]}/{name}"
            reason = arch.refusal(capability)
            if reason is None:
                listed = await self._listed_families(kind, name)
                if listed is not None and arch.family not in listed:
                    reason = f"no worker lists the {arch.family} family for it (they list {', '.join(sorted(listed))})"
            if reason is not None:
                raise InvalidArgument(f"{path}: {what} cannot take this {arch.family} model: {reason}")

    async def _target_format(self, target: str) -> str | None:
        """The format an export target picks by default (None when no exporter answered)."""
        replies = await self._replies("exporter")
        for reply in replies or []:
            for info in reply.targets:
                if info.name == target:
                    return info.default_format
        return None

    async def _listed_families(self, kind: str, name: str) -> frozenset[str] | None:
        """Union of the families the answering workers list for `name`; None when none lists any
        (workers from before the registry, or none answered: then only the registry decides)."""
        pool, _, field = _KINDS[kind]
        families: set[str] = set()
        for reply in await self._replies(pool) or []:
            for item in getattr(reply, field):
                if item.name == name:
                    families.update(item.architectures)
        return frozenset(families) or None


def _machine(hw) -> planner.Machine:
    return planner.Machine(
        name=hw.name,
        memory_gb=hw.memory_gb,
        cpu_cores=hw.cpu_cores or 1,
        accelerator=hw.accelerator,
        accelerator_memory_gb=hw.accelerator_memory_gb,
    )


def _alternative(label: str, est: planner.Estimate) -> str:
    gpu = f"{est.gib('accelerator'):.1f} GiB GPU, " if est.accelerator_bytes else ""
    return f"{label} ({gpu}{est.gib('host'):.1f} GiB host)"


def _refusal(stage: str, rows: list[tuple]) -> str:
    """The stage, its predicted numbers on each machine, the machine's figures and what would fit."""
    parts = []
    for hw, est, _ok, reason, better in rows:
        where = f"{hw.accelerator or 'CPU'} worker {hw.name or ''}".replace("  ", " ").strip()
        gpu = f"{est.gib('accelerator'):.1f} GiB GPU, " if est.accelerator_bytes else ""
        line = f"on the {where}: predicted peak {gpu}{est.gib('host'):.1f} GiB host memory: {reason}"
        line += f"; would fit: {'; '.join(better[:3])}" if better else "; needs a worker with more memory"
        parts.append(line)
    return f"{stage} cannot fit any worker of its pool (`tailor plan SPEC` shows the plan): " + " | ".join(
        parts
    )
