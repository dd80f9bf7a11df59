"""Method and format names are checked at submit against what the pools' workers list: an unknown one is
INVALID_ARGUMENT with the field path and the valid choices; a pool where no worker answers is not
a reason to refuse; one round of calls serves a burst of submissions."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import yaml
from support.ports import free_port

from tailor.common.v1 import common_pb2 as common
from tailor.exporter.v1 import exporter_service_pb2 as export_pb
from tailor.exporter.v1 import exporter_service_pb2_grpc as export_grpc
from tailor.quantizer.v1 import quantizer_service_pb2 as quant_pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as quant_grpc
from tailor.trainer.v1 import trainer_service_pb2 as train_pb
from tailor.trainer.v1 import trainer_service_pb2_grpc as train_grpc
from tailor_gateway.capabilities import Capabilities
from tailor_gateway.engine import Engine
from tailor_gateway.spec import parse_spec
from tailor_gateway.state import StateStore
from tailor_gateway.workers import WorkerPools
from tailor_runtime.errors import InvalidArgument, NotFound
from tailor_runtime.store import open_store

A, B = "a" * 64, "b" * 64


class Quantizer(quant_grpc.QuantizerServiceServicer):
    def __init__(self, names, hang=False):
        self.names, self.hang, self.calls = names, hang, 0

    async def ListMethods(self, request, context):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(30)
        return quant_pb.ListMethodsResponse(methods=[common.MethodInfo(name=n) for n in self.names])


class Trainer(train_grpc.TrainerServiceServicer):
    async def ListMethods(self, request, context):
        return train_pb.ListMethodsResponse(methods=[common.MethodInfo(name="lora")])


class Exporter(export_grpc.ExporterServiceServicer):
    calls = 0

    async def ListFormats(self, request, context):
        self.calls += 1
        return export_pb.ListFormatsResponse(
            formats=[common.MethodInfo(name="onnx")],
            targets=[export_pb.TargetInfo(name="cpu-x86", default_format="onnx", formats=["onnx"])],
        )


async def _serve(*servicers):
    server = grpc.aio.server()
    for s in servicers:
        {
            Quantizer: quant_grpc.add_QuantizerServiceServicer_to_server,
            Trainer: train_grpc.add_TrainerServiceServicer_to_server,
            Exporter: export_grpc.add_ExporterServiceServicer_to_server,
        }[next(c for c in type(s).__mro__ if c in (Quantizer, Trainer, Exporter))](s, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _spec(methods=("bf16",), finetune=None, export=None, target=None) -> str:
    spec = {
        "name": "caps",
        "model": {"artifact": A},
        "data": {"eval": {"artifact": B}, "train": {"artifact": B}},
        "quantize": [{"method": m} for m in methods],
    }
    if finetune:
        spec["finetune"] = {"method": finetune}
    if export:
        spec["export"] = {"format": export}
    if target:
        spec["export"] = {"target": target}
    return yaml.safe_dump(spec)


def test_unknown_names_are_refused_with_the_field_path_and_choices():
    async def main():
        q1, q2, exporter = Quantizer(["bf16", "nf4"]), Quantizer(["int8_dynamic"]), Exporter()
        s1, a1 = await _serve(q1, Trainer(), exporter)
        s2, a2 = await _serve(q2)
        pools = WorkerPools({"quantizer": [a1, a2], "trainer": [a1], "exporter": [a1]})
        caps = Capabilities(pools, timeout_s=2, ttl_s=60)
        try:
            # Every name some worker lists is fine (the union of a mixed pool).
            await caps.check(parse_spec(_spec(("bf16", "int8_dynamic", "nf4"), "lora", "onnx")))
            with pytest.raises(InvalidArgument) as err:
                await caps.check(parse_spec(_spec(("bf16", "bogus"))))
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.message.startswith("quantize.1.method: unknown quantization method 'bogus'")
            assert err.value.message.endswith("valid choices: bf16, int8_dynamic, nf4")
            with pytest.raises(InvalidArgument, match=r"^finetune\.method: .*'qlora'.*valid choices: lora"):
                await caps.check(parse_spec(_spec(finetune="qlora")))
            with pytest.raises(InvalidArgument, match=r"^export\.format: .*'gguf'.*valid choices: onnx"):
                await caps.check(parse_spec(_spec(export="gguf")))
            await caps.check(parse_spec(_spec(target="cpu-x86")))
            with pytest.raises(
                InvalidArgument, match=r"^export\.target: unknown export target 'tpu'.*cpu-x86"
            ):
                await caps.check(parse_spec(_spec(target="tpu")))
            # One round of calls per kind of name answered all of that (cached).
            # The exporter's formats and targets come from one ListFormats reply.
            assert (q1.calls, q2.calls, exporter.calls) == (1, 1, 1)
        finally:
            await pools.close()
            await s1.stop(None)
            await s2.stop(None)

    asyncio.run(main())


def test_cache_expires_and_concurrent_submits_share_one_call():
    async def main():
        q = Quantizer(["bf16"])
        server, address = await _serve(q)
        pools = WorkerPools({"quantizer": [address]})
        caps = Capabilities(pools, timeout_s=2, ttl_s=0.2)
        try:
            await asyncio.gather(*(caps.check(parse_spec(_spec())) for _ in range(20)))
            assert q.calls == 1
            await asyncio.sleep(0.3)
            await caps.check(parse_spec(_spec()))
            await _until(lambda: q.calls == 2)
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())


async def _until(condition, tries: int = 300) -> None:
    """Wait for condition() (a bool, or an awaitable of one) to hold, polling every 10 ms."""
    for _ in range(tries):
        held = condition()
        if await held if asyncio.iscoroutine(held) else held:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


class GatedQuantizer(Quantizer):
    """Answers its first listing at once, every later one only when `release` is set: a worker that
    became slow to list (busy, or restarted cold) after the gateway had its answer."""

    def __init__(self, names):
        super().__init__(names)
        self.asked, self.release = 0, asyncio.Event()

    async def ListMethods(self, request, context):
        self.asked += 1
        if self.asked > 1:
            await self.release.wait()
        return await super().ListMethods(request, context)


def test_a_slow_listing_does_not_hold_up_submissions():
    async def main():
        q = GatedQuantizer(["bf16"])
        server, address = await _serve(q)
        pools = WorkerPools({"quantizer": [address]})
        caps = Capabilities(pools, timeout_s=30, ttl_s=0.05)
        try:
            await caps.check(parse_spec(_spec()))
            await asyncio.sleep(0.1)
            q.names = ["bf16", "nf4"]
            # Past the ttl: the check answers from the last listing while the new round is still
            # blocked on the worker (it cannot finish before `release`), so nothing waited on it.
            await caps.check(parse_spec(_spec()))
            await _until(lambda: q.asked == 2)
            assert q.calls == 1
            with pytest.raises(InvalidArgument, match="'nf4'"):
                await caps.check(parse_spec(_spec(("nf4",))))
            # Once the worker answers, its new list is what counts.
            q.release.set()

            async def nf4_listed():
                return "nf4" in await caps.offered("quantizer")

            await _until(nf4_listed)
            await caps.check(parse_spec(_spec(("nf4",))))
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())


def test_warm_asks_every_pool_before_any_submission():
    async def main():
        q, exporter = Quantizer(["bf16"]), Exporter()
        server, address = await _serve(q, Trainer(), exporter)
        pools = WorkerPools({"quantizer": [address], "trainer": [address], "exporter": [address]})
        caps = Capabilities(pools, timeout_s=2, ttl_s=60)
        try:
            await caps.warm()
            assert (q.calls, exporter.calls) == (1, 1)
            await caps.check(parse_spec(_spec(export="onnx")))
            assert (q.calls, exporter.calls) == (1, 1)  # answered from what warm() got
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())


def test_no_answer_from_a_pool_means_accept():
    async def main():
        hung = Quantizer(["bf16"], hang=True)
        server, address = await _serve(hung)
        dead = f"127.0.0.1:{free_port()}"  # a port where nothing listens
        pools = WorkerPools({"quantizer": [address, dead], "exporter": []})
        caps = Capabilities(pools, timeout_s=0.3, ttl_s=60)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            # A hung worker and a dead one: nobody answered, so even 'bogus' is accepted here (the
            # worker refuses it at dispatch); an empty pool likewise.
            await caps.check(parse_spec(_spec(("bogus",), export="onnx")))
            assert loop.time() - started < 2.0
            assert await caps.offered("quantizer") is None
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())


def test_submit_checks_before_creating_anything(tmp_path):
    async def main():
        q = Quantizer(["bf16", "nf4"])
        server, address = await _serve(q)
        pools = WorkerPools({"quantizer": [address]})
        state = StateStore(tmp_path / "gw.db")
        engine = Engine(state, pools, open_store(str(tmp_path / "store")))
        try:
            with pytest.raises(InvalidArgument, match=r"quantize\.0\.method: .*'nf3'"):
                await engine.submit(_spec(("nf3",)), "proj", "key-1")
            assert state.list_pipelines("proj", 10) == []
            # A known method goes on to the next check (here: the inputs are not in the store).
            with pytest.raises(NotFound, match="model: artifact"):
                await engine.submit(_spec(("nf4",)), "proj", "key-1")
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())


class FamilyExporter(Exporter):
    """Lists onnx for every family, coreml without an architectures list (an older worker), and
    executorch for llama only."""

    async def ListFormats(self, request, context):
        return export_pb.ListFormatsResponse(
            formats=[
                common.MethodInfo(name="onnx", architectures=["llama", "qwen2", "gpt2"]),
                common.MethodInfo(name="coreml"),
                common.MethodInfo(name="executorch", architectures=["llama"]),
            ],
            targets=[export_pb.TargetInfo(name="ios", default_format="coreml", formats=["coreml"])],
        )


def test_stages_are_checked_against_the_models_architecture():
    async def main():
        server, address = await _serve(FamilyExporter(), Quantizer(["bf16"]))
        pools = WorkerPools({"exporter": [address], "quantizer": [address]})
        caps = Capabilities(pools, timeout_s=2, ttl_s=60)
        qwen2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
        llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        try:
            await caps.check(parse_spec(_spec(export="onnx")), qwen2)
            await caps.check(parse_spec(_spec(export="coreml")), llama)
            await caps.check(parse_spec(_spec(target="ios")), llama)
            # The registry's reason, with what would work instead.
            with pytest.raises(InvalidArgument) as err:
                await caps.check(parse_spec(_spec(export="coreml")), qwen2)
            message = err.value.message
            assert message.startswith("export.format: export format 'coreml' cannot take this qwen2 model")
            assert "export this model to onnx or ort instead" in message
            # A target is checked through the format it picks.
            with pytest.raises(
                InvalidArgument,
                match=r"^export\.target: export target 'ios' picks format 'coreml', which cannot take this qwen2",
            ):
                await caps.check(parse_spec(_spec(target="ios")), qwen2)
            # What the workers list counts too: here onnx is listed for llama, qwen2 and gpt2 only.
            with pytest.raises(InvalidArgument, match=r"'onnx' .*no worker lists the mistral family for it"):
                await caps.check(parse_spec(_spec(export="onnx")), {"model_type": "mistral"})
            with pytest.raises(
                InvalidArgument, match=r"model_type 'bert' .*not an architecture Tailor supports"
            ):
                await caps.check(parse_spec(_spec()), {"model_type": "bert", "architectures": ["BertModel"]})
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())


def test_submit_reads_the_models_config_from_the_store(tmp_path):
    import json

    from tailor_gateway.access import Access

    async def main():
        server, address = await _serve(FamilyExporter(), Quantizer(["bf16"]))
        pools = WorkerPools({"exporter": [address], "quantizer": [address]})
        state = StateStore(tmp_path / "gw.db")
        store = open_store(str(tmp_path / "store"))
        folder = tmp_path / "qwen"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        model = store.publish_directory(folder, kind="model", format="hf-safetensors", name="qwen")
        Access(state.db).own("proj", [(model.id, "model")])
        engine = Engine(state, pools, store)
        try:
            spec = yaml.safe_load(_spec(export="coreml"))
            spec["model"] = {"artifact": model.id}
            with pytest.raises(InvalidArgument, match="'coreml' cannot take this qwen2 model"):
                await engine.submit(yaml.safe_dump(spec), "proj", "k")
            assert state.list_pipelines("proj", 10) == []
            # Another project's model is not read: the spec goes on to the not-found check.
            with pytest.raises(NotFound, match="model: artifact"):
                await engine.submit(yaml.safe_dump(spec), "other", "k")
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())


def test_the_benchmark_config_is_checked_on_every_submission():
    # Its schema is built once (functools.cache): the check itself must still run each time.
    async def main():
        server, address = await _serve(Quantizer(["bf16"]))
        pools = WorkerPools({"quantizer": [address]})
        caps = Capabilities(pools, timeout_s=2, ttl_s=60)
        try:
            spec = yaml.safe_load(_spec())
            spec["benchmark"] = {"config": {"repetitionz": 3}}
            for _ in range(2):
                with pytest.raises(InvalidArgument, match=r"benchmark\.config\.repetitionz"):
                    await caps.check(parse_spec(yaml.safe_dump(spec)))
        finally:
            await pools.close()
            await server.stop(None)

    asyncio.run(main())
