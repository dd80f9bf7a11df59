"""The architecture registry: every family module's declarations hold for a real model of that family,
and agree with the libraries they speak for (llm-compressor's layer mappings)."""

from __future__ import annotations

import pytest
from support.families import TINY_FAMILIES, tiny_config, tiny_model

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml import architectures
from tailor_runtime.ml.model_io import read_format

FAMILY_OF = {"llama3": "llama"}


def test_every_family_module_registers_and_model_types_are_unique():
    found = architectures.families()
    assert {a.family for a in found} == {FAMILY_OF.get(n, n) for n in TINY_FAMILIES}
    model_types = [t for a in found for t in a.model_types]
    assert len(model_types) == len(set(model_types))
    with pytest.raises(ValueError, match="registered twice"):
        architectures.register(architectures.get("llama"))


def test_an_unknown_model_type_names_the_supported_ones():
    with pytest.raises(InvalidArgument) as err:
        architectures.for_config({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    message = err.value.message
    assert "model_type 'bert' (BertForMaskedLM) is not an architecture Tailor supports yet" in message
    assert "gpt2, llama, mistral" in message and "adding-an-architecture.md" in message


def test_a_refusal_says_why_and_which_families_can():
    with pytest.raises(InvalidArgument) as err:
        architectures.require(architectures.get("gpt2"), "quantize/gptq")
    message = err.value.message
    assert "quantize/gptq is not available for gpt2 models" in message and "Conv1D" in message
    assert "families that can:" in message and "qwen2" in message
    architectures.require(architectures.get("gpt2"), "quantize/nf4")  # not refused


def test_a_family_llama_cpp_cannot_convert_has_no_gguf():
    import dataclasses

    unknown = dataclasses.replace(architectures.get("llama"), family="granite", llama_cpp_arch=None)
    for capability in architectures.GGUF_CAPABILITIES:
        assert unknown.refusal(capability) == architectures.NO_GGUF
    assert unknown.refusal("export/onnx") is None
    assert architectures.get("llama").refusal("export/gguf") is None


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_declarations_hold_for_a_model_of_the_family(name, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_model(name, tmp_path / name)
    # A plain save_pretrained folder is a model, and its family is read from config.json.
    assert read_format(folder) == {"format": "hf-safetensors", "dtype": "float32", "inferred": True}
    arch = architectures.for_folder(folder)
    assert arch.family == FAMILY_OF.get(name, name)
    model = AutoModelForCausalLM.from_config(tiny_config(name))
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(arch.lora_targets) <= leaves, "a LoRA target that is not a layer of the model"
    assert set(arch.fused) <= leaves


@pytest.mark.parametrize("algorithm", ["awq", "smoothquant"])
def test_mapping_methods_are_offered_only_where_llm_compressor_has_a_mapping(algorithm):
    from transformers import AutoModelForCausalLM

    from tailor_quantizer.llm_compressor import mapping_architectures

    known = mapping_architectures(algorithm)
    for name in TINY_FAMILIES:
        arch = architectures.get(FAMILY_OF.get(name, name))
        if arch.refusal(f"quantize/{algorithm}") is None:
            cls = type(AutoModelForCausalLM.from_config(tiny_config(name))).__name__
            assert cls in known, f"{name} offers {algorithm}, but llm-compressor has no mapping for {cls}"


def test_workers_publish_the_families_of_each_method():
    from tailor_quantizer.methods import get_method
    from tailor_quantizer.servicer import method_info

    gptq = method_info(get_method("gptq"))
    assert "qwen2" in gptq.architectures and "gpt2" not in gptq.architectures
    # llama.cpp's converter writes every registered family (tests/unit/test_gguf_io.py converts each).
    assert method_info(get_method("gguf_q8_0")).architectures == sorted(
        a.family for a in architectures.families()
    )
