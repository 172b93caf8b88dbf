"""RefCOCO grounding (emma_mamba.eval.refcoco): box parsing, IoU and the two coordinate frames by hand, the refer
release's files (a pickle and instances.json) and plain JSON records, Acc@0.5 of known replies by hand, the
runner's records, `emma-mamba eval`/`score`, errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from emma_mamba.eval.refcoco import GROUNDING_PROMPT, iou, parse_box, to_frame
from emma_mamba.eval.runner import ScoreInputError, evaluate, read_questions
from emma_mamba.eval.scorers import score


def test_boxes_frames_and_iou_by_hand():
    assert parse_box("[0.1, 0.2, 0.5, 0.6]") == [0.1, 0.2, 0.5, 0.6]
    assert parse_box("The box is [0, 0.25,1.0 , 0.75].") == [0.0, 0.25, 1.0, 0.75]
    assert parse_box("[ 0 . 44 , 0 . 22 , 0 . 68 , 0 . 40 ]") == [0.44, 0.22, 0.68, 0.40]  # a word tokenizer's
    assert parse_box("[0.5, 0.2, 0.1, 0.6]") is None  # x1 > x2
    assert parse_box("[0.1, 0.2, 1.5, 0.6]") is None and parse_box("[1, 2, 3]") is None and parse_box("no") is None
    # whole=True: the reply must be the box alone (Prismatic's literal_eval of the reply)
    assert parse_box(" [0, 0.25,1.0 , 0.75]\n", whole=True) == [0.0, 0.25, 1.0, 0.75]
    assert parse_box("[ 0 . 44 , 0 . 22 , 0 . 68 , 0 . 40 ]", whole=True) == [0.44, 0.22, 0.68, 0.40]
    assert parse_box("The box is [0, 0.25,1.0 , 0.75].", whole=True) is None
    assert parse_box("[0.1, 0.2, 0.5, 0.6].", whole=True) is None
    # a 200 x 100 image, the box x 50..150, y 25..75 (pixels [x, y, w, h] = [50, 25, 100, 50])
    assert to_frame([50, 25, 100, 50], 200, 100, "image") == [0.25, 0.25, 0.75, 0.75]
    # centred in a 200 x 200 square: y shifted by 50
    assert to_frame([50, 25, 100, 50], 200, 100, "square") == [0.25, 0.375, 0.75, 0.625]
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert parse_box("[0.1, 0.2, 0.5, 0.6,]", whole=True) == [0.1, 0.2, 0.5, 0.6]  # literal_eval reads it


@pytest.mark.parametrize("size", [(139, 182), (182, 139), (100, 101), (64, 48)])
def test_square_frame_is_where_the_letterbox_pastes_the_box(size):
    """The square frame's box must be where the letterboxed image (pad_to_square, LLaVA-1.5's expand2square) has
    it: the paste is at the whole pixel (side - w) // 2; the frame used (side - w) / 2, half a pixel off for an odd
    padding (2-decimal truths moved by 0.01). Oracle: the box's pixels found in the padded image."""
    import numpy as np
    from PIL import Image

    from emma_mamba.models.vision import pad_to_square

    w, h = size
    x, y, bw, bh = 13, 17, 29, 23
    a = np.zeros((h, w, 3), np.uint8)
    a[y:y + bh, x:x + bw] = 255
    sq = np.asarray(pad_to_square(Image.fromarray(a), (0, 0, 0)))
    ys, xs = np.nonzero(sq[..., 0])
    side = sq.shape[0]
    want = [xs.min() / side, ys.min() / side, (xs.max() + 1) / side, (ys.max() + 1) / side]
    assert to_frame([x, y, bw, bh], w, h, "square") == pytest.approx(want, abs=1e-12)
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0 and iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0


def _refer(tmp_path: Path) -> tuple[Path, Path]:
    """A refer-layout release: refs(unc).p beside instances.json, two COCO-named images (200 x 100, 100 x 100)."""
    imgs = tmp_path / "train2014"
    imgs.mkdir()
    Image.new("RGB", (200, 100), "white").save(imgs / "COCO_train2014_000000000001.jpg")
    Image.new("RGB", (100, 100), "white").save(imgs / "COCO_train2014_000000000002.jpg")
    ann = tmp_path / "refcoco"
    ann.mkdir()
    (ann / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 200, "height": 100},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 100, "height": 100}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [50, 25, 100, 50]},
                        {"id": 20, "image_id": 2, "bbox": [0, 0, 50, 50]}]}))
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val",
             "sentences": [{"sent_id": 0, "sent": "the middle box"}, {"sent_id": 1, "sent": "centre thing"}]},
            {"ref_id": 1, "ann_id": 20, "image_id": 2, "split": "val", "sentences": [{"sent_id": 2, "sent": "top left"}]},
            {"ref_id": 2, "ann_id": 20, "image_id": 2, "split": "testA", "sentences": [{"sent_id": 3, "sent": "corner"}]}]
    with (ann / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    return ann / "refs(unc).p", imgs


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: pickle.load calls os.system(...) (here: a harmless touch)
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_refs_pickle_naming_code_is_refused_without_running_it(tmp_path):
    """pickle.load runs any callable a file names: a downloaded refs(unc).p could run code when scored. Plain
    data (what refer's files hold) loads; a pickle naming a function is a clear error, and nothing ran."""
    refs, imgs = _refer(tmp_path)
    assert len(read_questions("refcoco", refs, imgs)) == 3  # the real layout: plain lists, dicts, str, int
    p = _Payload()
    p.marker = tmp_path / "ran"
    with refs.open("wb") as f:
        pickle.dump([p], f, protocol=2)
    with pytest.raises(ScoreInputError, match=r"not a readable refer refs pickle .*it names posix\.system"):
        read_questions("refcoco", refs, imgs)
    assert not p.marker.exists()
    with refs.open("wb") as f:
        pickle.dump([1, 2], f, protocol=2)  # data, but not refs: said, not an AttributeError traceback
    with pytest.raises(ScoreInputError, match=r"expected a list of refs \(objects\)"):
        read_questions("refcoco", refs, imgs)


def test_refer_release_known_replies_by_hand(tmp_path):
    refs, imgs = _refer(tmp_path)
    qs = read_questions("refcoco", refs, imgs)  # split val by default
    assert [q.qid for q in qs] == ["0/0", "0/1", "1/2"]
    replies = {"0/0": "[0.25, 0.25, 0.75, 0.75]",  # exact: IoU 1
               "0/1": "[0.25, 0.25, 0.75, 0.5]",   # half the box: IoU 0.5 -> a hit
               "1/2": "I think it is at the top"}  # invalid
    seen = {}

    def fn(batch, prompts):
        seen.update({q.qid: p for q, p in zip(batch, prompts)})
        return [replies[q.qid] for q in batch]

    rep = evaluate(None, "refcoco", refs, imgs, tmp_path / "ev", progress=False, answer_fn=fn)
    m = rep["metrics"]
    assert (m["n"], m["split"], m["n_invalid_boxes"]) == (3, "val", 1)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["mean_iou"] == pytest.approx((1 + 0.5) / 3)
    assert seen["1/2"] == f"{GROUNDING_PROMPT} top left" and rep["max_new_tokens"] == 32
    recs = [json.loads(x) for x in (tmp_path / "ev" / "answers.jsonl").read_text().splitlines()]
    assert recs[0]["box_frame"] == "image" and recs[0]["image_size"] == [200, 100]
    assert score("refcoco", tmp_path / "ev" / "answers.jsonl", refs) == m
    # the square frame: the same replies now miss the first box (it sits at y 0.375..0.625 there)
    m2 = evaluate(None, "refcoco", refs, imgs, tmp_path / "sq", box_frame="square", progress=False,
                  answer_fn=fn)["metrics"]
    # the truth [0.25, 0.375, 0.75, 0.625] rounded to 2 decimals as Prismatic does: [0.25, 0.38, 0.75, 0.62]
    # (round half to even). 0/0: [0.25,0.25,0.75,0.75] vs it: 0.5 * 0.24 / 0.25 = IoU 0.48 -> a miss (0.5 exactly,
    # a hit, against the unrounded box); 0/1: [.25,.25,.75,.5]: overlap .5 * .12 = 0.06, union 0.125 + 0.12 - 0.06
    # -> IoU 0.32: a miss
    assert m2["accuracy"] == 0.0 and m2["mean_iou"] == pytest.approx((0.48 + 0.06 / 0.185) / 3)
    # testA; answers spanning splits refused
    rep = evaluate(None, "refcoco", refs, imgs, tmp_path / "ta", split="testA", progress=False,
                   answer_fn=lambda b, p: ["[0, 0, 0.5, 0.5]"] * len(b))
    assert (rep["metrics"]["split"], rep["metrics"]["n"], rep["metrics"]["accuracy"]) == ("testA", 1, 1.0)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"question_id": "0/0", "text": "x"}) + "\n" + json.dumps({"question_id": "2/3",
                                                                                        "text": "x"}) + "\n")
    with pytest.raises(ScoreInputError, match="answers span the splits"):
        score("refcoco", mixed, refs)
    with pytest.raises(ScoreInputError, match=r"no split 'test'; the file has \['testA', 'val'\]"):
        read_questions("refcoco", refs, imgs, split="test")
    (tmp_path / "bad.p").write_bytes(b"not a pickle")
    (tmp_path / "instances.json").write_text("{}")
    with pytest.raises(ScoreInputError, match="bad.p: not a readable refer refs pickle"):
        read_questions("refcoco", tmp_path / "bad.p", imgs)


def test_a_box_amid_text_is_invalid_as_prismatic_reads_it(tmp_path):
    """Prismatic's scorer takes a reply only when it is the box alone: "The box is [...]." is invalid there (and in
    `accuracy`), a hit in `accuracy_any_box`; the summary line says how many such replies there were."""
    from emma_mamba.eval.scorers import summary

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (64, 48), "white").save(imgs / "a.png")
    q = tmp_path / "ref.json"  # [16, 12, 32, 24] of 64 x 48: [0.25, 0.25, 0.75, 0.75]
    q.write_text(json.dumps([{"image": "a.png", "sentence": f"s{i}", "bbox": [16, 12, 32, 24]} for i in range(3)]))
    replies = ["[0.25, 0.25, 0.75, 0.75]", "The box is [0.25, 0.25, 0.75, 0.75].", "no idea"]
    m = evaluate(None, "refcoco", q, imgs, tmp_path / "ev", progress=False,
                 answer_fn=lambda b, p: [replies[int(x.qid)] for x in b])["metrics"]
    assert (m["accuracy"], m["n_invalid_boxes"]) == (pytest.approx(1 / 3), 2)
    assert (m["accuracy_any_box"], m["n_invalid_any_box"]) == (pytest.approx(2 / 3), 1)
    assert m["mean_iou"] == pytest.approx(1 / 3)
    assert "invalid boxes 2 (1 of them a box amid other text; reading those too: Acc 66.67)" in summary("refcoco", m)


def test_json_records_and_a_letterbox_checkpoint_through_the_cli(tmp_path, capsys):
    """Plain JSON records through `emma-mamba eval --task refcoco` with a random tiny checkpoint trained (so its
    config says) on letterboxed images: the square frame is chosen, every record carries it and the image size,
    32 new tokens at most; `score` agrees with the run."""
    import torch

    from emma_mamba.cli import main
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (64, 48), "white").save(imgs / "a.png")
    q = tmp_path / "ref.json"
    q.write_text(json.dumps([{"image": "a.png", "sentence": "the left half", "bbox": [0, 0, 32, 48]},
                             {"question_id": "x", "image": "a.png", "expression": "all", "bbox": [0, 0, 64, 48]}]))
    cfg = get_preset("tiny")
    cfg.vision.image_resize = "letterbox"
    torch.manual_seed(0)
    EmmaMamba(cfg, for_training=False).save(tmp_path / "ck")
    out = tmp_path / "ev"
    assert main(["eval", "--task", "refcoco", "--questions", str(q), "--images", str(imgs), "--checkpoint",
                 str(tmp_path / "ck"), "--out", str(out), "--no-progress"]) == 0
    assert "RefCOCO (all)  n=2" in capsys.readouterr().out
    recs = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in recs] == [0, "x"]
    assert all(r["box_frame"] == "square" and r["image_size"] == [64, 48] for r in recs)
    report = json.loads((out / "metrics.json").read_text())
    assert report["max_new_tokens"] == 32 and report["metrics"] == score("refcoco", out / "answers.jsonl", q)
    q.write_text(json.dumps([{"image": "a.png", "sentence": "s", "bbox": [0, 0, 0, 5]}]))
    with pytest.raises(ScoreInputError, match=r"record 1: bbox must be \[x, y, width, height\]"):
        read_questions("refcoco", q, imgs)


def _ocid(tmp_path: Path) -> tuple[Path, Path]:
    """An OCID-Ref release: {split}_expressions.json keyed by id, boxes as "[x1, y1, x2, y2]" strings in pixels,
    scenes under the OCID root (here 64 x 48 images, so the size comes from the image, not a constant)."""
    root = tmp_path / "OCID-dataset"
    scene = root / "ARID20" / "table" / "top" / "seq01" / "rgb"
    scene.mkdir(parents=True)
    Image.new("RGB", (64, 48), "white").save(scene / "result_2018-08-20-11-01-17.png")
    rel = "ARID20/table/top/seq01/rgb/result_2018-08-20-11-01-17.png"
    # one sentence per take: clutter minimum (0, 9), medium (10, 16), maximum (17, 20)
    doc = {str(100 + t): {"scene_path": rel, "sentence": f"the object of take {t}", "bbox": "[16, 12, 48, 36]",
                          "take_id": t, "sub_dataset": "ARID20", "class": "bowl"} for t in (0, 9, 10, 16, 17, 20)}
    ann = tmp_path / "val_expressions.json"
    ann.write_text(json.dumps(doc))
    return ann, root


def test_ocidref_release_known_replies_by_hand(tmp_path):
    """The box [16, 12, 48, 36] of a 64 x 48 image is [0.25, 0.25, 0.75, 0.75] normalised. Replies: exact (IoU 1),
    [0.25, 0.25, 0.5, 0.5] (a quarter: IoU 0.25, a hit at OCID-Ref's 0.25, a miss at RefCOCO's 0.5), [0, 0, 0.25,
    0.25] (touching a corner: IoU 0), an invalid reply; accuracy overall and per clutter level by hand."""
    ann, root = _ocid(tmp_path)
    qs = read_questions("ocidref", ann, root)
    assert [q.qid for q in qs] == ["100", "109", "110", "116", "117", "120"]
    exact, quarter, outside = "[0.25, 0.25, 0.75, 0.75]", "[0.25, 0.25, 0.5, 0.5]", "[0, 0, 0.25, 0.25]"
    replies = {"100": exact, "109": quarter, "110": outside, "116": exact, "117": "a bowl", "120": quarter}
    seen = {}

    def fn(batch, prompts):
        seen.update({q.qid: p for q, p in zip(batch, prompts)})
        return [replies[q.qid] for q in batch]

    rep = evaluate(None, "ocidref", ann, root, tmp_path / "ev", progress=False, answer_fn=fn)
    m = rep["metrics"]
    assert (m["n"], m["iou_threshold"], m["n_invalid_boxes"], rep["max_new_tokens"]) == (6, 0.25, 1, 32)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["mean_iou"] == pytest.approx((1 + 0.25 + 0 + 1 + 0 + 0.25) / 6)
    assert m["by_clutter"] == {"minimum": {"n": 2, "accuracy": 1.0}, "medium": {"n": 2, "accuracy": 0.5},
                               "maximum": {"n": 2, "accuracy": 0.5}}
    assert seen["110"] == f"{GROUNDING_PROMPT} the object of take 10"
    recs = [json.loads(x) for x in (tmp_path / "ev" / "answers.jsonl").read_text().splitlines()]
    assert all(r["image_size"] == [64, 48] and r["box_frame"] == "image" for r in recs)
    assert score("ocidref", tmp_path / "ev" / "answers.jsonl", ann) == m


@pytest.mark.parametrize("entry,match", [
    ({"scene_path": "a.png", "sentence": "s", "bbox": "[5, 5, 5, 9]", "take_id": 0}, "bbox must be"),
    ({"scene_path": "a.png", "sentence": "s", "bbox": "[1, 2, 3", "take_id": 0}, "bbox must be"),
    ({"scene_path": "a.png", "sentence": "s", "bbox": "[1, 2, 3, 4]", "take_id": 21}, "take_id must be"),
    ({"scene_path": "a.png", "bbox": "[1, 2, 3, 4]", "take_id": 3}, "sentence"),
])
def test_ocidref_errors_name_the_expression(tmp_path, entry, match):
    ann = tmp_path / "val_expressions.json"
    ann.write_text(json.dumps({"7": entry}))
    with pytest.raises(ScoreInputError, match=f"expression '7'.*{match}"):
        read_questions("ocidref", ann, tmp_path)
    ann.write_text(json.dumps([entry]))
    with pytest.raises(ScoreInputError, match="expected OCID-Ref's object"):
        read_questions("ocidref", ann, tmp_path)
