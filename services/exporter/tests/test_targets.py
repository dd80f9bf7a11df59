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
