"""POPE scorer (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models").

Reads POPE's own files: the question file is JSON Lines ``{"question_id", "image", "text", "label"}`` with
label "yes"/"no"; the answer file is JSON Lines with the model's reply under ``"answer"`` (POPE's format) or
``"text"`` (LLaVA's ``model_vqa_loader`` output). Answers are matched to questions by ``question_id``; when no
answer line carries one, by line order, as POPE's own ``evaluate.py`` does.

A reply is read as yes/no by POPE's rule (its ``evaluate.py``, and LLaVA-1.5's ``eval_pope.py``): its first
sentence (the text before the first period) is "no" if it holds the word "no" or "not", otherwise "yes"; so
"Yes, there is no dog." is a no, as there. One difference: POPE's rule is case-sensitive on "No"/"no"/"not"
and splits words on spaces after deleting commas; here words are matched lower-cased and split on any
punctuation, so "NO!", "'No'" and "No-one" are a no ("NO!" is a yes there). Replies that do not start with the
word "yes" or "no" are counted in ``n_unparsed`` (the rule decided them from their wording). Metrics treat "yes"
as the positive class: accuracy, precision, recall, F1 and the ratio of "yes" predictions (an unbiased model is
near 0.5 on POPE's balanced files); precision (recall) is 0 when there is no positive prediction (label).
"""

from __future__ import annotations

import re
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, load_records, match_answers, require

_NON_WORD = re.compile(r"[^\w\s']")


def _words(text: str) -> list[str]:
    """Lower-cased words; apostrophes stay inside a word ("isn't") but not around one ("'No'" -> "no")."""
    return [w.strip("'") for w in _NON_WORD.sub(" ", text).lower().split() if w.strip("'")]


def yes_no(reply: str) -> tuple[bool, bool]:
    """(is_yes, parsed): POPE's rule on the first sentence; parsed is False when the reply did not start with the
    word yes or no."""
    words = _words(reply)
    is_yes = not any(w in ("no", "not") for w in _words(reply.split(".")[0]))
    return is_yes, bool(words) and words[0] in ("yes", "no")


def pope_metrics(labels: list[bool], preds: list[bool]) -> dict:
    """Binary metrics with "yes" as the positive class."""
    if len(labels) != len(preds) or not labels:
        raise ValueError(f"need as many predictions as labels, at least one (got {len(preds)} and {len(labels)})")
    tp = sum(l and p for l, p in zip(labels, preds))
    fp = sum((not l) and p for l, p in zip(labels, preds))
    tn = sum((not l) and (not p) for l, p in zip(labels, preds))
    fn = sum(l and (not p) for l, p in zip(labels, preds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(labels), "accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / len(labels), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope(answers: str | Path, questions: str | Path, allow_missing: bool = False) -> dict:
    """Score a POPE answer file against a POPE question (label) file."""
    qrecs = load_records(questions, "POPE question")
    if not qrecs:
        raise ScoreInputError(f"{questions}: the POPE question file is empty")
    gold: dict = {}
    for loc, rec in qrecs:
        qid = require(rec, ("question_id",), questions, loc, "POPE question")
        label = require(rec, ("label",), questions, loc, "POPE question")
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise ScoreInputError(f"{questions}: {loc}: label must be 'yes' or 'no', got {label!r}")
        if qid in gold:
            raise ScoreInputError(f"{questions}: {loc}: duplicate question_id {qid!r}")
        gold[qid] = label.strip().lower() == "yes"
    arecs = load_records(answers, "POPE answer")
    with_id = [("question_id" in rec) for _, rec in arecs]
    if arecs and not any(with_id):  # POPE's evaluate.py: answers in question order
        if len(arecs) != len(qrecs):
            raise ScoreInputError(f"{answers}: has {len(arecs)} answers without question_id but {questions} has "
                                  f"{len(qrecs)} questions; add question_id to each answer to score a subset")
        rows = [(loc, qid, require(rec, ("answer", "text"), answers, loc, "POPE answer"))
                for (loc, rec), qid in zip(arecs, gold)]
    else:
        rows = []
        for (loc, rec), has in zip(arecs, with_id):
            if not has:
                raise ScoreInputError(f"{answers}: {loc}: answer has no 'question_id' (other lines do)")
            rows.append((loc, require(rec, ("question_id",), answers, loc, "POPE answer"),
                         require(rec, ("answer", "text"), answers, loc, "POPE answer")))
    got = match_answers(rows, list(gold), answers, questions, allow_missing)
    if not got:
        raise ScoreInputError(f"{answers}: no answers to score")
    labels, preds, unparsed = [], [], 0
    for qid, text in got.items():
        is_yes, parsed = yes_no(text)
        labels.append(gold[qid])
        preds.append(is_yes)
        unparsed += not parsed
    out = pope_metrics(labels, preds)
    out["n_unparsed"] = unparsed
    out["n_missing"] = len(gold) - len(got)
    return out
