"""benchmarks/serve_turns.py runs end to end (3 turns, a random tiny checkpoint) and writes its JSON: the two
servers answer alike, and every request reports what it prefilled."""

import json
import os
import sys
from pathlib import Path

import skimage
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_serve_turns_smoke(tmp_path):
    from benchmarks import serve_turns
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    EmmaMamba(get_preset("tiny"), for_training=False).save(tmp_path / "ck")
    image = os.path.join(os.path.dirname(skimage.data.__file__), "chelsea.png")
    out = tmp_path / "r.json"
    assert serve_turns.main(["--checkpoint", str(tmp_path / "ck"), "--image", image, "--turns", "3",
                             "--new-tokens", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [r["turn"] for r in rows] == [1, 2, 3]
    from emma_mamba import ops

    assert res["device"] == "cpu" and res["backend"] == ops.get_backend("cpu")
    for r in rows:
        assert r["cache"]["answer"] == r["no_cache"]["answer"]
        assert r["no_cache"]["prefilled"] == r["no_cache"]["context_positions"]  # no cache: the whole history
        assert r["cache"]["state_cache"] == "miss" or r["cache"]["prefilled"] < r["no_cache"]["prefilled"]
