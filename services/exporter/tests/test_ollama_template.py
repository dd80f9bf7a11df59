"""The Modelfile's TEMPLATE of a chat model: one turn of the tokenizer's own chat_template, checked by
evaluating the Go template (its .System/.Prompt subset) against transformers' apply_chat_template."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tailor_exporter.gguf_export import modelfile
from tailor_exporter.ollama_template import ollama_template

MODEL = Path(__file__).resolve().parents[3] / "examples" / "models" / "stories260K"
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _model_with(tmp_path: Path, template: str | None) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(MODEL, folder)
    if template is not None:
        tok = AutoTokenizer.from_pretrained(folder)
        tok.chat_template = template
        tok.save_pretrained(folder)
    return folder


def _evaluate(go: str, system: str, prompt: str) -> str:
    """Ollama's evaluation of the subset Tailor writes: one if/else/end on .System, the two fields."""
    match = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}", go, re.S)
    if match:
        go = match.group(1) if system else match.group(2)
    return go.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace('{{ "{{" }}', "{{")


@pytest.mark.parametrize("system", ["You are terse.", ""])
def test_one_turn_renders_exactly_as_transformers_does(tmp_path, system):
    folder = _model_with(tmp_path, CHATML)
    go = ollama_template(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Tell me a {{story}}."}
    ]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert expected.startswith(tok.bos_token)  # llama.cpp adds BOS itself: the template leaves it out
    assert _evaluate(go, system, "Tell me a {{story}}.") == expected.removeprefix(tok.bos_token)


def test_a_template_without_a_system_role_has_no_system_branch(tmp_path):
    go = ollama_template(_model_with(tmp_path, NO_SYSTEM))
    assert "{{ if .System }}" not in go and go == "[user] {{ .Prompt }}\n[assistant] "


def test_the_modelfile_carries_the_chat_template_or_passes_plain_text_through(tmp_path):
    chat = modelfile(_model_with(tmp_path / "a", CHATML), "Q8_0", "chatty")
    assert 'TEMPLATE """{{ if .System }}<|system|>\n{{ .System }}</s>' in chat
    assert "ollama create chatty -f Modelfile" in chat
    plain = modelfile(_model_with(tmp_path / "b", None), "Q8_0", "story")
    assert 'TEMPLATE """{{ .Prompt }}"""' in plain and "No chat format" in plain
