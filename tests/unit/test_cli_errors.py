"""Ordinary mistakes at the command line get a short message and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from tailor_cli import main as cli


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def no_stack(tmp_path, monkeypatch):
    monkeypatch.delenv("TAILOR_GATEWAY", raising=False)
    monkeypatch.delenv("TAILOR_TOKEN", raising=False)
    return ["--state-dir", str(tmp_path / "state")]


def _spec(tmp_path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


CASES = {
    "negative seed": (["quantize", "--model", "m", "--method", "nf4", "--seed", "-1"], "-1 is negative"),
    "negative samples": (
        ["quantize", "--model", "m", "--method", "nf4", "--samples", "-5"],
        "-5 is negative",
    ),
    "seq-len not a number": (
        ["quantize", "--model", "m", "--method", "nf4", "--seq-len", "x"],
        "not a whole number",
    ),
    "gate not a number": (
        ["quantize", "--model", "m", "--method", "nf4", "--max-ppl-increase", "lots"],
        "not a number",
    ),
    "port out of range": (["up", "--port", "70000"], "not a port"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "missing spec": (
        ["pipeline", "run", "/nonexistent/spec.yaml"],
        "spec file /nonexistent/spec.yaml does not exist",
    ),
    "missing quickstart spec": (["quickstart", "--spec", "/nonexistent/q.yaml"], "does not exist"),
    "no stack": (["pipeline", "list"], "no gateway: start the local stack with `tailor up`"),
}


@pytest.mark.parametrize("argv, message", CASES.values(), ids=CASES.keys())
def test_a_mistake_is_one_message_and_a_non_zero_exit(argv, message, no_stack, capsys):
    code, out = _run([*no_stack, *argv], capsys)
    assert code != 0 and "Traceback" not in out
    assert message in out, out
    assert len(out.strip().splitlines()) <= 6  # a short paragraph (argparse adds its usage line)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: [unclosed", "YAML"),
        ("name: x\nmodel: {artifact: nothex}\n", "model.artifact"),
        ("- just\n- a list\n", "mapping"),
    ],
    ids=["malformed yaml", "bad field", "not a mapping"],
)
def test_a_bad_spec_file_is_named_before_any_connection(text, message, no_stack, tmp_path, capsys):
    for action in ("validate", "run"):
        code, out = _run([*no_stack, "pipeline", action, _spec(tmp_path, text)], capsys)
        assert code == 2 and "Traceback" not in out
        assert message in out and "no gateway" not in out, out


def test_the_gates_advice_names_the_flags_of_tailor_quantize():
    advice = (
        "accuracy gate rejected nf4: ...; nothing was published. Try more bits, a calibrated method (gptq, awq) "
        "or a looser gate.max_perplexity_increase_pct"
    )
    said = cli.in_cli_terms(advice)
    assert said.endswith("a looser --max-ppl-increase") and "gate." not in said
    assert cli.in_cli_terms("give eval_data or calibration_data, or set gate.disabled") == (
        "give --eval or --calibration, or set --no-gate"
    )
