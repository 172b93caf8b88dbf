"""benchmarks/eval_batching.py on a tiny random checkpoint and a small ShapesWorld set: both workloads answered
with both batchings, the same replies, every question of the mixed workload (one description per image plus
the VQAv2 questions) answered, and decode steps counted for both."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_eval_batching_script(tmp_path):
    from emma_mamba.config import get_preset
    from emma_mamba.data.shapes import ShapesConfig, generate
    from emma_mamba.models.vlm import EmmaMamba

    data = tmp_path / "data"
    generate(ShapesConfig(seed=1, n_train=4, n_heldout=3, image_size=96), data)
    torch.manual_seed(0)
    EmmaMamba(get_preset("tiny"), for_training=False).save(tmp_path / "ckpt")
    sys.path.insert(0, str(ROOT))
    from benchmarks.eval_batching import main

    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--batch-size", "2",
                     "--max-new-tokens", "4", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    qs = json.loads((data / "heldout" / "vqav2_questions.json").read_text())["questions"]
    n_images = len({q["image"] for q in qs})
    assert res["workloads"]["mixed"]["n_questions"] == len(qs) + n_images
    assert res["workloads"]["vqav2"]["n_questions"] == len(qs)
    for w in res["workloads"].values():
        assert w["replies_identical"] and w["n_replies_different"] == 0
        assert sorted(r["batching"] for r in w["runs"]) == ["continuous", "static"]
        for r in w["runs"]:
            assert r["decode_steps"] > 0
            assert r["seconds_answering"] > 0
