"""SEED-Bench (Li et al. 2023), image part: four-way multiple choice, accuracy overall and per question type.

File: the official ``SEED-Bench.json``: ``{"questions": [{"question_id", "question", "choice_a" .. "choice_d",
"answer": "A".."D", "data_id": "<image file>", "data_type": "image" | "video", "question_type_id"}],
"question_type": {"Scene Understanding": 1, ...}}``. Only ``data_type == "image"`` questions are read (the
video dimensions need frames, not one image); images are ``data_id`` under the images folder.

Prompt (LLaVA-1.5's SEED evaluation): the question, the lettered choices, then "Answer with the option's letter
from the given choices directly."; replies are read by :func:`emma_mamba.eval.mmbench.parse_choice`. LLaVA-1.5's
own scorer (``convert_seed_for_submission.py``) credits only a reply equal to the letter, so a reply such as "(A)",
"A. a dog" or the option's text scores here and not there; on bare-letter replies the two agree.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, label, load_json, load_records, match_answers, require
from emma_mamba.eval.mmbench import LETTERS, parse_choice

log = logging.getLogger(__name__)

__all__ = ["seed_questions", "seed_prompt", "score_seed"]


def seed_questions(path: str | Path) -> tuple[list[tuple[str, dict]], dict[int, str]]:
    """(location, record) of every image question of a SEED-Bench JSON, and question type id -> name."""
    doc = load_json(path, "SEED-Bench")
    if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
        raise ScoreInputError(f"{path}: expected a JSON object with a 'questions' list (SEED-Bench.json)")
    qtypes = doc.get("question_type") or {}
    if not isinstance(qtypes, dict):
        raise ScoreInputError(f"{path}: 'question_type' must be an object {{name: id}} (SEED-Bench.json), got "
                              f"{type(qtypes).__name__}")
    types = {}
    for name, tid in qtypes.items():
        types[label(tid, path, f"question_type[{name!r}]", "the type id")] = name
    out = []
    skipped = 0  # the video dimensions' questions (they need frames, not one image)
    for i, rec in enumerate(doc["questions"]):
        loc = f"questions[{i}]"
        if not isinstance(rec, dict):
            raise ScoreInputError(f"{path}: {loc}: expected a JSON object")
        if rec.get("data_type", "image") != "image":
            skipped += 1
            continue
        for k in ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "data_id"):
            v = require(rec, (k,), path, loc, "SEED-Bench question")
            if k != "question_id" and not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ScoreInputError(f"{path}: {loc}: {k!r} must be text, got {v!r}")
        if "answer" in rec and rec["answer"] not in LETTERS[:4]:
            raise ScoreInputError(f"{path}: {loc}: answer {rec['answer']!r} is not one of A, B, C, D")
        label(rec.get("question_type_id"), path, loc, "'question_type_id'")
        out.append((loc, rec))
    if not out:
        raise ScoreInputError(f"{path}: no image questions (data_type 'image')")
    if skipped:
        log.info("%s: %d image questions read, %d video questions left out (they need frames)", path, len(out),
                 skipped)
    return out, types


def _choices(rec: dict) -> list[str]:
    return [str(rec[f"choice_{c}"]) for c in "abcd"]


def seed_prompt(rec: dict) -> str:
    """The question and its lettered choices (the MC instruction comes after)."""
    return "\n".join([rec["question"]] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(_choices(rec))])


def score_seed(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Accuracy of ``answers`` (records with ``question_id`` and ``text``/``answer``/``prediction``) on the image
    questions of a SEED-Bench JSON, overall and per question type; unparsed replies count as wrong."""
    recs, types = seed_questions(annotations)
    gold = {}
    for loc, rec in recs:
        if "answer" not in rec:
            raise ScoreInputError(f"{annotations}: {loc}: no 'answer' to score against")
        gold[str(rec["question_id"])] = rec
    rows = [(loc, str(require(r, ("question_id",), answers, loc, "SEED-Bench answer")),
             require(r, ("text", "answer", "prediction"), answers, loc, "SEED-Bench answer"))
            for loc, r in load_records(answers, "SEED-Bench answers")]
    got = match_answers(rows, list(gold), answers, annotations, allow_missing)
    if not got:
        raise ScoreInputError(f"{answers}: no answers to score")
    ok, by_type, unparsed = [], defaultdict(list), 0
    for qid, reply in got.items():
        rec = gold[qid]
        letter = parse_choice(reply, _choices(rec))
        unparsed += letter is None
        ok.append(letter == rec["answer"])
        tid = rec.get("question_type_id")
        by_type[types.get(tid, str(tid))].append(ok[-1])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(ok), "accuracy": mean(ok), "per_question_type": {k: mean(v) for k, v in sorted(by_type.items())},
            "n_unparsed_replies": unparsed, "n_missing": len(gold) - len(got)}
