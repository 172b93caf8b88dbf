"""benchmarks/activation_memory.py on a tiny LM: the three variants agree (the script checks losses and
gradients and exits otherwise), and the kept bytes differ as counted by hand: the mixers' recompute drops at
least the conv output, delta and the scan output (3 fp32 (b, d_inner, l) tensors per layer), block checkpointing
keeps less still."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_activation_memory_script(tmp_path):
    out = tmp_path / "am.json"
    b, l, d_model, n_layer = 2, 48, 32, 2
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "activation_memory.py"), "--d-model", str(d_model),
                        "--n-layer", str(n_layer), "--batch", str(b), "--seqlen", str(l), "--vocab", "64",
                        "--repeats", "1", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    kept = res["kept_bytes"]
    unit = b * 2 * d_model * l * 4  # one fp32 (b, d_inner, l) activation, d_inner = 2 * d_model
    assert kept["keep_all"] - kept["mixer_recompute"] >= 3 * n_layer * unit, kept
    assert kept["block_checkpointing"] < kept["mixer_recompute"], kept
    assert set(res["seconds_median"]) == {"keep_all", "mixer_recompute", "block_checkpointing"}
