"""Named hardware targets: each maps to formats that exist, a request naming one gets its default format
and settings, and a format a target cannot run is refused naming the ones it can."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import json_format

from tailor.common.v1 import common_pb2 as common
from tailor.exporter.v1 import exporter_service_pb2 as pb
from tailor_exporter.registry import get_format, list_formats
from tailor_exporter.servicer import ExporterServicer
from tailor_exporter.targets import TARGETS, resolve
from tailor_runtime.errors import InvalidArgument

NAMED = {"cpu-x86", "cpu-arm64", "cuda", "android", "ios", "raspberry-pi"}


def test_every_named_target_maps_to_registered_formats_with_valid_settings():
    assert NAMED <= set(TARGETS)
    registered = {f.name for f in list_formats()}
    for target in TARGETS.values():
        assert set(target.formats) <= registered, target.name
        assert set(target.settings) <= set(target.formats), target.name
        for name, settings in target.settings.items():
            get_format(name).Config(**settings)  # the target's settings are valid for the format


def test_a_target_picks_its_default_format_and_settings_and_the_request_wins():
    assert resolve("", "raspberry-pi", {}) == ("gguf", {"type": "Q4_0"})
    assert resolve("", "raspberry-pi", {"type": "Q8_0"}) == ("gguf", {"type": "Q8_0"})
    assert resolve("onnx-int8", "raspberry-pi", {}) == ("onnx-int8", {})
    assert resolve("", "android", {}) == ("ort", {"int8": True})
    assert resolve("onnx", "", {"opset": 18}) == ("onnx", {"opset": 18})


def test_a_format_the_target_cannot_run_names_the_ones_it_can():
    with pytest.raises(InvalidArgument) as err:
        resolve("gguf", "android", {})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "format 'gguf' does not run on target 'android'; it runs ort" in err.value.message
    with pytest.raises(InvalidArgument, match="unknown export target 'tpu'.*raspberry-pi"):
        resolve("", "tpu", {})
    with pytest.raises(InvalidArgument, match="needs a format or a target"):
        resolve("", "", {})


def test_list_formats_lists_the_targets():
    reply = asyncio.run(ExporterServicer(None).ListFormats(pb.ListFormatsRequest(), None))
    targets = {t.name: t for t in reply.targets}
    assert NAMED <= set(targets)
    pi = targets["raspberry-pi"]
    assert pi.default_format == "gguf" and pi.formats[0] == "gguf" and "Raspberry Pi" in pi.description
    assert json_format.MessageToDict(pi.settings["gguf"]) == {"type": "Q4_0"}


def test_export_refuses_a_format_off_its_target_before_any_work():
    # Refused while resolving the request: no store, no model, no operation is needed to say so.
    request = pb.ExportRequest(model=common.ArtifactRef(id="a" * 64), format="gguf", target="ios")
    with pytest.raises(InvalidArgument, match="does not run on target 'ios'"):
        asyncio.run(ExporterServicer(None).Export(request, None))


def test_export_targets_are_the_catalogues_and_the_old_name_still_resolves():
    from tailor_runtime import targets as catalogue

    pi = catalogue.TARGETS["raspberry-pi-5"]
    assert TARGETS["raspberry-pi"] is TARGETS["raspberry-pi-5"] is pi  # one target, two names
    assert resolve("", "raspberry-pi-5", {}) == resolve("", "raspberry-pi", {}) == ("gguf", {"type": "Q4_0"})
    # The roofline's hardware is exportable too: a GPU takes the CUDA formats and settings.
    assert (
        resolve("", "h100", {})
        == resolve("", "cuda", {})
        == ("triton", {"variant": "onnx-fp16", "device": "gpu"})
    )
    assert resolve("", "snapdragon-8-gen-3", {}) == ("ort", {"int8": True})
    assert {t.name for t in catalogue.CATALOGUE if t.formats} == {t.name for t in TARGETS.values()}


def test_an_unknown_target_lists_every_name_a_request_may_use():
    with pytest.raises(InvalidArgument) as err:
        resolve("", "raspberry-pi-6", {})
    message = err.value.message
    assert message.startswith("unknown export target 'raspberry-pi-6'; valid choices: ")
    for name in ("raspberry-pi", "raspberry-pi-5", "t4", "cpu-x86", "ios"):
        assert name in err.value.choices, name
    request = pb.ExportRequest(model=common.ArtifactRef(id="a" * 64), target="tpu")
    with pytest.raises(InvalidArgument, match="unknown export target 'tpu'.*raspberry-pi-5"):
        asyncio.run(ExporterServicer(None).Export(request, None))


def test_list_formats_lists_the_old_name_beside_the_target_so_stored_specs_pass_the_gateway():
    reply = asyncio.run(ExporterServicer(None).ListFormats(pb.ListFormatsRequest(), None))
    targets = {t.name: t for t in reply.targets}
    assert {"raspberry-pi", "raspberry-pi-5", "t4", "a100", "h100", "snapdragon-8-gen-3"} <= set(targets)
    old, new = targets["raspberry-pi"], targets["raspberry-pi-5"]
    assert (old.default_format, list(old.formats)) == (new.default_format, list(new.formats))
    assert "(an earlier name of raspberry-pi-5)" in old.description and "earlier name" not in new.description
    # The export descriptions of the targets that were there before are the same words.
    assert targets["cpu-x86"].description.startswith("x86-64 servers and desktops: ONNX Runtime with INT8")


def test_a_direct_export_of_a_family_the_format_cannot_take_is_refused_before_any_work(tmp_path):
    """The gateway refuses this at submit; a worker called directly says the same, with no operation."""
    import types

    from support.families import tiny_model

    from tailor_runtime.ml import architectures
    from tailor_runtime.store import open_store

    store = open_store(str(tmp_path / "store"))
    folder = tiny_model("gpt2", tmp_path / "gpt2")
    model = store.publish_directory(folder, kind="model", format="hf-safetensors", name="gpt2")
    assert architectures.get("gpt2").refusal("export/onnx")  # what the registry says
    ctx = types.SimpleNamespace(store=store, settings=types.SimpleNamespace(cache_dir=tmp_path / "cache"))
    request = pb.ExportRequest(model=common.ArtifactRef(id=model.id), format="onnx")
    with pytest.raises(InvalidArgument, match="export/onnx is not available for gpt2 models"):
        asyncio.run(ExporterServicer(ctx).Export(request, None))
    assert not (tmp_path / "cache").exists()  # nothing fetched
