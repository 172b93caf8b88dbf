"""benchmarks/activation_probe.py: patch labels by hand, and the script end to end (a random tiny checkpoint on a
small ShapesWorld) writing per-layer AUCs that equal the AUCs recomputed from the maps."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_patch_labels_by_hand():
    from benchmarks.activation_probe import patch_labels

    # a 40-px image on a 4 x 4 grid (10-px patches); one shape box x 10..29, y 0..14 (inclusive)
    labels = patch_labels([{"box": (10, 0, 29, 14)}], 40, (4, 4))
    assert labels[:4] == [0, 1, 1, 0]          # row 0: patches 1 and 2 wholly inside
    assert labels[4:8] == [0, None, None, 0]   # row 1: y 10..19, half of it (10..14) inside: not more than half
    assert labels[8:] == [0] * 8


def test_activation_probe_smoke(tmp_path):
    import torch

    from benchmarks import activation_probe
    from emma_mamba.config import get_preset
    from emma_mamba.data.shapes import ShapesConfig, generate
    from emma_mamba.models.vlm import EmmaMamba

    data = tmp_path / "sw"
    generate(ShapesConfig(seed=1, n_train=2, n_heldout=6, image_size=96), data)
    torch.manual_seed(0)
    EmmaMamba(get_preset("tiny"), for_training=False).save(tmp_path / "ck")
    out = tmp_path / "probe.json"
    assert activation_probe.main(["--data", str(data), "--checkpoint", f"random={tmp_path / 'ck'}", "--images", "6",
                                  "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]["random"]["layers"]
    assert set(r) == {"0", "1", "2"} and all(0 <= v["mean_auc"] <= 1 and v["images"] >= 1 for v in r.values())
    assert (tmp_path / "activation_maps_random.png").is_file()
    # the AUCs again, from the maps and the labels directly (an independent pairwise count)
    from emma_mamba.data.shapes import Shape
    from emma_mamba.inference.visualize import activation_maps
    from emma_mamba.models.vlm import load

    model = load(tmp_path / "ck")
    scenes = json.loads((data / "heldout" / "scenes.json").read_text())
    aucs = []
    for sc in scenes:
        labels = activation_probe.patch_labels([{"box": Shape(**s).box} for s in sc["shapes"]], 96, model.vision.grid)
        m = activation_maps(model, data / "images" / sc["image"], layers=[2])[2].flatten().tolist()
        pos = [v for v, y in zip(m, labels) if y == 1]
        neg = [v for v, y in zip(m, labels) if y == 0]
        if pos and neg:
            aucs.append(sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg)))
    assert r["2"]["mean_auc"] == pytest.approx(sum(aucs) / len(aucs)) and r["2"]["images"] == len(aucs)
