"""VQAv2 scorer: the official soft accuracy with the official answer normalisation.

Files (VQAv2's own formats): annotations JSON ``{"annotations": [{"question_id", "answers": [{"answer"}...]
(ten per question), "answer_type", "question_type", ...}]}``; results JSON ``[{"question_id", "answer"}]``
(or JSON Lines, with the reply under ``"answer"`` or LLaVA's ``"text"``).

Accuracy of one answer (Antol et al. 2015; Goyal et al. 2017): ``min(#humans that gave it / 3, 1)``,
averaged over the ten leave-one-annotator-out subsets of nine humans, as the official evaluation does; so an
answer given by k of the ten humans scores (k·min(1,(k-1)/3) + (10-k)·min(1,k/3)) / 10: 0.3, 0.6, 0.9, 1.0
for k = 1, 2, 3, 4+. Per-answer-type and per-question-type means are reported too.

Normalisation (the official rules, re-written from their description):
1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. each punctuation mark of ``PUNCTUATION`` is deleted when it touches a space or when the text contains a
   comma between digits ("1,000"), otherwise replaced by a space ("red-white" -> "red white");
3. a period not followed by a digit is deleted ("yes." -> "yes", "2.5" stays), the first 32 of them only
   (the official ``periodStrip.sub("", text, re.UNICODE)`` passes re.UNICODE = 32 as the count);
4. lower-cased, split on whitespace; number words zero..ten and "none" become digits; the articles a, an,
   the are dropped; apostrophe-less contractions are restored ("dont" -> "don't"), words re-joined by one
   space.
The model's answer gets all of it, as in the official script, after the pre-pass LLaVA-1.5's submission
scripts (``convert_vqav2_for_submission.py``, ``convert_vizwiz_for_submission.py``) run on every reply before
the evaluation server sees it: the EvalAI answer processor of :func:`normalize_textvqa` (lower-cased, commas and
question marks deleted, "'s" split off its word), so a reply is scored as LLaVA-1.5's published numbers scored
it ("red,white" -> "redwhite", "men's" -> "men 's": both then miss human answers that the plain rules would
match; the server's rules, run again after the processor, leave its output unchanged, but for a reply holding
more than 32 periods, whose later periods the count of step 3 spares). One deliberate difference is on the
human side: the official VQAv2 script (GT-Vision-Lab/VQA) applies only steps 2-3 to the human answers, and only
when they are not all the same; Prismatic's copy (TRI-ML/vlm-evaluation) applies steps 2-3 always; VizWiz's
applies nothing. Here the human answers get every step too, so "Two" or "the dog" written by a human matches
the answers "2" and "dog" (0 in the official scripts); on human answers already in that normal form the scores
are identical.

TextVQA's evaluator (the EvalAI answer processor of M4C, used by LLaVA's ``eval_textvqa.py``) first
lower-cases, deletes every comma and question mark and splits "'s" off its word, on the model's and the human
answers alike (:func:`normalize_textvqa`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, label, load_json, load_records, match_answers, require

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(("a", "an", "the"))
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _contractions() -> dict[str, str]:
    """Apostrophe-less spelling -> contraction, the official table (lower-case keys: it runs after lower())."""
    table: dict[str, str] = {}
    # word stems whose apostrophe-less "nt" forms are restored, e.g. "dont" -> "don't"
    for stem in ("ai", "are", "ca", "could", "did", "does", "do", "had", "has", "have", "is", "might", "must",
                 "need", "ought", "sha", "should", "was", "were", "wo", "would"):
        table[f"{stem}nt"] = f"{stem}n't"
    for pre in ("could", "had", "might", "should", "would"):  # ...n't've in both half-spelled forms
        table[f"{pre}nt've"] = table[f"{pre}n'tve"] = f"{pre}n't've"
    for w in ("could", "might", "must", "should", "would", "who", "what", "where"):
        table[f"{w}ve"] = f"{w}'ve"
    table.update({
        "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "itd": "it'd",
        "itll": "it'll", "maam": "ma'am", "notve": "not've", "oclock": "o'clock", "shant": "shan't",
        "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someonell": "someone'll",
        "someones": "someone's", "somethingd": "something'd", "somethingll": "something'll", "thats": "that's",
        "thered": "there'd", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
        "theyre": "they're", "theyve": "they've", "twas": "'twas", "weve": "we've", "whatll": "what'll",
        "whatre": "what're", "whats": "what's", "whens": "when's", "whered": "where'd", "wheres": "where's",
        "whod": "who'd", "wholl": "who'll", "whos": "who's", "whyll": "why'll", "whyre": "why're", "whys": "why's",
        "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
        "let's": "let's", "she's": "she's",
        # "'d've" forms, both half-spelled variants
        "hed've": "he'd've", "he'dve": "he'd've", "itd've": "it'd've", "it'dve": "it'd've",
        "shed've": "she'd've", "she'dve": "she'd've", "somebodyd've": "somebody'd've",
        "somebody'dve": "somebody'd've", "someoned've": "someone'd've", "someone'dve": "someone'd've",
        "somethingd've": "something'd've", "something'dve": "something'd've", "thered've": "there'd've",
        "there'dve": "there'd've", "theyd've": "they'd've", "they'dve": "they'd've", "wed've": "we'd've",
        "we'dve": "we'd've", "whod've": "who'd've", "who'dve": "who'd've", "youd've": "you'd've",
        "you'dve": "you'd've", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
        "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
        "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
        # an entry of the official table that goes the "wrong" way; kept for identical scores
        "somebody'd": "somebodyd",
    })
    return table


CONTRACTIONS = _contractions()


def normalize_answer(answer: str) -> str:
    """The VQAv2 normal form of an answer (see the module docstring for the rules)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)  # the official scripts' count (see step 3)
    words = []
    for w in out.lower().split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_textvqa(answer: str) -> str:
    """The TextVQA normal form (the M4C evaluator's EvalAI answer processor): lower-cased, commas and question
    marks deleted, "'s" split off ("it's" -> "it 's", "red,blue" -> "redblue"), then :func:`normalize_answer`."""
    return normalize_answer(answer.lower().replace(",", "").replace("?", "").replace("'s", " 's"))


def vqa_accuracy(answer: str, human_answers: list[str]) -> float:
    """Soft accuracy of one (normalised) answer against the (normalised) human answers.

    Mean over leave-one-out subsets of ``min(matches among the others / 3, 1)``.
    """
    if not human_answers:
        raise ValueError("need at least one human answer")
    accs = []
    for i in range(len(human_answers)):
        matches = sum(h == answer for j, h in enumerate(human_answers) if j != i)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def _human_answers(humans, path, loc: str, normalize=normalize_answer) -> list[str]:
    """Normalised human answers of one question: a list of strings (TextVQA) or of {"answer": ...} (VQAv2,
    VizWiz)."""
    if not isinstance(humans, list) or not humans:
        raise ScoreInputError(f"{path}: {loc}: 'answers' must be a non-empty list of answers")
    texts = []
    for k, h in enumerate(humans):
        text = h.get("answer") if isinstance(h, dict) else h
        if not isinstance(text, str):
            raise ScoreInputError(f"{path}: {loc}: answers[{k}] is neither a string nor an object with a string "
                                  f"'answer' field")
        texts.append(normalize(text))
    return texts


def _score_soft(gold: dict, rows: list, answers, annotations, allow_missing: bool,
                normalize=normalize_textvqa) -> dict:
    """Mean soft accuracy of ``rows`` (location, question id, reply), each reply put in normal form by
    ``normalize`` (by default as LLaVA-1.5's submission pipeline does, see the module docstring), against ``gold`` (question id -> (normalised human answers, answer type, question type)),
    overall and per answer/question type."""
    got = match_answers(rows, list(gold), answers, annotations, allow_missing)
    if not got:
        raise ScoreInputError(f"{answers}: no answers to score")
    total, by_atype, by_qtype = [], defaultdict(list), defaultdict(list)
    for qid, text in got.items():
        humans, atype, qtype = gold[qid]
        acc = vqa_accuracy(normalize(text), humans)
        total.append(acc)
        by_atype[atype].append(acc)
        by_qtype[qtype].append(acc)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(total), "accuracy": mean(total),
            "per_answer_type": {k: mean(v) for k, v in sorted(by_atype.items())},
            "per_question_type": {k: mean(v) for k, v in sorted(by_qtype.items())},
            "n_missing": len(gold) - len(got)}


def _gold_entry(gold: dict, qid, entry, path, loc: str) -> None:
    if qid in gold:
        raise ScoreInputError(f"{path}: {loc}: duplicate question id {qid!r}")
    gold[qid] = entry


def score_vqav2(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Score a VQAv2 results file against a VQAv2 annotations file."""
    doc = load_json(annotations, "VQAv2 annotations")
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise ScoreInputError(f"{annotations}: expected a JSON object with an 'annotations' list (the VQAv2 "
                              f"annotations file, e.g. v2_mscoco_val2014_annotations.json)")
    gold: dict = {}
    for i, ann in enumerate(doc["annotations"]):
        loc = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise ScoreInputError(f"{annotations}: {loc}: expected a JSON object")
        qid = require(ann, ("question_id",), annotations, loc, "VQAv2 annotation")
        humans = _human_answers(require(ann, ("answers",), annotations, loc, "VQAv2 annotation"), annotations, loc)
        _gold_entry(gold, qid, (humans, label(ann.get("answer_type", "unknown"), annotations, loc, "'answer_type'"),
                                label(ann.get("question_type", "unknown"), annotations, loc, "'question_type'")),
                    annotations, loc)
    rows = [(loc, require(rec, ("question_id",), answers, loc, "VQAv2 result"),
             require(rec, ("answer", "text"), answers, loc, "VQAv2 result"))
            for loc, rec in load_records(answers, "VQAv2 results")]
    return _score_soft(gold, rows, answers, annotations, allow_missing)


def textvqa_records(path: str | Path) -> list[tuple[str, dict]]:
    """(location, record) of a TextVQA file: the official ``{"data": [...]}`` JSON (TextVQA_0.5.1_val.json) or
    LLaVA's question JSONL."""
    doc = load_json(path, "TextVQA") if str(path).endswith(".json") else None
    if isinstance(doc, dict):
        if not isinstance(doc.get("data"), list):
            raise ScoreInputError(f"{path}: expected a JSON object with a 'data' list (TextVQA_0.5.1_val.json)")
        out = []
        for i, rec in enumerate(doc["data"]):
            if not isinstance(rec, dict):
                raise ScoreInputError(f"{path}: data[{i}]: expected a JSON object")
            out.append((f"data[{i}]", rec))
        return out
    return load_records(path, "TextVQA")


OCR_REFERENCE = "Reference OCR token: "
"""What precedes the OCR tokens in a TextVQA question (LLaVA-1.5's ``llava_textvqa_val_v051_ocr.jsonl``)."""


def textvqa_ocr_tokens(path: str | Path) -> dict:
    """image_id -> OCR tokens of a TextVQA OCR file (``TextVQA_Rosetta_OCR_v0.2_val.json``: ``{"data": [{image_id,
    ocr_tokens, ocr_info}]}``); a record's ``ocr_tokens``, else the ``word`` of each of its ``ocr_info`` entries.
    Errors name the file and the record; an image given twice with other tokens is refused."""
    doc = load_json(path, "TextVQA OCR")
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ScoreInputError(f"{path}: expected a JSON object with a 'data' list of {{image_id, ocr_tokens}} "
                              f"(TextVQA_Rosetta_OCR_v0.2_val.json)")
    out: dict = {}
    where: dict = {}
    for i, rec in enumerate(doc["data"]):
        loc = f"data[{i}]"
        if not isinstance(rec, dict):
            raise ScoreInputError(f"{path}: {loc}: expected a JSON object {{image_id, ocr_tokens}}")
        image_id = require(rec, ("image_id",), path, loc, "TextVQA OCR")
        if not isinstance(image_id, str):
            raise ScoreInputError(f"{path}: {loc}: image_id must be a string, got {image_id!r}")
        if "ocr_tokens" in rec:
            tokens, field = rec["ocr_tokens"], "ocr_tokens"
        else:
            info = require(rec, ("ocr_tokens", "ocr_info"), path, loc, "TextVQA OCR")
            if not isinstance(info, list) or not all(isinstance(x, dict) and "word" in x for x in info):
                raise ScoreInputError(f"{path}: {loc}: ocr_info must be a list of objects with a 'word'")
            tokens, field = [x["word"] for x in info], "ocr_info words"
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ScoreInputError(f"{path}: {loc}: {field} must be a list of strings, got {tokens!r:.200}")
        if image_id in out and out[image_id] != tokens:
            raise ScoreInputError(f"{path}: {loc}: image_id {image_id!r} is given again with other tokens (first in "
                                  f"{where[image_id]})")
        out[image_id] = tokens
        where.setdefault(image_id, loc)
    return out


def textvqa_with_ocr(question: str, tokens: list[str]) -> str:
    """A TextVQA question with its image's OCR tokens on the next line, as LLaVA-1.5's question file has them
    ("<Question>\\nReference OCR token: tok1, tok2, ..."; the question alone when there are none), its first letter
    upper-cased as there (the official file's questions are lower-case: "what is the brand of this camera?" is
    asked "What is the brand of this camera?")."""
    question = question[:1].upper() + question[1:]
    return f"{question}\n{OCR_REFERENCE}{', '.join(tokens)}" if tokens else question


def score_textvqa(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Score TextVQA answers (``question_id`` + ``answer``/``text``) against TextVQA_0.5.1_val.json.

    The TextVQA metric is VQAv2's soft accuracy over its ten human answers, given as plain strings, with the
    answer normalisation of the TextVQA/M4C evaluator (:func:`normalize_textvqa`) on both sides."""
    gold: dict = {}
    by_image_question: dict = {}  # (image_id, question lower-cased) -> question_id: LLaVA's matching
    for loc, rec in textvqa_records(annotations):
        qid = require(rec, ("question_id",), annotations, loc, "TextVQA annotation")
        humans = _human_answers(require(rec, ("answers",), annotations, loc, "TextVQA annotation"), annotations,
                                loc, normalize_textvqa)
        _gold_entry(gold, qid, (humans, "textvqa", "textvqa"), annotations, loc)
        if isinstance(rec.get("image_id"), str) and isinstance(rec.get("question"), str):
            by_image_question[(rec["image_id"], rec["question"].lower())] = qid
    rows = []
    for loc, rec in load_records(answers, "TextVQA results"):
        qid = require(rec, ("question_id",), answers, loc, "TextVQA result")
        if qid not in gold and isinstance(rec.get("prompt"), str):
            # asked from LLaVA's question JSONL, whose question_id is the image's (a repeat "<id>#k"): matched as
            # LLaVA's eval_textvqa.py matches it, by the image and the question read off the prompt
            question = llava_textvqa_question(rec["prompt"])
            qid = by_image_question.get((str(qid).split("#")[0], question), qid) if question is not None else qid
        rows.append((loc, qid, require(rec, ("answer", "text"), answers, loc, "TextVQA result")))
    return _score_soft(gold, rows, answers, annotations, allow_missing, normalize_textvqa)


def llava_textvqa_question(prompt: str) -> str | None:
    """The question of a TextVQA prompt, lower-cased, by the rule of LLaVA-1.5's ``eval_textvqa.py``: from
    "OCR tokens: ... Question: <q> Short answer:", or the first line of "<q>\nReference OCR token: ...\n<instruction>"
    (the second when the OCR line comes first), or of "<q>\n<instruction>"; None for another shape."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt)
        question = m.group(1) if m else None
    elif OCR_REFERENCE in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(OCR_REFERENCE.strip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def vizwiz_records(path: str | Path) -> list[tuple[str, dict]]:
    """(location, record) of a VizWiz annotations file (val.json: a list of {image, question, answers, ...})."""
    doc = load_json(path, "VizWiz")
    if not isinstance(doc, list):
        raise ScoreInputError(f"{path}: expected a JSON list of {{image, question, answers}} (VizWiz val.json)")
    out = []
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            raise ScoreInputError(f"{path}: [{i}]: expected a JSON object")
        out.append((f"[{i}]", rec))
    return out


def score_vizwiz(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Score VizWiz answers against VizWiz's val.json: VQA soft accuracy over its ten answers per question,
    "unanswerable" included (the model should say so when the picture cannot answer the question).

    A question is identified by its image file name: answers carry ``image`` (the official submission format)
    or ``question_id`` (what ``emma-mamba eval`` writes: the name as the annotations give it; it wins when both are
    present). Per answer type (yes/no, number,
    other, unanswerable) and per answerability (the ``answerable`` flag) means are reported too."""
    gold: dict = {}
    for loc, rec in vizwiz_records(annotations):
        image = require(rec, ("image",), annotations, loc, "VizWiz annotation")
        humans = _human_answers(require(rec, ("answers",), annotations, loc, "VizWiz annotation"), annotations, loc)
        answerable = {1: "answerable", 0: "unanswerable"}.get(rec.get("answerable"), "unknown")
        _gold_entry(gold, image, (humans, label(rec.get("answer_type", "unknown"), annotations, loc, "'answer_type'"),
                                  answerable), annotations, loc)
    rows = [(loc, require(rec, ("question_id", "image"), answers, loc, "VizWiz result"),
             require(rec, ("answer", "text"), answers, loc, "VizWiz result"))
            for loc, rec in load_records(answers, "VizWiz results")]
    m = _score_soft(gold, rows, answers, annotations, allow_missing)
    m["per_answerability"] = m.pop("per_question_type")
    return m
