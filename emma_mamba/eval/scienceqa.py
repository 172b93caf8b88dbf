"""ScienceQA (Lu et al. 2022), image questions ("ScienceQA-IMG"): multiple choice with 2 to 5 options.

File: the official ``problems.json``, ``{pid: {"question", "choices": [...], "answer": <index>, "hint",
"image": "image.png" | null, "split": "train" | "val" | "test", "subject", "grade", ...}}``. Only problems of
the chosen split (default ``test``) that have an image are read; the image is ``<split>/<pid>/<image>`` under
the images folder (the official layout), or ``<pid>/<image>``.

Prompt (LLaVA-1.5's ScienceQA evaluation): ``Context: <hint>`` (only when there is one), the question, the
lettered choices, then "Answer with the option's letter from the given choices directly."; replies are read
by :func:`emma_mamba.eval.mmbench.parse_choice` (a letter, or exactly one choice's text). LLaVA-1.5's own scorer
(``eval_science_qa.py``) reads "B", "B. ..." and "The answer is B." and picks a random choice for any other
reply (1/k expected credit); here such a reply is wrong unless ``parse_choice`` reads it ("(B)", the choice's
text), so scores differ only on replies that are not a bare letter.

Score: accuracy overall, per subject (natural / social / language science) and per grade band (1-6, 7-12),
as ScienceQA reports; the split scored is the one of the answered questions.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, label, load_json, load_records, match_answers, require
from emma_mamba.eval.mmbench import LETTERS, parse_choice

log = logging.getLogger(__name__)

__all__ = ["scienceqa_problems", "scienceqa_prompt", "scienceqa_image", "score_scienceqa"]


def scienceqa_problems(path: str | Path, split: str | None = "test") -> dict[str, dict]:
    """pid -> problem of every image problem of ``split`` (None: every split) in a ScienceQA problems.json."""
    doc = load_json(path, "ScienceQA problems")
    if not isinstance(doc, dict) or not doc:
        raise ScoreInputError(f"{path}: expected a JSON object mapping problem id -> problem (ScienceQA "
                              f"problems.json)")
    out, no_image = {}, 0  # ScienceQA-IMG: the split's problems with an image
    for pid, rec in doc.items():
        loc = f"problem {pid!r}"
        if not isinstance(rec, dict):
            raise ScoreInputError(f"{path}: {loc}: expected a JSON object")
        for k in ("split", "subject", "grade"):
            label(rec.get(k), path, loc, repr(k))
        if split is not None and rec.get("split") != split:
            continue
        if not rec.get("image"):
            no_image += 1
            continue
        if not isinstance(rec["image"], str):
            raise ScoreInputError(f"{path}: {loc}: 'image' must be a file name, got {rec['image']!r}")
        choices = require(rec, ("choices",), path, loc, "ScienceQA problem")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise ScoreInputError(f"{path}: {loc}: 'choices' must be a list of 2 to {len(LETTERS)} options")
        answer = rec.get("answer")
        if answer is not None and (not isinstance(answer, int) or not 0 <= answer < len(choices)):
            raise ScoreInputError(f"{path}: {loc}: answer {answer!r} is not the index of one of its "
                                  f"{len(choices)} choices")
        question = require(rec, ("question",), path, loc, "ScienceQA problem")
        if not isinstance(question, str) or any(not isinstance(c, (str, int, float)) for c in choices) \
                or not isinstance(rec.get("hint") or "", str):
            raise ScoreInputError(f"{path}: {loc}: the question, its hint and its choices must be text")
        out[str(pid)] = rec
    if not out:
        raise ScoreInputError(f"{path}: no image problems in split {split!r}")
    if no_image:
        log.info("%s: %d image problems of split %s read, %d without an image left out (ScienceQA-IMG)", path,
                 len(out), split, no_image)
    return out


def scienceqa_image(images: Path, pid: str, rec: dict) -> Path | None:
    """The problem's image file under ``images`` (``<split>/<pid>/<image>`` or ``<pid>/<image>``), if present."""
    for p in (images / str(rec.get("split", "")) / pid / rec["image"], images / pid / rec["image"]):
        if p.is_file():
            return p
    return None


def scienceqa_prompt(rec: dict) -> str:
    """Context (when given), question and lettered choices (the MC instruction comes after)."""
    hint = (rec.get("hint") or "").strip()
    lines = ([f"Context: {hint}"] if hint else []) + [rec["question"]]
    return "\n".join(lines + [f"{LETTERS[i]}. {c}" for i, c in enumerate(rec["choices"])])


def _grade_band(grade) -> str:
    try:
        g = int(str(grade).lower().replace("grade", "").strip())
    except ValueError:
        return "unknown"
    return "grades 1-6" if g <= 6 else "grades 7-12"


def score_scienceqa(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Accuracy of ``answers`` (``question_id`` = problem id, ``text``/``answer``/``prediction``) on the image
    problems of the split they answer, from a ScienceQA problems.json."""
    every = scienceqa_problems(annotations, split=None)
    rows = [(loc, str(require(r, ("question_id",), answers, loc, "ScienceQA answer")),
             require(r, ("text", "answer", "prediction"), answers, loc, "ScienceQA answer"))
            for loc, r in load_records(answers, "ScienceQA answers")]
    splits = {every[qid].get("split") for _, qid, _ in rows if qid in every}
    if len(splits) > 1:
        raise ScoreInputError(f"{answers}: answers span the splits {sorted(map(str, splits))}; score one split at "
                              f"a time")
    gold = {pid: rec for pid, rec in every.items() if rec.get("split") in splits} if splits else every
    missing_answer = [pid for pid, rec in gold.items() if rec.get("answer") is None]
    if missing_answer:
        raise ScoreInputError(f"{annotations}: problem {missing_answer[0]!r} has no 'answer' to score against")
    got = match_answers(rows, list(gold), answers, annotations, allow_missing)
    if not got:
        raise ScoreInputError(f"{answers}: no answers to score")
    ok, by_subject, by_grade, unparsed = [], defaultdict(list), defaultdict(list), 0
    for pid, reply in got.items():
        rec = gold[pid]
        letter = parse_choice(reply, [str(c) for c in rec["choices"]])
        unparsed += letter is None
        ok.append(letter is not None and LETTERS.index(letter) == rec["answer"])
        by_subject[rec.get("subject", "unknown")].append(ok[-1])
        by_grade[_grade_band(rec.get("grade"))].append(ok[-1])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(ok), "accuracy": mean(ok), "split": next(iter(splits), None),
            "per_subject": {k: mean(v) for k, v in sorted(by_subject.items())},
            "per_grade": {k: mean(v) for k, v in sorted(by_grade.items())},
            "n_unparsed_replies": unparsed, "n_missing": len(gold) - len(got)}
