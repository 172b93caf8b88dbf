"""GQA scorer: exact-match accuracy, overall and per question type (Hudson & Manning, 2019).

Files (GQA's own formats): questions JSON ``{question_id: {"answer", "types": {"structural", "semantic",
...}, "imageId", "question", ...}}`` (e.g. ``testdev_balanced_questions.json``); predictions JSON
``[{"questionId", "prediction"}]`` (or JSON Lines, also with LLaVA's ``"question_id"``/``"text"``).
Question ids are compared as strings, since GQA's file keys are strings and predictions often carry them as
strings too.

GQA's ``eval.py`` compares prediction and gold answer verbatim; LLaVA's conversion step before it lower-cases
the reply and strips a trailing period. Both sides here get that light normalisation: surrounding whitespace
stripped, lower-cased, trailing periods stripped. Accuracy is also reported per structural type (verify,
query, choose, logical, compare) and per semantic type (obj, attr, rel, cat, global) when ``types`` is given.
As in ``eval.py``, only balanced questions count: a question with ``"isBalanced": false`` (the *_all_questions
files hold them) is left out, and so is any prediction for it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, label, load_json, load_records, match_answers, require


def normalize_gqa(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def score_gqa(answers: str | Path, questions: str | Path, allow_missing: bool = False) -> dict:
    """Score GQA predictions against a GQA questions file."""
    doc = load_json(questions, "GQA questions")
    if not isinstance(doc, dict) or not doc:
        raise ScoreInputError(f"{questions}: expected a non-empty JSON object mapping question id -> question "
                              f"(GQA's *_questions.json)")
    gold: dict[str, tuple[str, dict]] = {}
    unbalanced = set()
    for qid, q in doc.items():
        loc = f"question {qid!r}"
        if not isinstance(q, dict):
            raise ScoreInputError(f"{questions}: {loc}: expected a JSON object")
        if q.get("isBalanced") is False:
            unbalanced.add(str(qid))
            continue
        ans = require(q, ("answer",), questions, loc, "GQA question")
        if not isinstance(ans, str):
            raise ScoreInputError(f"{questions}: {loc}: 'answer' must be a string, got {ans!r}")
        types = q.get("types") or {}
        types = types if isinstance(types, dict) else {}
        for k in ("structural", "semantic"):
            label(types.get(k), questions, loc, f"'types.{k}'")
        gold[str(qid)] = (normalize_gqa(ans), types)
    rows = [(loc, str(require(rec, ("questionId", "question_id"), answers, loc, "GQA prediction")),
             require(rec, ("prediction", "answer", "text"), answers, loc, "GQA prediction"))
            for loc, rec in load_records(answers, "GQA predictions")]
    got = match_answers([r for r in rows if r[1] not in unbalanced], list(gold), answers, questions, allow_missing)
    if not got:
        raise ScoreInputError(f"{answers}: no predictions to score")
    correct, by_struct, by_sem = [], defaultdict(list), defaultdict(list)
    for qid, pred in got.items():
        gold_ans, types = gold[qid]
        ok = float(normalize_gqa(pred) == gold_ans)
        correct.append(ok)
        if "structural" in types:
            by_struct[types["structural"]].append(ok)
        if "semantic" in types:
            by_sem[types["semantic"]].append(ok)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(correct), "accuracy": mean(correct),
            "per_structural_type": {k: mean(v) for k, v in sorted(by_struct.items())},
            "per_semantic_type": {k: mean(v) for k, v in sorted(by_sem.items())},
            "n_missing": len(gold) - len(got)}
