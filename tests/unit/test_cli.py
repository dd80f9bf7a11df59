"""The CLI's user mistakes read as one clear line, not a traceback."""

import subprocess
import sys


def _tailor(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "tailor_cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TAILOR_STATE_DIR": str(cwd / ".tailor")},
    )


def test_no_stack_running(tmp_path):
    proc = _tailor("pipeline", "list", cwd=tmp_path)
    assert proc.returncode == 2
    assert "tailor up" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_bad_set_syntax(tmp_path):
    (tmp_path / ".tailor").mkdir()
    (tmp_path / ".tailor" / "stack.json").write_text('{"gateway": "127.0.0.1:1", "services": {}}')
    (tmp_path / ".tailor" / "token").write_text("t")
    proc = _tailor("quantize", "--model", str(tmp_path), "--method", "nf4", "--set", "oops", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "expected key=value" in proc.stdout
