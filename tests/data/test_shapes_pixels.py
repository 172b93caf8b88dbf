"""ShapesWorld labels against the pixels, with a second, separately written oracle (scipy.ndimage connected
components, convex-hull solidity for the star), on what tests/data/test_shapes.py (seed 7, 160 px, free layout)
does not cover: the quickstart's 96-px images (seed 0, as the README's figures), the grid layout with full
grids, and the caption parts those tests do not read (each shape's detail phrase and region).

The questions are answered by test_shapes.oracle_answer from these measurements, so a question template
unknown to it fails here too.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from emma_mamba.data import shapes as sw
from tests.data.test_shapes import _iou, holds, oracle_answer, resolve

RGB = {"red": (220, 40, 40), "blue": (40, 90, 230), "green": (40, 160, 60), "yellow": (235, 200, 20),
       "purple": (140, 60, 200), "orange": (245, 130, 20), "pink": (240, 110, 180), "gray": (125, 125, 125)}
WHITE, DARK = (255, 255, 255), (20, 20, 20)
REGIONS = {"in the top left": (0, 0), "at the top": (1, 0), "in the top right": (2, 0), "on the left": (0, 1),
           "in the center": (1, 1), "on the right": (2, 1), "in the bottom left": (0, 2), "at the bottom": (1, 2),
           "in the bottom right": (2, 2)}
CONFIGS = {
    # the quickstart's data (configs/quickstart.yaml): seed 0, 96-px images, existence questions weighed 4
    "quickstart96": dict(seed=0, n_train=30, n_heldout=30, image_size=96, question_mix={"existence": 4}),
    # full 3x3 grids at the smallest image size the grid allows, every shape with a detail half of the time
    "grid": dict(seed=2, n_train=15, n_heldout=25, image_size=96, layout="grid", min_shapes=6, max_shapes=9,
                 detail_prob=0.5),
}


def measure(path: Path, size: int) -> list[dict]:
    """The shapes of one image from its pixels: one 8-connected non-white component per shape."""
    img = np.asarray(Image.open(path).convert("RGB"))
    known = np.zeros(img.shape[:2], bool)
    for c in (WHITE, DARK, *RGB.values()):
        known |= (img == c).all(-1)
    assert known.all(), f"{path}: {int((~known).sum())} pixels of no palette colour (blending)"
    lab, _ = ndimage.label(~(img == WHITE).all(-1), structure=np.ones((3, 3)))
    radii = {s: round(f * size) for s, f in sw.SIZE_FRACTION.items()}
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        m = lab[sl] == i
        pix = img[sl][m]
        dark = (pix == DARK).all(-1)
        colours = {n for n, c in RGB.items() if (pix == c).all(-1).any()}
        assert len(colours) == 1, f"{path}: one component holds {colours}"
        h, w = m.shape
        ys, xs = np.nonzero(m)
        corners = np.c_[np.r_[xs, xs + 1, xs, xs + 1], np.r_[ys, ys, ys + 1, ys + 1]]
        solidity = m.sum() / ConvexHull(corners).volume
        fill = m.sum() / (h * w)
        rows = m.sum(1)
        widest = np.flatnonzero(rows == rows.max()).mean() / (h - 1)
        if solidity < 0.8:
            kind = "star"
        elif fill > 0.95:
            kind = "square"
        elif fill > 0.7:
            kind = "circle"
        else:
            kind = "triangle" if widest > 0.8 else "diamond"
        r = (h - 1) / (1 + np.cos(np.radians(36))) if kind == "star" else (h - 1) / 2  # star: r up, cos36 r down
        detail = None
        if dark.any():
            dm = np.zeros_like(m)
            dm[m] = dark
            dy, dx = np.nonzero(dm)
            detail = "stripe" if np.ptp(dx) + 1 > 1.8 * (np.ptp(dy) + 1) else "dot"
        y0, x0 = sl[0].start, sl[1].start
        colour = colours.pop()
        out.append(dict(colour=colour, kind=kind, size=min(radii, key=lambda s: abs(radii[s] - r)), detail=detail,
                        box=(x0, y0, x0 + w - 1, y0 + h - 1), obj=f"{colour} {kind}"))
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def world(request, tmp_path_factory):
    cfg = sw.ShapesConfig(**CONFIGS[request.param])
    out = tmp_path_factory.mktemp(request.param)
    sw.generate(cfg, out)
    images = [sc["image"] for split in ("train", "heldout")
              for sc in json.loads((out / split / "scenes.json").read_text())]
    return out, cfg, {p: measure(out / "images" / p, cfg.image_size) for p in images}


def test_scenes_match_pixels(world):
    out, cfg, seen = world
    for split in ("train", "heldout"):
        for sc in json.loads((out / split / "scenes.json").read_text()):
            want = Counter((s["colour"], s["kind"], s["size"], s["detail"]) for s in sc["shapes"])
            got = Counter((s["colour"], s["kind"], s["size"], s["detail"]) for s in seen[sc["image"]])
            assert got == want, sc["image"]
            for s in seen[sc["image"]]:  # never cut by the border
                assert 0 < s["box"][0] and 0 < s["box"][1] and s["box"][2] < cfg.image_size - 1 > s["box"][3]


def _third_share(lo: int, hi: int, k: int, size: int) -> float:
    """The share of the pixel span lo..hi (inclusive) inside the k-th third of the image side."""
    a, b = k * size / 3, (k + 1) * size / 3
    return max(0.0, min(hi + 1, b) - max(lo, a)) / (hi + 1 - lo)


def test_captions_name_every_shape_with_its_detail_and_region(world):
    """Every shape once, with its size, colour, kind, detail; the region named (thirds of the image side, by the
    shape's centre) holds at least 40 % of the shape's pixel extent along each axis: half, but for a star centred
    on a third's edge, 0.809 / 1.809 (its points reach r up and cos(36°) r down)."""
    out, cfg, seen = world
    pat = re.compile(r"an? (small|medium|large) (\w+) (circle|square|triangle|star|diamond)"
                     r"(?: with a (dot|stripe) inside| with a black (dot|stripe)| marked with a (dot|stripe))? "
                     r"(" + "|".join(REGIONS) + r")\b")
    n = 0
    for f in ("train/stage1_captions.json", "heldout/captions.json"):
        for rec in json.loads((out / f).read_text()):
            cap, shapes = rec["conversations"][1]["value"], seen[rec["image"]]
            parts = pat.findall(cap)
            assert Counter(p[:3] + (p[3] or p[4] or p[5] or None,) for p in parts) == Counter(
                (s["size"], s["colour"], s["kind"], s["detail"]) for s in shapes), cap
            for p in parts:  # (a shape of the same size, colour, kind and detail:) in the region named
                col, row = REGIONS[p[6]]
                same = [s for s in shapes if (s["size"], s["colour"], s["kind"], s["detail"] or "")
                        == p[:3] + (p[3] or p[4] or p[5],)]
                assert any(min(_third_share(s["box"][0], s["box"][2], col, cfg.image_size),
                               _third_share(s["box"][1], s["box"][3], row, cfg.image_size)) >= 0.4
                           for s in same), (rec["image"], cap, p)
                n += 1
    assert n > 60


def test_every_answer_matches_pixels(world):
    """Stage-2 conversations (train and held-out) and every held-out benchmark file, from the measured shapes."""
    out, cfg, seen = world
    n = 0
    for f in ("train/stage2_instruct.json", "heldout/instruct.json"):
        for rec in json.loads((out / f).read_text()):
            conv = rec["conversations"]
            for h, g in zip(conv[0::2], conv[1::2]):
                q = h["value"].removeprefix("<image>\n").removesuffix("\n" + sw.SHORT_ANSWER_PROMPT)
                if q != "Describe the image in detail.":
                    assert g["value"] == oracle_answer(q, seen[rec["image"]]), (rec["image"], q)
                    n += 1
    ho = out / "heldout"
    for v in sw.POPE_VARIANTS:
        for line in (ho / f"pope_{v}.jsonl").read_text().splitlines():
            r = json.loads(line)
            assert r["label"] == oracle_answer(r["text"], seen[r["image"]]), r
            n += 1
    anns = {a["question_id"]: a for a in json.loads((ho / "vqav2_annotations.json").read_text())["annotations"]}
    for q in json.loads((ho / "vqav2_questions.json").read_text())["questions"]:
        assert anns[q["question_id"]]["multiple_choice_answer"] == oracle_answer(q["question"], seen[q["image"]]), q
        n += 1
    for q in json.loads((ho / "gqa_questions.json").read_text()).values():
        assert q["answer"] == oracle_answer(q["question"], seen[q["image"]]), q
        n += 1
    for p in sorted((ho / "mme").glob("*.txt")):
        for line in p.read_text().splitlines():
            img, q, a = line.split("\t")
            assert a.lower() == oracle_answer(q, seen[img]), (p.name, q)
            n += 1
    for line in (ho / "vsr_test.jsonl").read_text().splitlines():
        r = json.loads(line)
        m = re.fullmatch(r"The (.+?) is (to the left of|to the right of|above|below) the (.+)\.", r["caption"])
        shapes = seen[r["image"]]
        assert r["label"] == int(holds(resolve(m[1], shapes), m[2], resolve(m[3], shapes))), r
        n += 1
    for t in json.loads((ho / "tallyqa_test.json").read_text()):
        shapes = seen[t["image"]]
        words = t["question"].removeprefix("How many ").removesuffix(" are there?").split()
        want = sum(all(w in (s["colour"], s["kind"] + "s", "shapes") for w in words) for s in shapes)
        assert t["answer"] == want, t
        n += 1
    for r in json.loads((ho / "refcoco_val.json").read_text()):
        x, y, w, h = r["bbox"]
        # the labelled box holds the drawn shape (the star's is rounded outwards: one pixel wider and taller)
        shape = resolve(r["sentence"].removeprefix("the "), seen[r["image"]])
        assert _iou((x, y, x + w - 1, y + h - 1), shape["box"]) >= 0.85, r
        n += 1
    assert n > 500
