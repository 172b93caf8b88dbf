"""ShapesWorld: determinism, and every annotation checked against the rendered pixels.

The oracle here never reads the generator's placement or attributes: it segments each PNG into connected
non-background regions (scikit-image), names each region's colour from its pixels, its kind from its fill
ratio and row profile, its size from its width, its detail from its near-black pixels, and its position from
its measured bounding box. Questions are parsed back from their text and answered from those measurements.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from emma_mamba.data import shapes as sw

SIZE = 160
CFG = dict(n_train=40, n_heldout=40, image_size=SIZE, max_shapes=5, detail_prob=0.5)
PALETTE = {  # written out again here, so a changed palette cannot silently agree with itself
    (220, 40, 40): "red", (40, 90, 230): "blue", (40, 160, 60): "green", (235, 200, 20): "yellow",
    (140, 60, 200): "purple", (245, 130, 20): "orange", (240, 110, 180): "pink", (125, 125, 125): "gray",
}
WHITE, DARK = (255, 255, 255), (20, 20, 20)
SIZES, KINDS, COLOURS = ("small", "medium", "large"), sw.KINDS, tuple(PALETTE.values())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "w"
    meta = sw.generate(sw.ShapesConfig(seed=7, **CFG), out)
    return out, meta


# ------------------------------------------------------------------------------------------- oracle

def measure(path: Path) -> list[dict]:
    """Shapes seen in the image: colour, kind, size, detail, centre and bounding box, from pixels only."""
    img = np.asarray(Image.open(path).convert("RGB"))
    fg = ~(img == WHITE).all(-1)
    lab = label(fg, connectivity=2)
    found = []
    for reg in regionprops(lab):
        y0, x0, y1, x1 = reg.bbox  # exclusive max
        mask = lab[y0:y1, x0:x1] == reg.label
        pix = img[y0:y1, x0:x1][mask]
        dark = (pix == DARK).all(-1)
        colours = Counter(map(tuple, pix[~dark]))
        assert len(colours) == 1, f"{path}: a region mixes colours {colours}"
        rgb = next(iter(colours))
        assert rgb in PALETTE, f"{path}: colour {rgb} is not in the palette"
        h, w = mask.shape
        fill = mask.sum() / (h * w)
        if fill > 0.93:
            kind = "square"
        elif fill > 0.68:
            kind = "circle"
        elif fill > 0.42:
            widest = int(np.argmax(mask.sum(1)))
            kind = "triangle" if widest > 0.75 * h else "diamond"
        else:
            kind = "star"
        span = w if kind != "star" else w / 0.951  # the star is narrower than its nominal 2r
        r = (span - 1) / 2 / SIZE
        size = min(sw.SIZE_FRACTION, key=lambda s: abs(sw.SIZE_FRACTION[s] - r))
        detail = None
        dmask = np.zeros_like(mask)
        dmask[mask] = dark
        if dark.any():
            ys, xs = np.nonzero(dmask)
            dw, dh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            detail = "stripe" if dw >= 1.8 * dh else "dot"
        found.append(dict(colour=PALETTE[rgb], kind=kind, size=size, detail=detail, label=reg.label,
                          box=(x0, y0, x1 - 1, y1 - 1), obj=f"{PALETTE[rgb]} {kind}"))
    return found, lab, img


def load_scene_truth(world):
    out, _ = world
    truth = {}
    for split in ("train", "heldout"):
        for sc in json.loads((out / split / "scenes.json").read_text()):
            truth[sc["image"]] = sc["shapes"]
    return truth


@pytest.fixture(scope="module")
def seen(world):
    out, _ = world
    return {p: measure(out / "images" / p)[0] for p in load_scene_truth(world)}


# --------------------------------------------------------------------------------------- determinism

def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _text_files(tree):
    return {k: v for k, v in tree.items() if not k.endswith(".png")}


def test_same_seed_same_bytes_and_pixels(tmp_path, world):
    a, _ = world
    sw.generate(sw.ShapesConfig(seed=7, **CFG), tmp_path / "b")
    ta, tb = _tree(a), _tree(tmp_path / "b")
    assert ta.keys() == tb.keys()
    assert _text_files(ta) == _text_files(tb)
    for k in ta:
        if k.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(a / k)), np.asarray(Image.open(tmp_path / "b" / k))), k


def test_same_seed_other_process_and_hash_seed(tmp_path, world):
    """No output may depend on str hashing (set/dict order): a fresh process with another PYTHONHASHSEED."""
    a, _ = world
    code = ("import sys; from emma_mamba.data import shapes as sw; "
            f"sw.generate(sw.ShapesConfig(seed=7, **{CFG!r}), sys.argv[1])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, env=env)
    assert _text_files(_tree(a)) == _text_files(_tree(tmp_path / "c"))


def test_different_seed_differs(tmp_path, world):
    a, _ = world
    sw.generate(sw.ShapesConfig(seed=8, **CFG), tmp_path / "d")
    ta, td = _tree(a), _tree(tmp_path / "d")
    for f in ("train/stage1_captions.json", "train/stage2_instruct.json", "heldout/pope_random.jsonl"):
        assert ta[f] != td[f], f
    pa = np.asarray(Image.open(a / "images/train/000000.png"))
    pd = np.asarray(Image.open(tmp_path / "d/images/train/000000.png"))
    assert not np.array_equal(pa, pd)


def test_splits_are_disjoint(world):
    out, _ = world
    train = {np.asarray(Image.open(p)).tobytes() for p in sorted((out / "images/train").glob("*.png"))}
    held = [np.asarray(Image.open(p)).tobytes() for p in sorted((out / "images/heldout").glob("*.png"))]
    assert len(held) == CFG["n_heldout"] and not any(h in train for h in held)
    llava_images = {r["image"] for r in json.loads((out / "train/stage2_instruct.json").read_text())}
    bench_images = {json.loads(l)["image"] for l in (out / "heldout/pope_random.jsonl").read_text().splitlines()}
    assert llava_images.isdisjoint(bench_images)
    assert all(i.startswith("train/") for i in llava_images) and all(i.startswith("heldout/") for i in bench_images)


def test_grid_layout_and_config_errors(tmp_path):
    cfg = sw.ShapesConfig(seed=1, n_train=5, n_heldout=5, image_size=SIZE, layout="grid", max_shapes=6)
    sw.generate(cfg, tmp_path / "g")
    for p in sorted((tmp_path / "g/images/train").glob("*.png")):
        found, _, _ = measure(p)
        assert 1 <= len(found) <= 6
    with pytest.raises(ValueError, match="image_size"):
        sw.ShapesConfig(image_size=40).validate()
    with pytest.raises(ValueError, match="colours"):
        sw.ShapesConfig(colours=("red", "teal")).validate()
    with pytest.raises(ValueError, match="min_shapes"):
        sw.ShapesConfig(min_shapes=3, max_shapes=2).validate()
    with pytest.raises(FileExistsError, match="overwrite"):
        sw.generate(cfg, tmp_path / "g")


# ------------------------------------------------------------------------------ pixels vs annotations

def test_rendered_shapes_match_annotations(world):
    out, _ = world
    for image, shapes in load_scene_truth(world).items():
        found, lab, img = measure(out / "images" / image)
        assert len(found) == len(shapes), image  # count of connected regions
        by_label = {f["label"]: f for f in found}
        matched = set()
        for s in shapes:
            # the pixel at the annotated centre: the shape's colour, or the detail's when it has one
            px = tuple(img[s["cy"], s["cx"]])
            assert px == (DARK if s["detail"] else next(k for k, v in PALETTE.items() if v == s["colour"])), image
            f = by_label[lab[s["cy"], s["cx"]]]
            matched.add(f["label"])
            got = (f["colour"], f["kind"], f["size"], f["detail"])
            assert got == (s["colour"], s["kind"], s["size"], s["detail"]), (image, got, s)
        assert len(matched) == len(shapes), image


def test_captions_mention_every_shape(world, seen):
    out, _ = world
    for rec in json.loads((out / "train/stage1_captions.json").read_text()):
        assert rec["conversations"][0]["value"].startswith("<image>\n")
        cap = rec["conversations"][1]["value"]
        phrases = re.findall(r"\b(small|medium|large) (\w+) (circle|square|triangle|star|diamond)\b", cap)
        assert Counter(phrases) == Counter((f["size"], f["colour"], f["kind"]) for f in seen[rec["image"]]), cap


# ----------------------------------------------------------------------- questions answered by the oracle

REL = r"(?P<rel>to the left of|to the right of|above|below)"


def resolve(ref: str, shapes: list[dict]) -> dict:
    """The one shape a referring expression ("red circle", "star", "small blue square", "red shape") names."""
    words = ref.split()
    keep = shapes
    for w in words:
        if w in SIZES:
            keep = [s for s in keep if s["size"] == w]
        elif w in COLOURS:
            keep = [s for s in keep if s["colour"] == w]
        elif w in KINDS:
            keep = [s for s in keep if s["kind"] == w]
        else:
            assert w == "shape", f"unexpected word {w!r} in reference {ref!r}"
    assert len(keep) == 1, f"reference {ref!r} picks {len(keep)} shapes"
    return keep[0]


def holds(a: dict, rel: str, b: dict) -> bool:
    ax0, ay0, ax1, ay1 = a["box"]
    bx0, by0, bx1, by1 = b["box"]
    return {"to the left of": ax1 < bx0, "to the right of": bx1 < ax0, "above": ay1 < by0, "below": by1 < ay0}[rel]


def oracle_answer(q: str, shapes: list[dict]) -> str:
    """The answer the measured shapes give to question q (a failure if q matches no known template)."""
    q = q.replace(sw.MME_SUFFIX, "")
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    objs = {s["obj"] for s in shapes}
    m = re.fullmatch(r"What (?P<attr>color|shape) is (the shape )?" + REL + r" the (?P<b>.+)\?", q)
    if m:
        b = resolve(m["b"], shapes)
        hits = [a for a in shapes if a is not b and holds(a, m["rel"], b)]
        assert len(hits) == 1, q
        return hits[0]["colour" if m["attr"] == "color" else "kind"]
    if m := re.fullmatch(r"(What color is the|What is the color of the|Which color is the) (?P<r>.+)\?", q):
        return resolve(m["r"], shapes)["colour"]
    if m := re.fullmatch(r"(What shape is the|What is the shape of the|Which shape is the) (?P<r>.+)\?", q):
        return resolve(m["r"], shapes)["kind"]
    if m := re.fullmatch(r"(What size is the|How big is the) (?P<r>.+)\?", q):
        return resolve(m["r"], shapes)["size"]
    if re.fullmatch(r"How many shapes are (there|in the image)\?", q):
        return str(len(shapes))
    if m := re.fullmatch(r"How many (?P<c>\w+) shapes are there\?", q):
        return str(sum(s["colour"] == m["c"] for s in shapes))
    if m := re.fullmatch(r"How many (?P<k>\w+)s are there\?", q):
        return str(sum(s["kind"] == m["k"] for s in shapes))
    if m := re.fullmatch(r"(Are there exactly (?P<n>\d+) shapes|Is there exactly (?P<one>1) shape) in this image\?", q):
        return yn(int(m["n"] or m["one"]) == len(shapes))
    if m := re.fullmatch(r"What is inside the (?P<r>.+)\?", q):
        return resolve(m["r"], shapes)["detail"] or "nothing"
    if m := re.fullmatch(r"Does the (?P<r>.+) have a (?P<d>dot|stripe)\?", q):
        return yn(resolve(m["r"], shapes)["detail"] == m["d"])
    if m := re.fullmatch(r"(Is there|Do you see) an? (?P<o>\w+ \w+)( in (the|this) image)?\?", q):
        return yn(m["o"] in objs)
    if m := re.fullmatch(r"Are there both an? (?P<a>\w+ \w+) and an? (?P<b>\w+ \w+) in the image\?", q):
        return yn(m["a"] in objs and m["b"] in objs)
    if m := re.fullmatch(r"Is the (?P<a>.+?) to the left or to the right of the (?P<b>.+)\?", q):
        a, b = resolve(m["a"], shapes), resolve(m["b"], shapes)
        assert holds(a, "to the left of", b) != holds(a, "to the right of", b), q
        return "left" if holds(a, "to the left of", b) else "right"
    if m := re.fullmatch(r"Is the (?P<a>.+?) above or below the (?P<b>.+)\?", q):
        a, b = resolve(m["a"], shapes), resolve(m["b"], shapes)
        assert holds(a, "above", b) != holds(a, "below", b), q
        return "above" if holds(a, "above", b) else "below"
    if m := re.fullmatch(r"Is the (?P<a>.+?) " + REL + r" the (?P<b>.+)\?", q):
        return yn(holds(resolve(m["a"], shapes), m["rel"], resolve(m["b"], shapes)))
    if m := re.fullmatch(r"Do the (?P<a>.+) and the (?P<b>.+) have the same color\?", q):
        return yn(resolve(m["a"], shapes)["colour"] == resolve(m["b"], shapes)["colour"])
    if m := re.fullmatch(r"Are the (?P<a>.+) and the (?P<b>.+) the same shape\?", q):
        return yn(resolve(m["a"], shapes)["kind"] == resolve(m["b"], shapes)["kind"])
    if m := re.fullmatch(r"Is the number of (?P<a>\w+)s plus the number of (?P<b>\w+)s equal to (?P<t>\d+)\?", q):
        return yn(sum(s["kind"] in (m["a"], m["b"]) for s in shapes) == int(m["t"]))
    if m := re.fullmatch(r"Is the (?P<r>.+) (?P<c>\w+)\?", q):  # MME colour: "Is the star red?"
        assert m["c"] in COLOURS, q
        return yn(resolve(m["r"], shapes)["colour"] == m["c"])
    raise AssertionError(f"no oracle for question {q!r}")


def test_stage2_answers_match_pixels(world, seen):
    out, _ = world
    n, multi, categories = 0, 0, Counter()
    for path in ("train/stage2_instruct.json", "heldout/instruct.json"):
        for rec in json.loads((out / path).read_text()):
            conv = rec["conversations"]
            assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            multi += len(conv) > 2
            for h, g in zip(conv[0::2], conv[1::2]):
                q = h["value"].removeprefix("<image>\n").removesuffix("\n" + sw.SHORT_ANSWER_PROMPT)
                if q == "Describe the image in detail.":
                    continue
                assert g["value"] == oracle_answer(q, seen[rec["image"]]), (rec["image"], q)
                categories[q.split()[0]] += 1
                n += 1
    assert n > 60 and multi > 10
    assert len(categories) >= 6  # What/How/Is/Does/Are/Do ...


def test_vqav2_and_gqa_files_match_pixels(world, seen):
    out, _ = world
    qs = json.loads((out / "heldout/vqav2_questions.json").read_text())["questions"]
    anns = {a["question_id"]: a for a in json.loads((out / "heldout/vqav2_annotations.json").read_text())["annotations"]}
    assert len(qs) == len(anns) == CFG["n_heldout"] * 3
    types = Counter()
    for q in qs:
        a = anns[q["question_id"]]
        assert a["image_id"] == q["image_id"] and len(a["answers"]) == 10
        assert {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
        assert a["multiple_choice_answer"] == oracle_answer(q["question"], seen[q["image"]]), q
        types[a["answer_type"]] += 1
    assert set(types) == {"yes/no", "number", "other"}
    gqa = json.loads((out / "heldout/gqa_questions.json").read_text())
    structural = Counter()
    for qid, q in gqa.items():
        assert q["answer"] == oracle_answer(q["question"], seen[q["image"]]), q
        structural[q["types"]["structural"]] += 1
    assert {"verify", "choose", "logical"} <= set(structural)


def test_mme_files_match_pixels(world, seen):
    out, _ = world
    total = 0
    for p in sorted((out / "heldout/mme").glob("*.txt")):
        lines = [l.split("\t") for l in p.read_text().splitlines()]
        assert len(lines) % 2 == 0
        for a, b in zip(lines[0::2], lines[1::2]):
            assert a[0] == b[0] and (a[2], b[2]) == ("Yes", "No")
            for img, q, ans in (a, b):
                assert q.endswith(sw.MME_SUFFIX)
                assert ans.lower() == oracle_answer(q, seen[img]), (p.name, q)
        total += len(lines)
    assert total == 2 * CFG["n_heldout"]  # one category per image


def test_vsr_and_tallyqa_files_match_pixels(world, seen):
    """The closed-set files: each VSR statement's label is whether its relation holds between the measured
    shapes; each TallyQA answer is the measured count (complex: colour and kind together)."""
    out, _ = world
    vsr = [json.loads(x) for x in (out / "heldout/vsr_test.jsonl").read_text().splitlines()]
    assert len(vsr) > CFG["n_heldout"] // 2
    for r in vsr:
        m = re.fullmatch(r"The (?P<a>.+?) is " + REL + r" the (?P<b>.+)\.", r["caption"])
        shapes = seen[r["image"]]
        assert m and r["relation"] == m["rel"].removeprefix("to the "), r
        assert r["label"] == int(holds(resolve(m["a"], shapes), m["rel"], resolve(m["b"], shapes))), r
    assert 0.35 < sum(r["label"] for r in vsr) / len(vsr) < 0.65
    assert len({(r["image"], r["caption"]) for r in vsr}) == len(vsr)
    tally = json.loads((out / "heldout/tallyqa_test.json").read_text())
    assert len({t["question_id"] for t in tally}) == len(tally) > CFG["n_heldout"]
    kinds = Counter()
    for t in tally:
        shapes = seen[t["image"]]
        if m := re.fullmatch(r"How many (?P<c>\w+) (?P<k>\w+)s are there\?", t["question"]):
            if m["c"] in COLOURS and m["k"] in KINDS:
                assert not t["issimple"]
                assert t["answer"] == sum(s["colour"] == m["c"] and s["kind"] == m["k"] for s in shapes), t
                kinds["complex"] += 1
                continue
        assert t["issimple"] and str(t["answer"]) == oracle_answer(t["question"], shapes), t
        kinds["simple"] += 1
    assert kinds["simple"] > 10 and kinds["complex"] > 10
    assert Counter(t["answer"] > 0 for t in tally)[True] > len(tally) / 2


def _iou(a, b):
    """IoU of two inclusive pixel boxes (x0, y0, x1, y1)."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda t: (t[2] - t[0] + 1) * (t[3] - t[1] + 1)  # noqa: E731
    return iw * ih / (area(a) + area(b) - iw * ih)


def test_grounding_file_and_opt_in_turns_match_pixels(world, seen, tmp_path):
    """refcoco_val.json: each sentence names one measured shape and its box is that shape's measured box (IoU >=
    0.85: the generator's box is rounded outwards); grounding turns appear only when question_mix names them,
    without the short-answer instruction, their answer the referred shape's box over the image side."""
    from emma_mamba.eval.refcoco import parse_box

    out, _ = world
    recs = json.loads((out / "heldout/refcoco_val.json").read_text())
    assert len(recs) > CFG["n_heldout"] // 2
    for r in recs:
        shape = resolve(r["sentence"].removeprefix("the "), seen[r["image"]])
        x, y, w, h = r["bbox"]
        assert _iou((x, y, x + w - 1, y + h - 1), shape["box"]) >= 0.85, r
    assert sw.format_box((10, 20, 59, 99), 100) == "[0.10, 0.20, 0.60, 1.00]"
    assert not any("bounding box" in t["value"] for rec in json.loads((out / "train/stage2_instruct.json").read_text())
                   for t in rec["conversations"])
    g = tmp_path / "g"
    sw.generate(sw.ShapesConfig(seed=7, **{**CFG, "n_heldout": 2}, question_mix={"grounding": 3}), g)
    truth = {p: measure(g / "images" / p)[0] for p in load_scene_truth((g, None))}
    n = 0
    for rec in json.loads((g / "train/stage2_instruct.json").read_text()):
        conv = rec["conversations"]
        for hum, gpt in zip(conv[0::2], conv[1::2]):
            q = hum["value"].removeprefix("<image>\n")
            if not q.startswith(sw.GROUNDING_PROMPT):
                continue
            assert sw.SHORT_ANSWER_PROMPT not in q
            shape = resolve(q.removeprefix(sw.GROUNDING_PROMPT + " the "), truth[rec["image"]])
            box = parse_box(gpt["value"])
            px = [round(box[0] * SIZE), round(box[1] * SIZE), round(box[2] * SIZE) - 1, round(box[3] * SIZE) - 1]
            assert _iou(px, shape["box"]) >= 0.8, (q, gpt["value"], shape["box"])
            n += 1
    assert n > 10


# ------------------------------------------------------------------------------------------------ POPE

def test_pope_negatives_absent_and_of_the_right_kind(world, seen):
    out, _ = world
    held = {k: v for k, v in seen.items() if k.startswith("heldout/")}
    present = {img: {s["obj"] for s in shapes} for img, shapes in held.items()}
    vocab = [f"{c} {k}" for c in COLOURS for k in KINDS]
    # the POPE statistics, recomputed from the pixels of the held-out split
    freq = Counter(o for objs in present.values() for o in objs)
    cooc = Counter((a, b) for objs in present.values() for a in objs for b in objs if a != b)
    picked = {}
    for variant in sw.POPE_VARIANTS:
        rows = [json.loads(l) for l in (out / f"heldout/pope_{variant}.jsonl").read_text().splitlines()]
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert Counter(r["label"] for r in rows)["yes"] * 2 == len(rows)  # balanced
        per_image: dict[str, dict[str, list[str]]] = {}
        for r in rows:
            assert set(r) == {"question_id", "image", "text", "label"}
            o = re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", r["text"])[1]
            assert (o in present[r["image"]]) == (r["label"] == "yes"), r
            per_image.setdefault(r["image"], {"yes": [], "no": []})[r["label"]].append(o)
        assert set(per_image) == set(held)
        for img, d in per_image.items():
            assert len(d["yes"]) == len(d["no"]) == min(3, len(present[img]))
            assert len(set(d["no"])) == len(d["no"])
            absent_rest = [o for o in vocab if o not in present[img] and o not in d["no"]]
            if variant == "popular":  # no absent object left out is more frequent than one picked
                assert min(freq[o] for o in d["no"]) >= max(freq[o] for o in absent_rest), img
            if variant == "adversarial":
                score = {o: sum(cooc[(o, p)] for p in present[img]) for o in vocab}
                assert min(score[o] for o in d["no"]) >= max(score[o] for o in absent_rest), img
        picked[variant] = {img: tuple(d["no"]) for img, d in per_image.items()}
    # the three strategies really differ
    assert picked["random"] != picked["popular"] != picked["adversarial"] != picked["random"]
    # adversarial negatives mostly share a colour or a kind with a present object (the co-occurrence structure)
    shares = [any(o.split()[0] == p.split()[0] or o.split()[1] == p.split()[1] for p in present[img])
              for img, negs in picked["adversarial"].items() for o in negs]
    rand = [any(o.split()[0] == p.split()[0] or o.split()[1] == p.split()[1] for p in present[img])
            for img, negs in picked["random"].items() for o in negs]
    assert np.mean(shares) > np.mean(rand)


def test_benchmark_files_score_perfectly_with_their_own_answers(world, tmp_path):
    """The held-out files are in the scorers' standard formats: ground truth as answers scores 100 %."""
    from emma_mamba.eval.scorers import score

    out, _ = world
    ho = out / "heldout"
    pope = [json.loads(l) for l in (ho / "pope_adversarial.jsonl").read_text().splitlines()]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps({"question_id": r["question_id"],
                                                             "text": r["label"].capitalize() + "."}) + "\n"
                                                 for r in pope))
    assert score("pope", tmp_path / "pope.jsonl", ho / "pope_adversarial.jsonl")["accuracy"] == 1.0
    anns = json.loads((ho / "vqav2_annotations.json").read_text())["annotations"]
    (tmp_path / "vqa.json").write_text(json.dumps([{"question_id": a["question_id"],
                                                    "answer": a["multiple_choice_answer"]} for a in anns]))
    assert score("vqav2", tmp_path / "vqa.json", ho / "vqav2_annotations.json")["accuracy"] == 1.0
    gqa = json.loads((ho / "gqa_questions.json").read_text())
    (tmp_path / "gqa.json").write_text(json.dumps([{"questionId": k, "prediction": v["answer"]}
                                                   for k, v in gqa.items()]))
    assert score("gqa", tmp_path / "gqa.json", ho / "gqa_questions.json")["accuracy"] == 1.0
    (tmp_path / "mme").mkdir()
    for p in (ho / "mme").glob("*.txt"):
        (tmp_path / "mme" / p.name).write_text("".join(l + "\t" + l.split("\t")[2] + "\n"
                                                       for l in p.read_text().splitlines()))
    m = score("mme", tmp_path / "mme", ho / "mme")
    assert all(c["score"] == 200.0 for c in m["categories"].values())


def test_blind_baseline_is_scoreable_and_weak(world, tmp_path):
    """The question-only baseline runs through every scorer and stays far from a perfect score."""
    from emma_mamba.eval.scorers import score

    out, _ = world
    files = sw.blind_baseline(out, tmp_path / "blind")
    assert set(files) == {"vqav2", "gqa", "mme", "pope_random", "pope_popular", "pope_adversarial"}
    m = {k: score("pope" if k.startswith("pope") else k, a, b) for k, (a, b) in files.items()}
    assert m["vqav2"]["accuracy"] < 0.6 and m["gqa"]["accuracy"] < 0.7
    assert all(m[f"pope_{v}"]["accuracy"] < 0.7 for v in sw.POPE_VARIANTS)
    assert m["mme"]["total"] < 0.7 * 200 * len(m["mme"]["categories"])


def test_single_turn_conversations_are_never_empty(tmp_path):
    # max_turns 1 asks one question per image; in one-shape scenes many generators (relations, "both") have
    # nothing to ask, and 20 random picks could all miss: seed 0 wrote an empty conversation for image 266
    from emma_mamba.data.shapes import ShapesConfig, generate

    generate(ShapesConfig(seed=0, n_train=300, n_heldout=2, image_size=96, max_turns=1), tmp_path)
    recs = json.loads((tmp_path / "train" / "stage2_instruct.json").read_text())
    assert len(recs) == 300
    for r in recs:
        conv = r["conversations"]
        assert len(conv) >= 2 and conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n"), r["id"]


def test_question_mix_weights_the_training_questions():
    # question_mix reweights the stage-2 generators: counted over the asker's own QA categories
    from collections import Counter
    import random as _random

    from emma_mamba.data.shapes import ShapesConfig, _Asker, sample_scenes

    cfg = ShapesConfig(seed=3, n_train=300, n_heldout=2, image_size=96).validate()
    scenes, _ = sample_scenes(cfg)
    kinds = _Asker.VQA_KINDS + _Asker.GQA_KINDS

    def categories(weights, seed=0):
        c = Counter()
        for i, sc in enumerate(scenes):
            for qa in _Asker(sc, cfg, _random.Random(f"{seed}/{i}")).ask(kinds, 3, weights=weights):
                c[qa.category] += 1
        return c

    uniform, heavy = categories({}), categories({"existence": 9})
    share = lambda c: c["existence"] / sum(c.values())  # noqa: E731
    assert share(uniform) < 0.15 < 0.4 < share(heavy)  # 1/10 of the draws vs 9/18
    off = categories({"relation": 0, "relation_query": 0, "compare": 0, "logical": 0})
    assert off["compare"] == off["logical"] == 0 and set(off) <= {"color", "shape", "size", "count", "detail",
                                                                "existence"}
    assert categories({k: 2.5 for k in kinds}) == uniform  # equal weights are the uniform draw, same stream

    for bad, match in (({"existance": 2}, "unknown question generator 'existance'"),
                       ({"count": -1}, "must be a number >= 0"),
                       ({k: 0 for k in kinds}, "every generator has weight 0")):
        with pytest.raises(ValueError, match=match):
            ShapesConfig(question_mix=bad).validate()
