"""Ctrl-C in a script of benchmarks/: one line and exit status 130, not a traceback; every script's entry point
goes through that handler (checked on its source, and once in a real process with a real SIGINT)."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_run_script_turns_ctrl_c_into_130_and_one_line(capsys):
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks._common import run_script
    finally:
        sys.path.remove(str(REPO))

    def interrupted():
        raise KeyboardInterrupt

    assert run_script(interrupted) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C): no result written" in err and "Traceback" not in err
    assert run_script(lambda: 0) == 0
    with pytest.raises(ValueError):  # other errors are not swallowed
        run_script(lambda: int("x"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_enters_through_run_script(script):
    tree = ast.parse(script.read_text())
    guard = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    calls = [ast.unparse(n) for n in ast.walk(guard) if isinstance(n, ast.Call)]
    assert any(c.startswith("run_script(main") for c in calls), calls


def _sigint_as_at_a_terminal():
    """The child's SIGINT as a terminal's Ctrl-C meets it: a pytest started as a background job (``cmd &``) has
    SIGINT ignored, which its children would inherit (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_real_sigint_ends_a_script_in_one_line(tmp_path):
    # conv_cpu.py runs ~30 s on one thread: interrupted after its first row, while it measures the next
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "conv_cpu.py"), "--threads", "1",
                             "--out", str(tmp_path / "c.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=_sigint_as_at_a_terminal)
    try:
        first = proc.stdout.readline()
        assert first.startswith("b="), first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted (Ctrl-C): no result written" in err and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()
