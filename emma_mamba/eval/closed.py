"""Closed-set benchmarks scored by the likelihood of each option: VSR, TallyQA and AI2D, as Prismatic's
evaluation (TRI-ML/vlm-evaluation, whose benchmarks Cobra and EMMA-Mamba report) runs them.

* **VSR** (Visual Spatial Reasoning, Liu et al. 2023), the zero-shot test split ``test.jsonl`` (1,222 captions on
  715 COCO images): records ``{image, caption, label (1 true, 0 false), relation, subj, obj}``; a question's id is
  its 0-based record index. Prompt (InstructBLIP's, as Prismatic): ``Based on the image, is this statement "True"
  or "False"? <caption>`` then ``Respond with "True" or "False" directly.``; options ``True`` and ``False``.
  Metrics: accuracy, ROC AUC and PR AUC (average precision) of the probability of "True", the always-true
  baseline, accuracy per relation.
* **AI2D** (Kembhavi et al. 2016, science diagrams), the release's ``questions/`` folder (one ``<image>.json`` per
  diagram: ``{imageName, questions: {text: {answerTexts, correctAnswer, questionId, abcLabel}}}``); ``split``
  test (default: the diagrams listed in ``ai2d_test_ids.csv`` beside the folder or in its parent), train (the
  others) or all. The answer texts as lettered options with LLaVA-1.5's multiple-choice instruction; the options'
  letters scored (Prismatic's conversion). Metric: accuracy (also on the questions about the diagram's letter
  labels, ``abcLabel``, and the others).
* **TallyQA** (Acharya et al. 2019), ``test.json``: records ``{question_id, image, question, answer (0-15),
  issimple}``; the 16 possible counts become a 16-way multiple choice (``A. 0`` ... ``P. 15``) with LLaVA-1.5's
  "Answer with the option's letter from the given choices directly." (Prismatic's conversion, for calibrated
  probabilities). Metrics: accuracy on the simple and the complex questions and overall.

The runner (:func:`emma_mamba.eval.runner.evaluate`) writes, per question, the option picked as ``text`` and the
options' probabilities (normalised over the options, :meth:`emma_mamba.models.vlm.EmmaMamba.option_probabilities`)
as ``probabilities``. An answers file without probabilities (replies of a model behind an API that returns no
log-probabilities) is scored from its text: an option's name (``True``/``False``, also ``yes``/``no`` for VSR), a
letter, or for TallyQA the count itself; the ranking metrics then need probabilities and are left out.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, load_json, load_records, match_answers, require
from emma_mamba.eval.mmbench import MC_PROMPT

__all__ = ["VSR_OPTIONS", "TALLY_OPTIONS", "SPELLINGS", "spellings", "ai2d_records", "ai2d_prompt", "score_ai2d",
           "vsr_records", "vsr_prompt", "tallyqa_records", "tallyqa_prompt", "pick_option", "auc_roc",
           "average_precision", "auc_roc_ovo", "score_vsr", "score_tallyqa"]

VSR_OPTIONS = ("True", "False")
TALLY_MAX = 15
TALLY_OPTIONS = tuple(chr(ord("A") + i) for i in range(TALLY_MAX + 1))
"""A..P: option i is the count i."""


# ------------------------------------------------------------------------------------------- reading

def vsr_records(path: str | Path) -> list[tuple[str, dict]]:
    """The records of a VSR JSONL (or JSON list) file, each checked; record i has question id i."""
    recs = load_records(path, "VSR")
    if not recs:
        raise ScoreInputError(f"{path}: no VSR records")
    for loc, rec in recs:
        for key in ("image", "caption"):
            if not isinstance(require(rec, (key,), path, loc, "VSR"), str):
                raise ScoreInputError(f"{path}: {loc}: {key!r} must be a string, got {rec[key]!r}")
        if "label" in rec and rec["label"] not in (0, 1):  # True/False are 1/0 in Python
            raise ScoreInputError(f"{path}: {loc}: label must be 1 (the caption is true) or 0, got {rec['label']!r}")
    return recs


def vsr_prompt(caption: str) -> str:
    return (f'Based on the image, is this statement "True" or "False"? {caption}\n'
            'Respond with "True" or "False" directly.')


def tallyqa_records(path: str | Path) -> list[tuple[str, dict]]:
    """The records of TallyQA's test.json (a JSON list), each checked."""
    doc = load_json(path, "TallyQA")
    if not isinstance(doc, list) or not doc:
        raise ScoreInputError(f"{path}: expected a non-empty JSON list of questions (TallyQA's test.json)")
    out, seen = [], set()
    for i, rec in enumerate(doc, 1):
        loc = f"record {i}"
        if not isinstance(rec, dict):
            raise ScoreInputError(f"{path}: {loc}: expected a JSON object, got {type(rec).__name__}")
        qid = require(rec, ("question_id",), path, loc, "TallyQA")
        if qid in seen:
            raise ScoreInputError(f"{path}: {loc}: question_id {qid!r} appears twice")
        seen.add(qid)
        for key in ("image", "question"):
            if not isinstance(require(rec, (key,), path, loc, "TallyQA"), str):
                raise ScoreInputError(f"{path}: {loc}: {key!r} must be a string, got {rec[key]!r}")
        if "answer" in rec:
            a = rec["answer"]
            if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a <= TALLY_MAX:
                raise ScoreInputError(f"{path}: {loc}: answer must be a count from 0 to {TALLY_MAX}, got {a!r}")
        out.append((loc, rec))
    return out


def tallyqa_prompt(question: str) -> str:
    """The question, the counts as lettered options, LLaVA-1.5's multiple-choice instruction."""
    return "\n".join([question] + [f"{c}. {i}" for i, c in enumerate(TALLY_OPTIONS)] + [MC_PROMPT])


SPELLINGS = {"Yes": ("Yes", "yes"), "No": ("No", "no")}
"""Options scored as the sum of several spellings (a yes/no reply in either case: LLaVA's data capitalises it,
others do not); every other option is its own text."""


def spellings(option: str) -> tuple[str, ...]:
    return SPELLINGS.get(option, (option,))


def _ai2d_test_ids(folder: Path) -> set[str] | None:
    """The test diagrams' ids from ``ai2d_test_ids.csv`` beside ``folder`` or in its parent; None without one."""
    for cand in (folder / "ai2d_test_ids.csv", folder.parent / "ai2d_test_ids.csv"):
        if cand.is_file():
            return {ln.split(",")[0].strip() for ln in cand.read_text(encoding="utf-8").splitlines() if ln.strip()}
    return None


def ai2d_records(path: str | Path, split: str = "test") -> list[tuple[str, dict]]:
    """AI2D's questions of ``split`` (test, train or all) as records ``{question_id, image, question, choices,
    answer, abc_label, split}`` in file-name and file order, each checked; ``path`` the questions folder or one
    file. ``split`` of a record: test or train by the test-ids file, None without one (only with split all)."""
    p = Path(path)
    if split not in ("test", "train", "all"):
        raise ScoreInputError(f"AI2D split must be test, train or all, got {split!r}")
    if p.is_dir():
        files = sorted(p.glob("*.json"), key=lambda f: (len(f.name), f.name))
        if not files:
            raise ScoreInputError(f"AI2D questions folder {p} holds no <image>.json files")
    elif p.is_file():
        files = [p]
    else:
        raise ScoreInputError(f"AI2D questions {p} does not exist")
    test = _ai2d_test_ids(p if p.is_dir() else p.parent)
    if test is None and split != "all":
        raise ScoreInputError(f"AI2D split {split}: no ai2d_test_ids.csv in {p if p.is_dir() else p.parent} or its "
                              f"parent (split all takes every question)")
    out = []
    for f in files:
        doc = load_json(f, "AI2D questions")
        if not isinstance(doc, dict) or not isinstance(doc.get("questions"), dict):
            raise ScoreInputError(f"{f}: expected an object with 'imageName' and a 'questions' mapping")
        image = require(doc, ("imageName",), f, "top level", "AI2D")
        diagram = str(image).split(".")[0]
        where = None if test is None else ("test" if diagram in test else "train")
        if split != "all" and where != split:
            continue
        for text, q in doc["questions"].items():
            loc = f"question {text!r}"
            if not isinstance(q, dict):
                raise ScoreInputError(f"{f}: {loc}: expected an object")
            choices = require(q, ("answerTexts",), f, loc, "AI2D question")
            if not isinstance(choices, list) or not 2 <= len(choices) <= 8:
                raise ScoreInputError(f"{f}: {loc}: answerTexts must be a list of 2 to 8 answers, got {choices!r}")
            ans = q.get("correctAnswer")
            if ans is not None and (isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices)):
                raise ScoreInputError(f"{f}: {loc}: correctAnswer must index answerTexts (0-{len(choices) - 1}), "
                                      f"got {ans!r}")
            out.append((f"{f.name}: {loc}", {"question_id": str(require(q, ("questionId",), f, loc, "AI2D question")),
                                               "image": image, "question": text, "choices": [str(c) for c in choices],
                                               "answer": ans, "abc_label": bool(q.get("abcLabel")),
                                               "split": where}))
    if not out:
        raise ScoreInputError(f"{p}: no AI2D questions in split {split}")
    return out


def ai2d_prompt(rec: dict) -> str:
    """The question and its lettered answer texts (the MC instruction comes after)."""
    return "\n".join([rec["question"]] + [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(rec["choices"])])


# ------------------------------------------------------------------------------------------- picking

_WORD = re.compile(r"[A-Za-z0-9]+")
_ALONE = re.compile(r"\s*(?:$|[.):,;]|\W*$)")  # what may follow a one-letter option: nothing, or its punctuation
_WORD_LETTERS = frozenset("AI")  # capital letters that are also English words


def pick_option(text: str, options: tuple[str, ...], probabilities=None, task: str = "") -> int | None:
    """The index of the option an answer picks: the most probable one when ``probabilities`` are given, else
    parsed from ``text`` (an option's name, case-insensitive; VSR also yes/no; TallyQA also the count itself);
    None when the text names none."""
    if probabilities is not None:
        return max(range(len(options)), key=lambda i: probabilities[i])
    m = _WORD.search(text)
    if m is None:
        return None
    first = m.group()
    for i, o in enumerate(options):
        # a one-letter option only as a capital, and "A" / "I" only standing alone ("A", "(A)", "A. 0"), not as
        # the first word of a sentence ("A total of 3", "I see 2")
        if first.lower() == o.lower() and (len(o) > 1 or (first.isupper() and (
                first not in _WORD_LETTERS or _ALONE.match(text, m.end())))):
            return i
    if task == "vsr" and first.lower() in ("yes", "no"):
        return 0 if first.lower() == "yes" else 1
    if task == "tallyqa" and first.isdigit() and int(first) <= TALLY_MAX:
        return int(first)
    return None


# ------------------------------------------------------------------------------------------- ranking metrics

def _average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def auc_roc(labels: list[bool], scores: list[float]) -> float | None:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (Mann-Whitney U with ties counted
    half); None when only one class is present."""
    pos = sum(bool(x) for x in labels)
    neg = len(labels) - pos
    if not pos or not neg:
        return None
    ranks = _average_ranks(list(scores))
    u = sum(r for r, y in zip(ranks, labels) if y) - pos * (pos + 1) / 2
    return u / (pos * neg)


def auc_roc_ovo(labels: list[int], probabilities: list[list[float]]) -> float | None:
    """Multi-class ROC AUC, one against one (Hand & Till 2001; scikit-learn's ``multi_class="ovo"``, macro): over
    every pair (j, k) of the classes present in ``labels``, the mean of AUC(j vs k, scored by column j) and AUC(k vs
    j, scored by column k) on the samples of those two classes; the pairs' mean. None with fewer than 2 classes."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        return None
    pairs = []
    for a, j in enumerate(classes):
        for k in classes[a + 1:]:
            rows = [(y, p) for y, p in zip(labels, probabilities) if y in (j, k)]
            jk = auc_roc([y == j for y, _ in rows], [p[j] for _, p in rows])
            kj = auc_roc([y == k for y, _ in rows], [p[k] for _, p in rows])
            pairs.append((jk + kj) / 2)
    return sum(pairs) / len(pairs)


def average_precision(labels: list[bool], scores: list[float]) -> float | None:
    """Average precision (area under the precision-recall curve as a step function, scikit-learn's
    ``average_precision_score``): sum over the distinct score thresholds, highest first, of the recall gained
    times the precision there; None without positives."""
    pos = sum(bool(x) for x in labels)
    if not pos:
        return None
    pairs = sorted(zip(scores, labels), key=lambda t: -t[0])
    ap, tp, seen, prev_recall, i = 0.0, 0, 0, 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:  # one threshold takes all its ties
            tp += bool(pairs[j][1])
            j += 1
        seen = j
        recall = tp / pos
        ap += (recall - prev_recall) * (tp / seen)
        prev_recall, i = recall, j
    return ap


# ------------------------------------------------------------------------------------------- scoring

def _read_answers(answers, what: str, key=lambda q: q) -> list[tuple[str, object, str, object]]:
    """(location, ``key(question id)``, text, probabilities or None) of every record of an answers file."""
    return [(loc, key(require(rec, ("question_id",), answers, loc, f"{what} answer")),
             require(rec, ("text", "answer", "prediction"), answers, loc, f"{what} answer"), rec.get("probabilities"))
            for loc, rec in load_records(answers, f"{what} answers")]


def _answers(rows, gold_ids, answers, annotations, allow_missing, options_of) -> dict:
    """question id -> (text, probabilities or None): every answer of ``rows`` (:func:`_read_answers`) for a known
    question, its probabilities one finite number per option (``options_of(question id)``)."""
    for loc, qid, _, p in rows:
        if p is not None and qid in gold_ids:
            options = options_of(qid)
            if (not isinstance(p, list) or len(p) != len(options) or
                    not all(isinstance(x, (int, float)) and math.isfinite(x) for x in p)):
                raise ScoreInputError(f"{answers}: {loc}: probabilities must be a list of {len(options)} numbers "
                                      f"(one per option {list(options)}), got {p!r}")
    got = match_answers([(loc, q, t) for loc, q, t, _ in rows], list(gold_ids), answers, annotations, allow_missing)
    if not got:
        raise ScoreInputError(f"{answers}: no answers to score")
    probs = {q: p for _, q, _, p in rows}
    return {q: (t, probs[q]) for q, t in got.items()}


def score_vsr(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Accuracy, ROC AUC and PR AUC (of P("True"); with probabilities for every answer) of ``answers`` (records
    ``{question_id: record index, text, probabilities?}``) on a VSR file with labels."""
    gold = {}
    for i, (loc, rec) in enumerate(vsr_records(annotations)):
        if "label" not in rec:
            raise ScoreInputError(f"{annotations}: {loc}: no 'label' to score against")
        gold[i] = rec
    got = _answers(_read_answers(answers, "VSR"), gold, answers, annotations, allow_missing, lambda q: VSR_OPTIONS)
    ok, by_rel, unparsed, labels, p_true = [], defaultdict(list), 0, [], []
    for qid, (text, probs) in got.items():
        rec = gold[qid]
        k = pick_option(text, VSR_OPTIONS, probs, "vsr")
        unparsed += k is None
        ok.append(k is not None and (k == 0) == bool(rec["label"]))
        by_rel[str(rec.get("relation", "?"))].append(ok[-1])
        labels.append(bool(rec["label"]))
        if probs is not None:
            p_true.append(probs[0] / (sum(probs) or 1.0))
    ranked = len(p_true) == len(labels)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(ok), "accuracy": mean(ok), "auc_roc": auc_roc(labels, p_true) if ranked else None,
            "auc_pr": average_precision(labels, p_true) if ranked else None,
            "always_true_accuracy": mean(labels), "per_relation": {k: mean(v) for k, v in sorted(by_rel.items())},
            "n_unparsed_replies": unparsed, "n_missing": len(gold) - len(got)}


def score_ai2d(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Accuracy of ``answers`` (records ``{question_id, text, probabilities?}``) on AI2D (``annotations``: the
    questions folder), overall and on the letter-label questions and the others; the split is the answered
    questions' (test or train by the test-ids file; answers of both: all). With probabilities for every answer
    over as many options, also the one-against-one ROC AUC (:func:`auc_roc_ovo`), as Prismatic reports."""
    every = {r["question_id"]: r for _, r in ai2d_records(annotations, "all")}
    rows = _read_answers(answers, "AI2D", key=str)
    splits = {every[q]["split"] for _, q, _, _ in rows if q in every}
    split = splits.pop() if len(splits) == 1 else None  # answers of both splits: scored as split all
    gold = {q: r for q, r in every.items() if split is None or r["split"] == split}
    if any(r["answer"] is None for r in gold.values()):
        raise ScoreInputError(f"{annotations}: some questions have no correctAnswer to score against")
    letters_of = lambda q: tuple(chr(ord("A") + i) for i in range(len(gold[q]["choices"])))  # noqa: E731
    got = _answers(rows, gold, answers, annotations, allow_missing, letters_of)
    ok, by_kind, unparsed, ranked = [], defaultdict(list), 0, []
    for qid, (text, p) in got.items():
        rec = gold[qid]
        letters = letters_of(qid)
        k = pick_option(text, letters, p)
        if k is None and p is None:  # the answer text itself
            k = next((i for i, c in enumerate(rec["choices"]) if c.strip().lower() == text.strip().lower()), None)
        unparsed += k is None
        ok.append(k == rec["answer"])
        by_kind["letter labels" if rec["abc_label"] else "other"].append(ok[-1])
        if p is not None:
            ranked.append((rec["answer"], p))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    same = len(ranked) == len(ok) and len({len(p) for _, p in ranked}) == 1  # every answer, as many options
    return {"n": len(ok), "split": split or "all", "accuracy": mean(ok),
            "auc_roc_ovo": auc_roc_ovo([y for y, _ in ranked], [p for _, p in ranked]) if same else None,
            "per_kind": {k: mean(v) for k, v in sorted(by_kind.items())},
            "n_unparsed_replies": unparsed, "n_missing": len(gold) - len(got)}


def score_tallyqa(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Accuracy of ``answers`` (records ``{question_id, text, probabilities?}``) on TallyQA's test.json, on
    its simple and complex questions and overall (an unparsed reply counts as wrong); with probabilities for
    every answer also the one-against-one ROC AUC over the counts (:func:`auc_roc_ovo`), as Prismatic reports."""
    gold = {}
    for loc, rec in tallyqa_records(annotations):
        if "answer" not in rec:
            raise ScoreInputError(f"{annotations}: {loc}: no 'answer' to score against")
        gold[rec["question_id"]] = rec
    got = _answers(_read_answers(answers, "TallyQA"), gold, answers, annotations, allow_missing,
                   lambda q: TALLY_OPTIONS)
    by_split, unparsed, ranked = defaultdict(list), 0, defaultdict(list)
    for qid, (text, probs) in got.items():
        rec = gold[qid]
        k = pick_option(text, TALLY_OPTIONS, probs, "tallyqa")
        unparsed += k is None
        part = "simple" if rec.get("issimple") else "complex"
        by_split[part].append(k == rec["answer"])
        if probs is not None:
            ranked[part].append((rec["answer"], probs))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    every = by_split["simple"] + by_split["complex"]

    def ovo(rows):
        return auc_roc_ovo([y for y, _ in rows], [p for _, p in rows]) if rows else None

    full = sum(len(v) for v in ranked.values()) == len(every)
    return {"n": len(every), "accuracy": mean(every), "accuracy_simple": mean(by_split["simple"]),
            "accuracy_complex": mean(by_split["complex"]), "n_simple": len(by_split["simple"]),
            "n_complex": len(by_split["complex"]),
            "auc_roc_ovo": ovo(ranked["simple"] + ranked["complex"]) if full else None,
            "auc_roc_ovo_simple": ovo(ranked["simple"]) if full else None,
            "auc_roc_ovo_complex": ovo(ranked["complex"]) if full else None,
            "n_unparsed_replies": unparsed, "n_missing": len(gold) - len(got)}
