"""The Ollama Modelfile's TEMPLATE for a chat model, rendered from the tokenizer's own chat_template.

Ollama templates are Go templates over one turn (`.System`, `.Prompt`); Hugging Face chat templates are
Jinja over a list of messages, and no general translation exists. What can be made exact is the layout of
one turn: transformers renders the template with marker strings in place of the system text and the user's
prompt (with the generation prompt, as at inference), and the markers become `{{ .System }}` and
`{{ .Prompt }}`. Rendered with and without a system message, the two become `{{ if .System }}...{{ else }}
...{{ end }}`. Earlier turns of a conversation are laid out by Ollama repeating that template per turn (its
legacy template mode), which matches templates that lay every turn out the same way.
"""

from __future__ import annotations

from pathlib import Path

SYSTEM_MARK = "\x1fTAILOR-SYSTEM\x1f"
PROMPT_MARK = "\x1fTAILOR-PROMPT\x1f"


def ollama_template(model_dir: Path) -> str | None:
    """The Go template for the model's chat template, or None when its tokenizer has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not getattr(tokenizer, "chat_template", None):
        return None
    user_only = _render(tokenizer, [{"role": "user", "content": PROMPT_MARK}])
    try:
        with_system = _render(
            tokenizer, [{"role": "system", "content": SYSTEM_MARK}, {"role": "user", "content": PROMPT_MARK}]
        )
    except Exception:  # noqa: BLE001 - templates that refuse a system role raise their own errors
        with_system = None
    if PROMPT_MARK not in user_only:
        raise ValueError("the chat template does not place the user's message in its output")
    if with_system is None or SYSTEM_MARK not in with_system:
        return _go(user_only)
    return "{{ if .System }}" + _go(with_system) + "{{ else }}" + _go(user_only) + "{{ end }}"


def _render(tokenizer, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # llama.cpp (and Ollama) add BOS themselves when the GGUF says so: a BOS in the text would be a second.
    bos = tokenizer.bos_token
    return text.removeprefix(bos) if bos else text


def _go(text: str) -> str:
    """Rendered text -> a Go template: literal braces escaped, the markers made fields."""
    text = text.replace("{{", '{{ "{{" }}')
    return text.replace(SYSTEM_MARK, "{{ .System }}").replace(PROMPT_MARK, "{{ .Prompt }}")
