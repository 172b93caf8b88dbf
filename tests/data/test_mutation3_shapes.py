"""Mutation round 3: ShapesWorld facts the earlier tests let through, each against an independent oracle.

* RefCOCO-format boxes ``[x, y, w, h]`` hold every pixel of the referred shape, and are at most a pixel wider
  than it on each side (the rendered pixels: the connected non-background region under the shape's centre).
* The held-out split never repeats a training image, even where the scene space is small enough for repeats
  to be likely (the rendered PNGs compared byte for byte).
* The blind baseline answers each held-out question with the answer most often given to it in training, else
  to its template, else overall (a hand-made data set; expected answers counted by hand).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.measure import label

from emma_mamba.data import shapes as sw



def _matches(ref: str, shape: dict) -> bool:
    """Whether the referring expression ``ref`` ("red circle", "blue shape", "large red square", ...) fits."""
    for w in ref.split():
        if w == "shape":
            continue
        if w not in (shape["kind"], shape["colour"], shape["size"]):
            return False
    return True


def test_refcoco_boxes_hold_exactly_the_referred_shape(tmp_path):
    out = tmp_path / "w"
    sw.generate(sw.ShapesConfig(seed=11, n_train=4, n_heldout=40, image_size=128, max_shapes=5, detail_prob=0.5), out)
    scenes = {s["image"]: s["shapes"] for s in json.loads((out / "heldout/scenes.json").read_text())}
    recs = json.loads((out / "heldout/refcoco_val.json").read_text())
    assert len(recs) >= 30
    kinds_seen = set()
    for r in recs:
        assert r["sentence"].startswith("the ")
        ref = r["sentence"][4:]
        hits = [s for s in scenes[r["image"]] if _matches(ref, s)]
        assert len(hits) == 1, (r, hits)  # a referring expression names exactly one shape
        s = hits[0]
        img = np.asarray(Image.open(out / "images" / r["image"]).convert("RGB"))
        assert img.shape[:2] == (r["height"], r["width"]) == (128, 128)
        lab = label(~(img == 255).all(-1), connectivity=2)
        region = lab == lab[s["cy"], s["cx"]]
        assert lab[s["cy"], s["cx"]] != 0
        ys, xs = np.nonzero(region)
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()  # inclusive pixel extent
        x, y, w, h = r["bbox"]
        # every pixel inside [x, x + w) x [y, y + h) ...
        assert x <= x0 and y <= y0 and x + w - 1 >= x1 and y + h - 1 >= y1, (r, (x0, y0, x1, y1))
        # ... and no more than one pixel of slack on any side (rounded outwards, never by a whole pixel more)
        assert x0 - x <= 1 and y0 - y <= 1 and (x + w - 1) - x1 <= 1 and (y + h - 1) - y1 <= 1, (r, (x0, y0, x1, y1))
        kinds_seen.add(s["kind"])
    assert {"square", "circle"} <= kinds_seen


def test_heldout_images_never_repeat_training_images(tmp_path):
    # one shape per image on a 3x3 grid, 2 colours x 4 kinds x 3 sizes, little jitter, no details: a small scene
    # space, where about a fifth of 100 independent held-out draws would repeat one of 200 training scenes
    cfg = sw.ShapesConfig(seed=0, n_train=200, n_heldout=100, image_size=96, min_shapes=1, max_shapes=1,
                          layout="grid", grid=3, detail_prob=0.0, colours=("red", "blue"),
                          kinds=("circle", "square", "triangle", "diamond"), pope_k=3, max_turns=1)
    out = tmp_path / "w"
    sw.generate(cfg, out)
    train = [np.asarray(Image.open(p)).tobytes() for p in sorted((out / "images/train").glob("*.png"))]
    held = [np.asarray(Image.open(p)).tobytes() for p in sorted((out / "images/heldout").glob("*.png"))]
    assert len(train) == 200 and len(held) == 100
    assert len(set(train)) < len(train)  # repeats do happen within training: the scene space is small
    assert not set(held) & set(train)
    assert len(set(held)) == len(held)  # nor within the held-out split


SHORT = "Answer the question using a single word or phrase."


def _conv(q, a):
    return {"image": "train/x.png", "conversations": [{"from": "human", "value": f"<image>\n{q}\n{SHORT}"},
                                                      {"from": "gpt", "value": a}]}


def test_blind_baseline_picks_the_most_frequent_answer(tmp_path):
    data = tmp_path / "d"
    (data / "train").mkdir(parents=True)
    (data / "heldout" / "mme").mkdir(parents=True)
    train = ([_conv("What color is the circle?", "red")] * 3 + [_conv("What color is the circle?", "blue")]
             + [_conv("What color is the square?", "green")] * 2
             + [_conv("How many shapes are there?", "3")] * 2 + [_conv("How many shapes are there?", "2")]
             + [_conv("Is there a red circle in the image?", "yes")] * 2
             + [_conv("Is there a red circle in the image?", "no")])
    # answers overall: red 3, green 2, 3 2, yes 2, blue 1, 2 1, no 1
    (data / "train" / "stage2_instruct.json").write_text(json.dumps(train))
    vqa = [("What color is the circle?", "red"),      # the exact question: red 3 against blue 1
           ("What color is the triangle?", "red"),    # unseen; its template "What color is the {K}?": red 3, green 2, blue 1
           ("How many shapes are there?", "3"),       # 3 twice, 2 once
           ("Why is the sky blue today?", "red")]     # nothing alike: the most frequent answer overall
    (data / "heldout" / "vqav2_questions.json").write_text(json.dumps(
        {"questions": [{"question_id": i, "image_id": i, "question": q} for i, (q, _) in enumerate(vqa)]}))
    (data / "heldout" / "gqa_questions.json").write_text(json.dumps(
        {"g1": {"question": "How many shapes are there?", "imageId": "x", "answer": "3"}}))
    for v in ("random", "popular", "adversarial"):
        (data / "heldout" / f"pope_{v}.jsonl").write_text(json.dumps(
            {"question_id": 1, "image": "heldout/x.png", "text": "Is there a red circle in the image?",
             "label": "yes"}) + "\n")
    (data / "heldout" / "mme" / "existence.txt").write_text(
        "x.png\tIs there a red circle in the image? Please answer yes or no.\tYes\n")
    files = sw.blind_baseline(data, tmp_path / "blind")
    got = {r["question_id"]: r["answer"] for r in json.loads(Path(files["vqav2"][0]).read_text())}
    assert got == {i: a for i, (_, a) in enumerate(vqa)}
    assert json.loads(Path(files["gqa"][0]).read_text()) == [{"questionId": "g1", "prediction": "3"}]
    for v in ("random", "popular", "adversarial"):
        rows = [json.loads(l) for l in Path(files[f"pope_{v}"][0]).read_text().splitlines()]
        assert rows == [{"question_id": 1, "text": "yes"}]
    mme = (tmp_path / "blind" / "mme" / "existence.txt").read_text().splitlines()
    assert mme == ["x.png\tIs there a red circle in the image? Please answer yes or no.\tYes\tYes"]
