"""Capability listings: what each worker can run here, with parameters, and why not for the rest."""

import asyncio
import types

from tailor_exporter.servicer import ExporterServicer
from tailor_quantizer.servicer import QuantizerServicer
from tailor_trainer.servicer import TrainerServicer


def _call(servicer, method):
    return asyncio.run(getattr(servicer, method)(None, None))


def _ctx():
    """Only what the listings use of a ServiceContext: where they register their warm-up."""
    return types.SimpleNamespace(warm_ups=[])


def test_quantizer_lists_every_method_with_parameters():
    reply = _call(QuantizerServicer(_ctx()), "ListMethods")
    by_name = {m.name: m for m in reply.methods}
    assert {"bf16", "int8_dynamic", "nf4"} <= set(by_name)
    for method in reply.methods:
        assert method.description and method.output_format and method.bits
        assert method.available or method.unavailable_reason
    assert "double_quant" in {p.name for p in by_name["nf4"].parameters}
    assert reply.hardware.cpu_cores > 0


def test_trainer_and_exporter_list_their_options():
    lora = _call(TrainerServicer(_ctx()), "ListMethods").methods[0]
    assert lora.name == "lora" and {"r", "steps", "learning_rate"} <= {p.name for p in lora.parameters}
    formats = {f.name: f for f in _call(ExporterServicer(None), "ListFormats").formats}
    assert {"onnx", "onnx-fp16", "onnx-int8", "onnx-int8-static", "ort"} <= set(formats)
    assert "opset" in {p.name for p in formats["onnx"].parameters}
    static = formats["onnx-int8-static"]
    assert static.needs_calibration
    assert {"calibrator", "calibration_data"} <= {p.name for p in static.parameters}
    assert formats["ort"].output_format == "ort" and "top-1" in formats["onnx-int8"].description


def test_listings_are_built_by_the_warm_up_that_serve_runs_before_serving():
    """The slow first listing (every method's libraries imported) is a warm-up: serve() runs it on a
    thread before SERVING, and ListMethods then answers from what it built."""
    for servicer_class in (QuantizerServicer, TrainerServicer):
        ctx = _ctx()
        servicer = servicer_class(ctx)
        assert len(ctx.warm_ups) == 1
        built = ctx.warm_ups[0][1]()
        assert list(_call(servicer, "ListMethods").methods) == list(built)
        assert ctx.warm_ups[0][1]() is built  # built once


def test_parameters_give_defaults_as_json_types_as_written_and_a_literals_choices():
    import json

    lora = {p.name: p for p in _call(TrainerServicer(_ctx()), "ListMethods").methods[0].parameters}
    assert (lora["r"].type, json.loads(lora["r"].default_json)) == ("int", 8)
    assert json.loads(lora["packing"].default_json) is True
    assert json.loads(lora["target_modules"].default_json) is None
    assert list(lora["lr_schedule"].choices) == ["constant", "linear", "cosine"]
    assert json.loads(lora["lr_schedule"].default_json) == "constant"
    for method in _call(QuantizerServicer(_ctx()), "ListMethods").methods:
        for p in method.parameters:  # every default parses as JSON (it was Python's repr: None, True)
            if p.default_json:
                json.loads(p.default_json)
