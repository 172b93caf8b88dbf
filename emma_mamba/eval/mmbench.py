"""MMBench (Liu et al. 2023): multiple-choice questions, scored with circular evaluation.

File: the official TSV (``MMBench_DEV_EN.tsv``, ``MMBench_TEST_EN.tsv``, ``mmbench_dev_20230712.tsv``, ...), one
row per question pass with the columns ``index, question, hint, A, B, C, D, answer, category, l2-category, image``
(``image``: the picture as base64, or in VLMEvalKit's files the index of another row whose picture it shares;
``hint`` and unused options empty or ``nan``; ``answer`` absent or empty on test splits). The released files
already hold MMBench's CircularEval passes: question ``i`` at index ``i`` and its options shifted at
``i + 1000000``, ``i + 2000000``, ... (grouped by ``index % 1000000``, as MMBench's and VLMEvalKit's evaluators
do). Those copies are dropped here, the question at ``i`` being asked in every rotation below, so each question
is asked once per rotation and scored once.

Circular evaluation (MMBench's "CircularEval"): a question with k options is asked k times, its options
rotated by one place each time (round r shows the original options r, r+1, ... under the letters A, B, ...);
it counts as correct only if every round is answered correctly. The first round alone is the "vanilla"
accuracy, reported too.

Prompt (LLaVA-1.5's MMBench evaluation): ``[hint\\n]question\\nA. ...\\nB. ...`` then "Answer with the option's
letter from the given choices directly." on its own line; for MMBench-CN (``MMBench_DEV_CN.tsv``, ...) the Chinese
instruction "请直接回答选项字母。" (:data:`MC_PROMPT_CN`) instead, as LLaVA-1.5's ``mmbench_cn.sh`` asks it
(``model_vqa_mmbench.py --lang cn``). The language is the file's: ``lang="auto"`` (:func:`mmbench_lang`) takes a
file whose questions mostly hold Chinese characters (in the question, hint or options) for MMBench-CN, the whole
file asked in one language as LLaVA's flag does (VLMEvalKit decides per question instead).

Reading a reply (:func:`parse_choice`): a leading option letter ("B", "B.", "(B)", "B) text", and the full-width
forms "（B）", "B。"), else "answer is B" / "Answer: B" (a lower-case letter only at the reply's end: "The answer
is a dog." picks no option) or, in Chinese, "答案是B" / "答案：B" / "选项B" / "应选B", else a reply equal to exactly
one option's text (case and surrounding punctuation ignored);
anything else is unparsed and wrong. (MMBench's own evaluator falls back to a GPT judge for free-form
replies; with a short-answer prompt the rules above cover what a tuned model says.)
"""

from __future__ import annotations

import base64
import binascii
import csv
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, load_records, require

__all__ = ["MMBenchItem", "read_mmbench", "rotated_options", "mmbench_prompt", "parse_choice", "score_mmbench",
           "MC_PROMPT", "MC_PROMPT_CN", "LANGS", "mmbench_lang", "round_id"]

MC_PROMPT = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's multiple-choice instruction."""
MC_PROMPT_CN = "请直接回答选项字母。"
"""LLaVA-1.5's multiple-choice instruction for MMBench-CN (``model_vqa_mmbench.py --lang cn``)."""
LANGS = ("auto", "en", "cn")
"""The language an MMBench file is asked in (``lang``): auto (:func:`mmbench_lang`), English or Chinese."""
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
"""CJK ideographs (the unified blocks, extension A, the compatibility block)."""
LETTERS = "ABCDEFGH"
"""Option letters, in order (MMBench and SEED use A-D, ScienceQA up to E)."""
_EMPTY = ("", "nan", "none")
CIRCULAR_STRIDE = 1_000_000
"""MMBench's TSVs put a question's CircularEval copies at index + k * CIRCULAR_STRIDE."""
_IMAGE_REF_MAX = 64
"""An image cell this short is the index of the row whose picture it shares (VLMEvalKit's TSVs)."""


@dataclass
class MMBenchItem:
    index: int
    question: str
    hint: str | None
    options: list[str]
    """Option texts in the file's order (A, B, ...), empty ones dropped (they are always the last ones)."""
    answer: str | None
    """The correct letter of the file's order, None on test splits."""
    category: str
    l2_category: str
    image: bytes
    """The picture, decoded from the file's base64 (any format PIL reads)."""


def _cell(row: dict, key: str) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    v = v.strip()
    return None if v.lower() in _EMPTY else v


def read_mmbench(path: str | Path) -> list[MMBenchItem]:
    """The questions of an MMBench TSV, images decoded; errors name the file and row."""
    p = Path(path)
    if not p.is_file():
        raise ScoreInputError(f"MMBench file {p} does not exist")
    csv.field_size_limit(sys.maxsize)  # base64 images are larger than csv's default field limit
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("index", "question", "A", "B", "image") if c not in (reader.fieldnames or [])]
        if missing:
            raise ScoreInputError(f"{p}: not an MMBench TSV: no column(s) {missing} (header: {reader.fieldnames})")
        rows, seen = [], set()
        for n, row in enumerate(reader, 2):  # line 1 is the header
            where = f"{p}: row {n}"
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                raise ScoreInputError(f"{where}: index {row['index']!r} is not an integer") from None
            if index in seen:
                raise ScoreInputError(f"{where}: duplicate index {index}")
            seen.add(index)
            rows.append((where, index, row))
    pictures = {str(index): (row.get("image") or "").strip() for _, index, row in rows}
    items = []
    for where, index, row in rows:
        if index >= CIRCULAR_STRIDE and index % CIRCULAR_STRIDE in seen:
            continue  # a CircularEval copy of the question at index % CIRCULAR_STRIDE (asked in every rotation)
        options = [_cell(row, c) for c in LETTERS[:4]]  # MMBench's option columns
        k = next((i for i, o in enumerate(options) if o is None), len(options))
        if k < 2 or any(o is not None for o in options[k:]):
            raise ScoreInputError(f"{where}: options must be A, B and optionally C, D in order, got "
                                  f"{[c for c, o in zip(LETTERS, options) if o is not None]}")
        answer = _cell(row, "answer")
        if answer is not None and answer not in LETTERS[:k]:
            raise ScoreInputError(f"{where}: answer {answer!r} is not one of the options {list(LETTERS[:k])}")
        picture = pictures[str(index)]
        if len(picture) <= _IMAGE_REF_MAX and pictures.get(picture, picture) != picture:
            picture = pictures[picture]  # the index of the row holding the same picture
        try:
            image = base64.b64decode(picture, validate=True)
        except (binascii.Error, ValueError):
            raise ScoreInputError(f"{where}: the image column is not valid base64 (nor the index of another "
                                  f"row)") from None
        if not image:
            raise ScoreInputError(f"{where}: empty image")
        question = _cell(row, "question")
        if question is None:
            raise ScoreInputError(f"{where}: empty question")
        items.append(MMBenchItem(index, question, _cell(row, "hint"), options[:k], answer,
                                 _cell(row, "category") or "unknown", _cell(row, "l2-category") or "unknown",
                                 image))
    if not items:
        raise ScoreInputError(f"{p}: no questions")
    return items


def rotated_options(item: MMBenchItem, round_: int) -> list[str]:
    """The option texts shown under A, B, ... in circular round ``round_``."""
    k = len(item.options)
    return [item.options[(round_ + i) % k] for i in range(k)]


def mmbench_prompt(item: MMBenchItem, round_: int) -> str:
    """The question text of a round: hint, question, lettered options (the MC instruction comes after)."""
    lines = ([item.hint] if item.hint else []) + [item.question]
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(rotated_options(item, round_))]
    return "\n".join(lines)


def mmbench_lang(items: list[MMBenchItem], lang: str = "auto") -> str:
    """The language ("en" or "cn") ``items`` are asked in: ``lang`` itself when "en" or "cn"; with "auto", "cn" when
    more than half of the questions hold a CJK ideograph in their question, hint or options (MMBench-CN), else
    "en"."""
    if lang not in LANGS:
        raise ScoreInputError(f"MMBench language must be one of {list(LANGS)}, got {lang!r}")
    if lang != "auto":
        return lang
    chinese = sum(any(_CJK.search(t) for t in [it.question, it.hint or "", *it.options]) for it in items)
    return "cn" if 2 * chinese > len(items) else "en"


def round_id(index: int, round_: int) -> str:
    """The question id of one circular round, as the runner writes it: "<index>/<round>"."""
    return f"{index}/{round_}"


_LEAD = re.compile(r"^\s*[\(\[（]?([A-H])(?:[\)\]\.:,）。：，、]|\s|$)")  # full-width forms for MMBench-CN
# a lower-case letter only when it ends the reply ("Answer: c"), so that "The answer is a dog." picks nothing
_ANSWER_IS = re.compile(r"(?i:(?:answer|option)(?:\s+is)?)\s*[:：]?\s*[\(\[]?(?:([A-H])\b|([a-h])[\)\]\.]?\s*$)")
# MMBench-CN replies: "答案是B", "答案：(B)", "选项 B", "应选B。", "选择C" (an upper-case letter not followed by
# another Latin letter, so "选项Bright" picks nothing)
_ANSWER_IS_CN = re.compile(r"(?:答案|选项|选择|应选|选)\s*(?:应该|应)?\s*(?:是|为)?\s*[:：]?\s*[\(\[（]?([A-H])(?![A-Za-z])")


def parse_choice(reply: str, options: list[str]) -> str | None:
    """The letter a reply picks among ``options`` (shown as A, B, ...), or None (see the module docstring)."""
    k = len(options)
    m = _LEAD.match(reply)
    if m and LETTERS.index(m.group(1)) < k:
        return m.group(1)
    m = _ANSWER_IS.search(reply)
    if m and (m.group(1) or m.group(2)).upper() in LETTERS[:k]:
        return (m.group(1) or m.group(2)).upper()
    m = _ANSWER_IS_CN.search(reply)
    if m and m.group(1) in LETTERS[:k]:
        return m.group(1)
    norm = lambda t: re.sub(r"[\s\.\,\!\?;:]+$", "", t.strip()).lower()  # noqa: E731
    hits = [LETTERS[i] for i, o in enumerate(options) if norm(o) == norm(reply)]
    return hits[0] if len(hits) == 1 else None


def score_mmbench(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Circular and first-round accuracy of ``answers`` (JSONL/JSON records ``{"question_id": "<index>/<round>",
    "text" or "answer": reply}``, every round of a question) against an MMBench TSV with answers."""
    items = {it.index: it for it in read_mmbench(annotations)}
    if any(it.answer is None for it in items.values()):
        raise ScoreInputError(f"{annotations}: has no 'answer' for some questions (a test split?): score it on "
                              f"MMBench's server instead")
    got: dict = {}
    for loc, rec in load_records(answers, "MMBench answers"):
        qid = require(rec, ("question_id",), answers, loc, "MMBench answer")
        text = require(rec, ("text", "answer", "prediction"), answers, loc, "MMBench answer")
        try:
            index, round_ = (int(x) for x in str(qid).split("/"))
        except ValueError:
            raise ScoreInputError(f"{answers}: {loc}: question_id {qid!r} is not '<index>/<round>'") from None
        it = items.get(index)
        if it is None or not 0 <= round_ < len(it.options):
            raise ScoreInputError(f"{answers}: {loc}: question {qid!r} is not in {annotations}")
        if (index, round_) in got:
            raise ScoreInputError(f"{answers}: {loc}: second answer for {qid!r}")
        if not isinstance(text, str):
            raise ScoreInputError(f"{answers}: {loc}: the answer must be a string, got {type(text).__name__}")
        got[(index, round_)] = text
    answered = [i for i, it in items.items() if all((i, r) in got for r in range(len(it.options)))]
    partial = [i for i, it in items.items() if any((i, r) in got for r in range(len(it.options)))
               and i not in answered]
    if partial:
        raise ScoreInputError(f"{answers}: question(s) {partial[:5]} have answers for some circular rounds only; "
                              f"every round of a question is needed")
    if not answered:
        raise ScoreInputError(f"{answers}: no answers to score")
    if not allow_missing and len(answered) < len(items):
        missing = [i for i in items if i not in answered]
        raise ScoreInputError(f"{answers}: no answer for {len(missing)} of {len(items)} questions of {annotations} "
                              f"(first: {missing[:5]}); pass allow_missing=True (--allow-missing) to score the rest")
    circular, first, unparsed = {}, {}, 0
    for i in answered:
        it = items[i]
        ok = []
        for r in range(len(it.options)):
            shown = rotated_options(it, r)
            letter = parse_choice(got[(i, r)], shown)
            unparsed += letter is None
            # correct iff the picked text is the original correct option's text
            ok.append(letter is not None and shown[LETTERS.index(letter)] == it.options[LETTERS.index(it.answer)])
        circular[i], first[i] = all(ok), ok[0]
    by_cat, by_l2 = defaultdict(list), defaultdict(list)
    for i in answered:
        by_cat[items[i].category].append(circular[i])
        by_l2[items[i].l2_category].append(circular[i])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(answered), "accuracy": mean(list(circular.values())),
            "accuracy_first_round": mean(list(first.values())),
            "per_category": {k: mean(v) for k, v in sorted(by_cat.items())},
            "per_l2_category": {k: mean(v) for k, v in sorted(by_l2.items())},
            "n_unparsed_replies": unparsed, "n_missing": len(items) - len(answered)}
