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
anything else is unparsed and wrong. A reply that names another option letter beside the one found ("A or B",
"B, C", "The answer is C or D", "B" then "C" on the next line) picks none, as MMBench's evaluator reads it
(VLMEvalKit's ``can_infer_option`` infers a letter only when the reply names exactly one); the options' own texts
are taken out before counting, and "A" followed by a lower-case word is the article ("B. A red car" picks B).
(MMBench's own evaluator falls back to a GPT judge for free-form replies; with a short-answer prompt the rules
above cover what a tuned model says.)

Submission (:func:`mmbench_submission`, :func:`write_run_submission`): the test splits hold no answers; MMBench's
evaluation server (VLMEvalKit's evaluator) scores a file with every row of the TSV (its CircularEval copies too),
the TSV's columns but ``image``, and ``prediction``, the option letter picked for that row's options. A run writes
it as ``mmbench_submission.xlsx`` (:mod:`emma_mamba.eval.xlsx`, no pandas needed) with a ``.tsv`` twin (the
server takes either; the TSV is plain text to read and diff, and has no per-cell limit) once every question is
answered; ``emma-mamba score --task mmbench --submission F.xlsx`` writes it from an answers file.
"""

from __future__ import annotations

import base64
import binascii
import csv
import logging
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, load_records, require

log = logging.getLogger(__name__)

__all__ = ["MMBenchItem", "read_mmbench", "rotated_options", "mmbench_prompt", "parse_choice", "score_mmbench",
           "MC_PROMPT", "MC_PROMPT_CN", "LANGS", "mmbench_lang", "round_id", "MMBenchSubmission",
           "mmbench_submission", "write_mmbench_submission", "write_run_submission", "SUBMISSION_FILE",
           "SUBMISSION_TSV"]

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
    return _items(p, _read_table(p)[1])


def _read_table(p: Path) -> tuple[list[str], list[tuple[str, int, dict]]]:
    """An MMBench TSV's header (its column names in order) and rows ``(where, index, row)``, the cells as written."""
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
    return list(reader.fieldnames), rows


def _question_of(index: int, indexes) -> int:
    """The index of the question a row asks: itself, or for a CircularEval copy (``index + k * CIRCULAR_STRIDE``
    where the file holds ``index``) the copied question's."""
    return index % CIRCULAR_STRIDE if index >= CIRCULAR_STRIDE and index % CIRCULAR_STRIDE in indexes else index


def _row_options(row: dict) -> list[str]:
    """A row's option texts under A, B, ... up to the first empty one."""
    options = [_cell(row, c) for c in LETTERS[:4]]  # MMBench's option columns
    k = next((i for i, o in enumerate(options) if o is None), len(options))
    return options[:k]


def _items(p: Path, rows: list[tuple[str, int, dict]]) -> list[MMBenchItem]:
    """The questions of :func:`_read_table`'s rows (CircularEval copies dropped), images decoded."""
    seen = {index for _, index, _ in rows}
    pictures = {str(index): (row.get("image") or "").strip() for _, index, row in rows}
    items = []
    for where, index, row in rows:
        if _question_of(index, seen) != index:
            continue  # a CircularEval copy of the question at index % CIRCULAR_STRIDE (asked in every rotation)
        options = [_cell(row, c) for c in LETTERS[:4]]  # MMBench's option columns
        k = len(_row_options(row))
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


# an upper-case letter standing alone ("A or B", "答案是B"), not inside a word, a number or "A's"
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'’])([A-H])(?![A-Za-z0-9'’])")
# "A" starting a phrase ("A red car") is the article, unless a conjunction follows it ("A or B", "A and C")
_ARTICLE_A = re.compile(r"A\s+(?!(?:or|and|nor|vs|versus)\b)[a-z]")


def _other_letters(reply: str, options: list[str], letter: str) -> set[str]:
    """Option letters other than ``letter`` that ``reply`` names on their own, once the options' texts are taken
    out of it (so that "B. A red car", option B being "A red car", names only B)."""
    rest = reply
    for o in sorted((o.strip() for o in options), key=len, reverse=True):
        if len(o) > 1:
            rest = re.sub(rf"(?<!\w){re.escape(o)}(?!\w)", " opt ", rest, flags=re.IGNORECASE)  # still a word
    named = {m.group(1) for m in _STANDALONE.finditer(rest)
             if not (m.group(1) == "A" and _ARTICLE_A.match(rest, m.start()))}
    return (named & set(LETTERS[:len(options)])) - {letter}


def parse_choice(reply: str, options: list[str]) -> str | None:
    """The letter a reply picks among ``options`` (shown as A, B, ...), or None (see the module docstring)."""
    k = len(options)
    letter = None
    m = _LEAD.match(reply)
    if m and LETTERS.index(m.group(1)) < k:
        letter = m.group(1)
    if letter is None:
        m = _ANSWER_IS.search(reply)
        if m and (m.group(1) or m.group(2)).upper() in LETTERS[:k]:
            letter = (m.group(1) or m.group(2)).upper()
    if letter is None:
        m = _ANSWER_IS_CN.search(reply)
        if m and m.group(1) in LETTERS[:k]:
            letter = m.group(1)
    if letter is not None:
        # a reply naming another option letter too ("A or B", "B, C", "The answer is C or D") picks none, as
        # MMBench's evaluator (VLMEvalKit's can_infer_option: exactly one letter) reads it
        return None if _other_letters(reply, options, letter) else letter
    norm = lambda t: re.sub(r"[\s\.\,\!\?;:]+$", "", t.strip()).lower()  # noqa: E731
    hits = [LETTERS[i] for i, o in enumerate(options) if norm(o) == norm(reply)]
    return hits[0] if len(hits) == 1 else None


def _round_answers(answers: str | Path, items: dict, annotations: str | Path) -> dict:
    """``(index, round) -> reply`` of an answers file (JSONL/JSON records ``{"question_id": "<index>/<round>",
    "text" or "answer" or "prediction": reply}``) for the questions ``items`` (index -> :class:`MMBenchItem`) of
    ``annotations``; every answered question must have every round answered."""
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
    partial = [i for i, it in items.items() if any((i, r) in got for r in range(len(it.options)))
               and not all((i, r) in got for r in range(len(it.options)))]
    if partial:
        raise ScoreInputError(f"{answers}: question(s) {partial[:5]} have answers for some circular rounds only; "
                              f"every round of a question is needed")
    return got


def score_mmbench(answers: str | Path, annotations: str | Path, allow_missing: bool = False) -> dict:
    """Circular and first-round accuracy of ``answers`` (JSONL/JSON records ``{"question_id": "<index>/<round>",
    "text" or "answer": reply}``, every round of a question) against an MMBench TSV with answers."""
    items = {it.index: it for it in read_mmbench(annotations)}
    if any(it.answer is None for it in items.values()):
        raise ScoreInputError(f"{annotations}: has no 'answer' for some questions (a test split?): score it on "
                              f"MMBench's server instead (`emma-mamba score --task mmbench --submission F.xlsx` "
                              f"writes the file it takes)")
    got = _round_answers(answers, items, annotations)
    answered = [i for i, it in items.items() if all((i, r) in got for r in range(len(it.options)))]
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


# ---------------------------------------------------------------------------------------- the submission file

SUBMISSION_FILE = "mmbench_submission.xlsx"
"""The file MMBench's evaluation server takes, as a run writes it in its output folder (the TSV twin beside it:
:data:`SUBMISSION_TSV`)."""
SUBMISSION_TSV = "mmbench_submission.tsv"
SUBMISSION_DROPPED = ("image", "prediction")
"""Columns of the questions TSV left out of the submission: the base64 pictures (hundreds of megabytes of text in
all, a picture often past Excel's 32,767 characters per cell; VLMEvalKit's prediction files, the format the server
asks for, drop them too, and the server reads none) and a ``prediction`` column the file may already hold (this
run's is appended)."""


@dataclass
class MMBenchSubmission:
    """The rows of an MMBench submission (:func:`mmbench_submission`)."""

    columns: list[str]
    """The questions TSV's columns in its order, less :data:`SUBMISSION_DROPPED`, then ``prediction``."""
    rows: list[list]
    """One per row of the TSV, its CircularEval copies included, in the file's order: ``index`` an int, the other
    cells as the TSV has them (None where empty), the prediction last (None for a question not answered)."""
    n_questions: int
    """Questions of the file (CircularEval copies not counted)."""
    missing: list[int]
    """The indexes of the questions without answers (a ``--limit`` run: the file is then not complete)."""
    n_unparsed: int
    """Rows whose reply picks no option letter (:func:`parse_choice`): their prediction is the reply itself, for
    the server's own answer matching to read."""
    n_by_text: int
    """CircularEval copy rows whose options are no rotation asked (not met in MMBench's files): their prediction is
    the letter of the first round's chosen option text among the row's options."""
    has_answers: bool
    """Whether the TSV holds the answers (a dev split), so that ``emma-mamba score`` can score it too."""

    @property
    def complete(self) -> bool:
        return not self.missing


def mmbench_submission(answers: str | Path, questions: str | Path) -> MMBenchSubmission:
    """The submission rows of ``answers`` (as :func:`score_mmbench` reads them) to the questions TSV ``questions``.

    Every row of the TSV is a row of the submission, as MMBench's server (VLMEvalKit's evaluator) scores them: the
    question at ``index`` and each CircularEval copy at ``index + k * 1000000``, with the TSV's columns (less the
    image) and ``prediction``, the option letter the reply to that row's options picks: the question's own row
    takes round 0's reply (the options un-rotated, as in the file), a copy the reply of the round that showed its
    options in its order (round k for MMBench's copies). A reply that picks no letter is the prediction as it is."""
    p = Path(questions)
    columns, table = _read_table(p)
    items = {it.index: it for it in _items(p, table)}
    got = _round_answers(answers, items, questions)
    indexes = {index for _, index, _ in table}
    missing = [i for i, it in items.items() if (i, 0) not in got]
    keep = [c for c in columns if c not in SUBMISSION_DROPPED]
    rows, unparsed, by_text = [], 0, 0
    for _, index, row in table:
        it = items[_question_of(index, indexes)]
        prediction = None
        if (it.index, 0) in got:
            shown = _row_options(row)
            r = next((r for r in range(len(it.options)) if rotated_options(it, r) == shown), None)
            if r is not None:
                reply = got[(it.index, r)]
                letter = parse_choice(reply, shown)
            else:  # options in an order no round showed: the first round's pick, by its text
                by_text += 1
                reply = got[(it.index, 0)]
                letter = parse_choice(reply, it.options)
                text = it.options[LETTERS.index(letter)] if letter is not None else None
                letter = LETTERS[shown.index(text)] if text in shown else None
            unparsed += letter is None
            prediction = letter if letter is not None else reply.strip() or None
        rows.append([index if c == "index" else (row.get(c) or None) for c in keep] + [prediction])
    return MMBenchSubmission(keep + ["prediction"], rows, len(items), missing, unparsed, by_text,
                             all(it.answer is not None for it in items.values()))


def _tsv_field(v) -> str:
    """A TSV cell (quoted as pandas' and csv's readers read it where it holds a tab, newline or quote)."""
    s = "" if v is None else str(v)
    return '"' + s.replace('"', '""') + '"' if any(ch in s for ch in '\t\n\r"') else s


def write_mmbench_submission(sub: MMBenchSubmission, xlsx: str | Path | None, tsv: str | Path | None = None, *,
                             inputs=()) -> None:
    """Write a complete submission as ``xlsx`` (:func:`emma_mamba.eval.xlsx.write_xlsx`) and/or ``tsv`` (both are
    taken by MMBench's server). An incomplete one (:attr:`MMBenchSubmission.missing`) is refused: the server scores
    every question of the split, an unanswered one as wrong; so is a file name that is one of ``inputs`` (the
    questions TSV, the answers: ``--submission MMBench_TEST_EN.xlsx`` beside ``MMBench_TEST_EN.tsv`` would replace
    the questions by its TSV twin). The TSV is written first, so that it is there even where a cell is past Excel's
    limit (:class:`~emma_mamba.eval.xlsx.XlsxError`, naming the row's index)."""
    from emma_mamba.eval.xlsx import XlsxError, write_xlsx

    if not sub.complete:
        raise ScoreInputError(f"no submission file: {len(sub.missing)} of {sub.n_questions} questions have no answer "
                              f"(first: {sub.missing[:5]}); MMBench's server scores every question of the file")
    taken = {Path(f).resolve() for f in inputs}
    for f in (xlsx, tsv):
        if f is not None and Path(f).resolve() in taken:
            raise ScoreInputError(f"no submission file: writing {f} would replace an input file; choose another "
                                  f"name")
    if tsv is not None:
        Path(tsv).parent.mkdir(parents=True, exist_ok=True)
        text = "".join("\t".join(map(_tsv_field, r)) + "\n" for r in [sub.columns, *sub.rows])
        tmp = Path(tsv).with_name(f".{Path(tsv).name}.tmp")
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.replace(tsv)
    if xlsx is not None:
        Path(xlsx).parent.mkdir(parents=True, exist_ok=True)
        try:
            write_xlsx(xlsx, sub.columns, sub.rows, sheet_name="MMBench")
        except XlsxError as e:
            if e.row is None or e.row < 2:
                raise
            index = sub.rows[e.row - 2][sub.columns.index("index")] if "index" in sub.columns else None
            raise XlsxError(f"{xlsx}: {e} (MMBench index {index})", e.row, e.column) from None


def write_run_submission(out_dir: str | Path, answers: str | Path, questions: str | Path) -> dict:
    """After an MMBench run into ``out_dir``: its :data:`SUBMISSION_FILE` and :data:`SUBMISSION_TSV` when every
    question is answered; a ``--limit`` run (or a subset answered) writes none, says so in the log, and removes such
    files an earlier run may have left, so none in the folder is a stale one. What was written, for metrics.json:
    ``{"written", "xlsx", "tsv", "rows", "n_unparsed", ...}`` (``reason`` where not written, ``error`` where the
    xlsx could not be written and only the TSV was)."""
    from emma_mamba.eval.xlsx import XlsxError

    out = Path(out_dir)
    xlsx, tsv = out / SUBMISSION_FILE, out / SUBMISSION_TSV
    sub = mmbench_submission(answers, questions)
    if not sub.complete:
        for f in (xlsx, tsv):
            f.unlink(missing_ok=True)
        reason = (f"{sub.n_questions - len(sub.missing)} of {sub.n_questions} questions answered; MMBench's server "
                  f"scores every question (an unanswered one as wrong)")
        log.warning("mmbench: no submission file (%s): answer all of them (a rerun without --limit into the same "
                    "folder answers the rest) to have %s written", reason, xlsx)
        return {"written": False, "reason": reason}
    report = {"written": True, "xlsx": str(xlsx), "tsv": str(tsv), "rows": len(sub.rows),
              "n_questions": sub.n_questions, "n_unparsed": sub.n_unparsed}
    if sub.n_by_text:
        report["n_copies_by_text"] = sub.n_by_text
    try:
        write_mmbench_submission(sub, xlsx, tsv, inputs=(questions, answers))
    except XlsxError as e:
        xlsx.unlink(missing_ok=True)
        log.error("mmbench: %s: the .xlsx submission could not be written; %s holds the same rows (MMBench's server "
                  "takes .tsv too)", e, tsv)
        report.update(xlsx=None, error=str(e))
        return report
    log.info("mmbench: submission file for MMBench's evaluation server: %s (%d rows; the same as %s)", xlsx,
             len(sub.rows), tsv.name)
    if sub.n_unparsed:
        log.warning("mmbench: %d of %d submission rows have a reply that picks no option letter: their prediction "
                    "is the reply itself", sub.n_unparsed, len(sub.rows))
    return report
