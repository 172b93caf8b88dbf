"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression grounding: the model answers a box, scored by Acc@0.5 IoU.

Questions, one per referring sentence, from either

* the ``refer`` release (Yu et al. 2016; the files Prismatic's and most MLLM evaluations read): ``refs(unc).p``
  (RefCOCO, RefCOCO+) or ``refs(umd).p`` (RefCOCOg) with ``instances.json`` beside it, ``split`` one of the file's
  (``val``, ``testA``, ``testB``; ``val`` / ``test`` for RefCOCOg); question id ``"<ref_id>/<sent_id>"``; images
  are COCO train2014 files named by ``instances.json``. The ``.p`` file is a Python pickle, read as plain data
  only (a pickle naming any class or function, which ``pickle.load`` would call, is refused: a downloaded file
  cannot run code);
* or a JSON list / JSONL of records ``{question_id?, image, sentence, bbox: [x, y, w, h] (pixels), width?,
  height?}`` (question id: the record's 0-based index when absent).

Prompt: LLaVA-1.5's grounding instruction from its training mixture, ``Please provide the bounding box coordinate
of the region this sentence describes: <sentence>``. The reply, as Prismatic's scorer reads it, must be the box
``[x1, y1, x2, y2]`` and nothing else: four numbers in [0, 1] with x1 < x2 and y1 < y2 (anything else is an
invalid answer and counts as wrong; ``accuracy_any_box`` also reports the accuracy with the reply's first such
box wherever it stands, "The box is [...]." included), in one of two frames:

* ``image``: normalised by the image's width and height (Prismatic's convention, a model trained on squashed
  images);
* ``square``: normalised by the side of the square the image is centred in (LLaVA-1.5's, whose training images
  are padded to a square: ``vision.image_resize: letterbox``).

Metric: the fraction of sentences whose box overlaps the ground-truth box at IoU >= 0.5, mean IoU, invalid
answers counted. The ground-truth box is normalised and rounded to 2 decimals first, as Prismatic's harness does
(the precision of the boxes LLaVA-1.5's training answers give).

OCID-Ref (Wang et al. 2021; referring expressions in the cluttered table-top scenes of OCID, the robotics set of
Prismatic's grounding suite, which Cobra and EMMA-Mamba report) is read and scored the same way from its release's
``{split}_expressions.json``: an object of ``{id: {scene_path, sentence, bbox: "[x1, y1, x2, y2]" (pixels),
take_id, ...}}``, images under the OCID root by ``scene_path``. Its metric is Acc@0.25 IoU (the OCID-Ref paper's),
overall and per clutter level of the scene: ``take_id`` 0-9 free-standing objects (minimum clutter), 10-16 touching
(medium), 17-20 stacked (maximum).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from emma_mamba.data.shapes import GROUNDING_PROMPT  # LLaVA-1.5's, as ShapesWorld's grounding turns write it
from emma_mamba.eval._io import ScoreInputError, label, load_json, load_records, match_answers, require

__all__ = ["GROUNDING_PROMPT", "FRAMES", "CLUTTER", "refcoco_records", "ocidref_records", "refcoco_prompt",
           "parse_box", "to_frame", "iou", "score_refcoco", "score_ocidref"]

FRAMES = ("image", "square")
CLUTTER = ("minimum", "medium", "maximum")
"""OCID-Ref's clutter levels, by a scene's take_id: 0-9, 10-16, 17-20."""
# a trailing comma is Python's literal syntax too (Prismatic's literal_eval reads "[0.1, 0.2, 0.5, 0.6,]")
_BOX = re.compile(r"\[\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,\s*([-+\d.eE]+)\s*,?\s*\]")


def refcoco_prompt(sentence: str) -> str:
    return f"{GROUNDING_PROMPT} {sentence.strip()}"


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads pickles of plain data only (lists, dicts, strings, numbers: what refer's refs files hold); any class or
    function a pickle names is refused, so a downloaded file cannot run code when loaded (pickle.load runs whatever
    callable a file names)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}: a refs file holds plain data only (lists, dicts, "
                                     f"strings, numbers), and a pickle naming code is not loaded")


def _refer(path: Path, split: str | None) -> list[tuple[str, dict]]:
    inst = path.parent / "instances.json"
    if not inst.is_file():
        raise ScoreInputError(f"{path}: the refer release keeps instances.json beside the refs file; not found at {inst}")
    try:
        with path.open("rb") as f:
            refs = _DataOnlyUnpickler(f, encoding="latin1").load()  # written by Python 2
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input file
        raise ScoreInputError(f"{path}: not a readable refer refs pickle ({type(e).__name__}: {e})") from None
    doc = load_json(inst, "refer instances")
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs) or not isinstance(doc, dict):
        raise ScoreInputError(f"{path}: expected a list of refs (objects) and {inst} an object with 'images' and "
                              f"'annotations'")
    images = {im["id"]: im for im in doc.get("images", [])}
    anns = {a["id"]: a for a in doc.get("annotations", [])}
    splits = sorted({str(r.get("split")) for r in refs})
    if split is not None and split not in splits:
        raise ScoreInputError(f"{path}: no split {split!r}; the file has {splits}")
    out = []
    for r in refs:
        if split is not None and r.get("split") != split:
            continue
        where = f"ref {r.get('ref_id')!r}"
        ann, im = anns.get(r.get("ann_id")), images.get(r.get("image_id"))
        if ann is None or im is None:
            raise ScoreInputError(f"{path}: {where}: its annotation {r.get('ann_id')!r} or image "
                                  f"{r.get('image_id')!r} is not in {inst}")
        for s in r.get("sentences", []):
            out.append((f"{where} sentence {s.get('sent_id')!r}",
                        {"question_id": f"{r['ref_id']}/{s['sent_id']}", "image": im["file_name"],
                         "sentence": s["sent"], "bbox": [float(v) for v in ann["bbox"]],
                         "width": im["width"], "height": im["height"], "split": r.get("split")}))
    return out


def refcoco_records(path: str | Path, split: str | None = "val") -> list[tuple[str, dict]]:
    """The sentences to ground, each ``{question_id, image, sentence, bbox [x, y, w, h], width?, height?,
    split}``: of the refer file's ``split`` (None: every split), or every record of a JSON file (split None)."""
    p = Path(path)
    if not p.is_file():
        raise ScoreInputError(f"RefCOCO questions {p} does not exist")
    if p.suffix == ".p":
        out = _refer(p, split)
    else:
        out = []
        for i, (loc, rec) in enumerate(load_records(p, "RefCOCO")):
            box = require(rec, ("bbox",), p, loc, "RefCOCO")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                    and box[2] > 0 and box[3] > 0):
                raise ScoreInputError(f"{p}: {loc}: bbox must be [x, y, width, height] in pixels with a positive "
                                      f"size, got {box!r}")
            for k in ("width", "height"):
                if rec.get(k) is not None and not (isinstance(rec[k], (int, float)) and not isinstance(rec[k], bool)
                                                   and rec[k] > 0):
                    raise ScoreInputError(f"{p}: {loc}: {k} must be a positive number of pixels, got {rec[k]!r}")
            out.append((loc, {"question_id": label(rec.get("question_id", i), p, loc, "'question_id'"),
                              "image": str(require(rec, ("image",), p, loc, "RefCOCO")),
                              "sentence": str(require(rec, ("sentence", "expression", "sent"), p, loc, "RefCOCO")),
                              "bbox": [float(v) for v in box], "width": rec.get("width"),
                              "height": rec.get("height"), "split": None}))
    if not out:
        raise ScoreInputError(f"{p}: no sentences to ground (split {split})")
    ids = [r["question_id"] for _, r in out]
    if len(set(ids)) != len(ids):
        raise ScoreInputError(f"{p}: question ids repeat (each sentence needs its own)")
    return out


def _clutter(take_id) -> str:
    return CLUTTER[0] if take_id <= 9 else CLUTTER[1] if take_id <= 16 else CLUTTER[2]


def ocidref_records(path: str | Path) -> list[tuple[str, dict]]:
    """The sentences of an OCID-Ref ``{split}_expressions.json``, each ``{question_id, image (scene_path),
    sentence, bbox [x, y, w, h] (pixels), width None, height None, split None, clutter}``."""
    p = Path(path)
    if not p.is_file():
        raise ScoreInputError(f"OCID-Ref expressions {p} does not exist")
    doc = load_json(p, "OCID-Ref expressions")
    if not isinstance(doc, dict) or not doc:
        raise ScoreInputError(f"{p}: expected OCID-Ref's object of {{id: {{scene_path, sentence, bbox, take_id}}}}, "
                              f"got {type(doc).__name__}{' (empty)' if not doc else ''}")
    out = []
    for key, rec in doc.items():
        loc = f"expression {key!r}"
        if not isinstance(rec, dict):
            raise ScoreInputError(f"{p}: {loc}: expected an object, got {type(rec).__name__}")
        box = require(rec, ("bbox",), p, loc, "OCID-Ref")
        if isinstance(box, str):
            try:
                box = json.loads(box)
            except json.JSONDecodeError:
                box = None
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and box[0] < box[2] and box[1] < box[3]):
            raise ScoreInputError(f"{p}: {loc}: bbox must be \"[x1, y1, x2, y2]\" in pixels with x1 < x2 and "
                                  f"y1 < y2, got {rec.get('bbox')!r}")
        take = require(rec, ("take_id",), p, loc, "OCID-Ref")
        if not isinstance(take, int) or not 0 <= take <= 20:
            raise ScoreInputError(f"{p}: {loc}: take_id must be an integer in [0, 20], got {take!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        out.append((loc, {"question_id": str(key), "image": str(require(rec, ("scene_path",), p, loc, "OCID-Ref")),
                          "sentence": str(require(rec, ("sentence",), p, loc, "OCID-Ref")),
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "width": None, "height": None, "split": None,
                          "clutter": _clutter(take)}))
    return out


_SPACED_DECIMAL = re.compile(r"(\d)\s*\.\s*(\d)")


def parse_box(reply: str, whole: bool = False) -> list[float] | None:
    """The reply's first ``[x1, y1, x2, y2]`` with coordinates in [0, 1], x1 < x2 and y1 < y2; else None. With
    ``whole``, only a reply that is that box alone, surrounding whitespace aside (Prismatic's ``parse_bbox``, a
    ``literal_eval`` of the reply). Numbers spelt with spaces around the point (``0 . 44``: a word-level
    tokenizer's decoding) are read too."""
    text = _SPACED_DECIMAL.sub(r"\1.\2", reply)
    m = _BOX.fullmatch(text.strip()) if whole else _BOX.search(text)
    if m is None:
        return None
    try:
        box = [float(v) for v in m.groups()]
    except ValueError:
        return None
    if not all(0.0 <= v <= 1.0 for v in box) or not (box[0] < box[2] and box[1] < box[3]):
        return None
    return box


def to_frame(bbox_xywh: list[float], width: float, height: float, frame: str) -> list[float]:
    """A pixel box [x, y, w, h] of a ``width`` x ``height`` image as normalised [x1, y1, x2, y2] in ``frame``."""
    x, y, w, h = bbox_xywh
    if frame == "image":
        return [x / width, y / height, (x + w) / width, (y + h) / height]
    if frame == "square":  # pasted into a side x side square as LLaVA-1.5's expand2square (and our letterbox) does:
        side = max(width, height)  # at the whole-pixel offset (side - w) // 2
        ox, oy = (side - width) // 2, (side - height) // 2
        return [(x + ox) / side, (y + oy) / side, (x + w + ox) / side, (y + h + oy) / side]
    raise ValueError(f"box frame must be one of {FRAMES}, got {frame!r}")


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_refcoco(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Acc@0.5 IoU and mean IoU of ``answers`` (records ``{question_id, text, box_frame, image_size}`` as the
    runner writes them) against the sentences of ``annotations`` in the answers' split (answers spanning splits
    are refused). Each answer's ``box_frame`` (default ``image``) and ``image_size`` ([width, height]; default the
    annotation's) place the ground-truth box."""
    return _score_boxes(answers, annotations, refcoco_records(annotations, None), 0.5, allow_missing)


def score_ocidref(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Acc@0.25 IoU (OCID-Ref's metric) and mean IoU, overall and per clutter level (``by_clutter``), of
    ``answers`` against an OCID-Ref expressions file, as :func:`score_refcoco` reads them."""
    return _score_boxes(answers, annotations, ocidref_records(annotations), 0.25, allow_missing, group="clutter")


def _score_boxes(answers, annotations, records, threshold: float, allow_missing: bool, group: str | None = None):
    every = {r["question_id"]: r for _, r in records}
    rows, meta = [], {}
    for loc, rec in load_records(answers, "grounding answers"):
        qid = require(rec, ("question_id",), answers, loc, "grounding answer")
        rows.append((loc, qid, require(rec, ("text", "answer", "prediction"), answers, loc, "grounding answer")))
        frame = rec.get("box_frame", "image")
        if frame not in FRAMES:
            raise ScoreInputError(f"{answers}: {loc}: box_frame must be one of {list(FRAMES)}, got {frame!r}")
        size = rec.get("image_size")
        if size is not None and not (isinstance(size, list) and len(size) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ScoreInputError(f"{answers}: {loc}: image_size must be [width, height] in pixels, got {size!r}")
        meta[qid] = (frame, size)
    splits = {every[q]["split"] for _, q, _ in rows if q in every}
    if len(splits) > 1:
        raise ScoreInputError(f"{answers}: answers span the splits {sorted(map(str, splits))}; score one at a time")
    split = splits.pop() if splits else None
    gold = {q: r for q, r in every.items() if r["split"] == split}
    got = match_answers(rows, list(gold), answers, annotations, allow_missing)
    if not got:
        raise ScoreInputError(f"{answers}: no answers to score")
    ious, ious_any, invalid, invalid_any = {}, {}, 0, 0
    for qid, text in got.items():
        g = gold[qid]
        frame, size = meta[qid]
        w, h = size if size else (g["width"], g["height"])
        if not w or not h:
            raise ScoreInputError(f"{answers}: question {qid!r}: no image size (image_size in the answer, or "
                                  f"width/height in {annotations})")
        truth = [round(c, 2) for c in to_frame(g["bbox"], w, h, frame)]  # Prismatic's 2-decimal ground truth
        box, any_box = parse_box(text, whole=True), parse_box(text)
        invalid += box is None
        invalid_any += any_box is None
        ious[qid] = 0.0 if box is None else iou(box, truth)
        ious_any[qid] = 0.0 if any_box is None else iou(any_box, truth)
    n = len(ious)
    out = {"n": n, "split": split or "all", "iou_threshold": threshold,
           "accuracy": sum(v >= threshold for v in ious.values()) / n, "mean_iou": sum(ious.values()) / n,
           "n_invalid_boxes": invalid,
           "accuracy_any_box": sum(v >= threshold for v in ious_any.values()) / n,
           "n_invalid_any_box": invalid_any, "n_missing": len(gold) - len(got)}
    if group is not None:
        levels = {}
        for qid, v in ious.items():
            levels.setdefault(gold[qid][group], []).append(v)
        order = [k for k in CLUTTER if k in levels] if group == "clutter" else sorted(levels)
        out[f"by_{group}"] = {k: {"n": len(levels[k]), "accuracy": sum(x >= threshold for x in levels[k])
                                  / len(levels[k])} for k in order}
    return out
