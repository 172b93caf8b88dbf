"""benchmarks/serve_images.py on a tiny saved model: both settings answer the same (checked by the script, which
exits non-zero otherwise) and the JSON holds both timings."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_serve_images_script(tmp_path):
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    EmmaMamba(get_preset("tiny"), for_training=False).save(tmp_path / "ckpt")
    out = tmp_path / "si.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_images.py"), "--checkpoint",
                        str(tmp_path / "ckpt"), "--requests", "3", "--runs", "1", "--max-tokens", "2", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["answers_equal"] and set(res["seconds"]) == {"batched", "one_by_one"} and res["requests"] == 3
