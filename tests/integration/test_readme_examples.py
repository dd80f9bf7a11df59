"""The README's "Using it" commands and its Python example, run as written against a real local stack
(its own ports, reached through TAILOR_GATEWAY/TAILOR_TOKEN). Every command line of that block is either
run here (verbatim, or with its placeholders filled in) or named below with the test that covers it
instead: a new README line that is neither fails this test."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.remote_stack import gateway_env, started_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SHARED_MODEL = ROOT.parent / "shared" / "data" / "models" / "stories260K"
TAILOR = str(Path(sys.executable).with_name("tailor"))

# README lines not run here, each with where it is tested instead.
COVERED_ELSEWHERE = {
    "tailor up": "tests/integration/test_local_stack.py (tailor up, its refusals, SIGHUP/SIGKILL)",
    "tailor status | down": "tests/integration/test_local_stack.py",
    "tailor models import --hub Qwen/Qwen2.5-0.5B [--revision R]": (
        "no network here: tests/integration/test_gateway_model_import.py runs the gateway's Hub import on an "
        "offline cache laid out by huggingface_hub"
    ),
    "tailor plan examples/quickstart.yaml": (
        "tests/integration/test_plan_gateway.py (the table against a real stack, a spec that cannot fit)"
    ),
    "tailor triton deploy|status|infer|undeploy --url HOST:8001 --model NAME": (
        "no Triton server here: services/exporter/tests/test_triton_export.py drives it against a KServe v2 server"
    ),
}


def readme_block(heading: str, fence: str = "```") -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    start = section.index(fence) + len(fence)
    return section[start : section.index("```", start)]


def readme_commands() -> list[str]:
    """The block's command lines: comments dropped, continuation lines joined, `.venv/bin/` kept."""
    joined = readme_block("## Using it").replace("\\\n", " ")
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [re.sub(r"\s+", " ", line) for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with started_stack(tmp_path_factory.mktemp("readme-stack"), first_port=53000) as s:
        yield s


@pytest.fixture(scope="module")
def env(stack, tmp_path_factory):
    return gateway_env(stack, tmp_path_factory.mktemp("no-local-stack"))


def sh(command: str, env: dict, cwd: Path = ROOT, timeout: int = 900) -> str:
    """A README line through bash, with .venv/bin/tailor the tailor of this test's environment."""
    command = command.replace(".venv/bin/tailor", TAILOR)
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command}\n{said[-4000:]}"
    assert "Traceback" not in said, said[-4000:]
    return proc.stdout


def test_every_readme_command_is_run_here_or_named_with_its_test():
    commands = {c.removeprefix(".venv/bin/") for c in readme_commands()}
    run_here = {c.removeprefix(".venv/bin/") for c in RUN_HERE}
    assert commands == run_here | set(COVERED_ELSEWHERE), (
        f"new or changed README lines: {sorted(commands - run_here - set(COVERED_ELSEWHERE))}; "
        f"gone from the README: {sorted((run_here | set(COVERED_ELSEWHERE)) - commands)}"
    )


RUN_HERE = [
    ".venv/bin/tailor pipeline validate examples/quickstart.yaml",
    ".venv/bin/tailor pipeline run examples/quickstart.yaml --watch",
    ".venv/bin/tailor pipeline list | status ID | watch ID | cancel ID",
    ".venv/bin/tailor artifacts ls | show ID | get ID DEST | put PATH",
    ".venv/bin/tailor models import PATH",
    ".venv/bin/tailor quantize --model examples/models/stories260K --method nf4 --eval "
    "examples/data/tinystories_eval.txt --max-ppl-increase 15",
    ".venv/bin/tailor quantize --model examples/models/stories260K --method gptq --set bits=8 --set "
    "group_size=-1 --calibration examples/data/tinystories_train.txt --samples 32 --seq-len 256 --eval "
    "examples/data/tinystories_eval.txt",
    ".venv/bin/tailor methods",
    ".venv/bin/tailor methods describe gptq",
    'eval "$(.venv/bin/tailor completion bash)"',
    "python -m tailor_runtime.ml.llama2c stories260K.bin tok512.bin OUT_DIR",
]


def test_the_pipeline_commands(env, tmp_path):
    out = sh(RUN_HERE[0], env)
    assert "valid" in out
    out = sh(RUN_HERE[1], env)
    assert "recommended:" in out and "pipeline finished" in out
    pipeline_id = re.search(r"submitted: ([0-9a-f]{32,64})", out).group(1)
    assert pipeline_id[:12] in sh(".venv/bin/tailor pipeline list", env)
    assert "succeeded" in sh(f".venv/bin/tailor pipeline status {pipeline_id[:8]}", env).lower()
    assert "recommended:" in sh(f".venv/bin/tailor pipeline watch {pipeline_id[:8]}", env)
    assert (
        "succeeded" in sh(f".venv/bin/tailor pipeline cancel {pipeline_id[:8]}", env).lower()
    )  # done: stays


def test_the_artifact_and_model_commands(env, tmp_path):
    model_id = sh(".venv/bin/tailor models import examples/models/stories260K", env).split()[-1]
    assert re.fullmatch(r"[0-9a-f]{64}", model_id)
    assert model_id[:12] in sh(".venv/bin/tailor artifacts ls", env)
    assert '"files"' in sh(f".venv/bin/tailor artifacts show {model_id[:8]}", env)
    sh(f".venv/bin/tailor artifacts get {model_id[:8]} {tmp_path / 'got'}", env)
    assert (tmp_path / "got" / "config.json").is_file()
    assert "(dataset)" in sh(".venv/bin/tailor artifacts put examples/data/tinystories_eval.txt", env)


@pytest.mark.parametrize("line", [5, 6], ids=["nf4", "gptq"])
def test_the_quantize_examples_pass_their_gate_as_written(env, line, tmp_path):
    out = sh(RUN_HERE[line], env)
    assert "quantized model" in out


def test_the_methods_completion_and_llama2c_commands(env, tmp_path):
    assert "gptq" in sh(RUN_HERE[7], env)
    assert "group_size" in sh(RUN_HERE[8], env)
    sh(RUN_HERE[9] + "; complete -p tailor", env)
    if not SHARED_MODEL.is_dir():
        pytest.fail(f"{SHARED_MODEL} (../shared/data) is missing: the llama2.c import cannot be tried")
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copy(SHARED_MODEL / name, tmp_path / name)
    command = RUN_HERE[10].replace("python ", f"{sys.executable} ", 1).replace("OUT_DIR", "out")
    sh(command, env, cwd=tmp_path)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()


def test_the_python_example(env, tmp_path):
    code = readme_block("From Python", fence="```python")
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # its paths are relative to the checkout
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    assert (tmp_path / "report" / "report.html").is_file()
