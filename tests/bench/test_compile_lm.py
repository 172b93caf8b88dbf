"""benchmarks/compile_lm.py on a tiny LM, aot_eager (no code generation): it runs both ways, the compiled LM
agreeing with eager (the script asserts it), and with --frozen-lm times stage 1's case (gradient of the input
embeddings only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen-lm"])
def test_compile_lm_script(tmp_path, frozen):
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_lm.py"), "--d-model", "32",
                        "--n-layer", "2", "--batch", "2", "--seqlen", "40", "--vocab", "64", "--repeats", "1",
                        "--threads", "1", "--backend", "aot_eager", "--out", str(out)]
                       + (["--frozen-lm"] if frozen else []), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["frozen_lm"] is frozen and res["max_diff"]["grad_rel"] < 1e-2
    assert res["seconds_median"]["compiled_train"] > 0
