"""`tailor completion bash|zsh`: scripts generated from the CLI's own parser (shtab), so a new subcommand or
flag completes without anyone editing a script. The bash script is run in a real bash."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def _script(shell: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tailor_cli.main", "completion", shell],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def _bash_complete(script: str, line: str) -> set[str]:
    words = line.split(" ")
    program = (
        f"{script}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
        f"COMP_LINE={line!r}; COMP_POINT={len(line)}\n"
        f"_shtab_tailor tailor {words[-1]!r} {words[-2]!r}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completes_commands_subcommands_and_flags():
    script = _script("bash")
    assert _bash_complete(script, "tailor pip") == {"pipeline"}
    assert {"run", "validate", "list", "status", "watch", "cancel"} <= _bash_complete(
        script, "tailor pipeline "
    )
    assert {"--json", "--kind"} <= _bash_complete(script, "tailor artifacts ls --")
    assert _bash_complete(script, "tailor completion ") == {"bash", "zsh"}
    assert "--max-ppl-increase" in _bash_complete(script, "tailor quantize --max")


def test_zsh_script_is_a_compdef_for_every_command():
    script = _script("zsh")
    assert script.startswith("#compdef tailor")
    for command in ("pipeline", "artifacts", "quantize", "methods", "models", "completion", "select"):
        assert command in script


def test_an_unknown_shell_is_refused_with_the_choices():
    proc = subprocess.run(
        [sys.executable, "-m", "tailor_cli.main", "completion", "fish"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "choose from" in proc.stderr and "bash" in proc.stderr
