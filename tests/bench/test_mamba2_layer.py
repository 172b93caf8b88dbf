"""benchmarks/mamba2_layer.py on a tiny layer: it checks transformers' Mamba2 mixer against ours on the same
weights before timing (a wrong weight mapping would stop it), and writes its JSON; mamba-ssm is skipped off a GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mamba2_layer_script(tmp_path):
    out = tmp_path / "m2.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mamba2_layer.py"), "--d-model", "64", "--d-state",
                        "16", "--headdim", "16", "--ngroups", "2", "--batch", "2", "--seqlen", "40", "--repeats", "1",
                        "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["max_rel_diff_vs_ours"]["transformers"] < 1e-3
    assert set(res["results_ms"]) == {"ours", "transformers"} and "mamba_ssm" in res["peers_not_run"]
    assert res["ratios"]["transformers_over_ours.fwd_bwd"] > 0 and res["shape"]["nheads"] == 8
