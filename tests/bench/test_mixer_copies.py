"""benchmarks/mixer_copies.py on a tiny LM: it runs, writes its JSON, and counts no activation copies in a training
step at batch 2 nor any copy of x/z/B/C in a batched decode step (the kernels read the mixer's views in place;
tests/ops/test_strided_inputs.py checks the same at the model level and fails on the tree before that change)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mixer_copies_script(tmp_path):
    out = tmp_path / "mc.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mixer_copies.py"), "--d-model", "32",
                        "--n-layer", "2", "--batch", "2", "--seqlen", "40", "--vocab", "64", "--repeats", "1",
                        "--decode-batch", "3", "--decode-steps", "2", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["train_step"]["activation_copies"] == 0 and res["decode_step"]["copies"] == 0, res
    assert res["shape"]["decode_batch"] == 3 and res["train_step"]["ms_median"] > 0
