"""Reading answer and annotation files with errors that name the file and the line or record at fault."""

from __future__ import annotations

import json
from pathlib import Path

from emma_mamba.fileio import text_lines


class ScoreInputError(ValueError):
    """A scorer input file is missing, malformed, or does not match its annotations."""


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 is named with the first byte at fault."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ScoreInputError(f"{path}: line {line}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at byte "
                              f"offset {e.start}); expected the {what} file in UTF-8") from None


def load_json(path: str | Path, what: str):
    """The parsed JSON document at ``path`` (``what`` names the file's role in error messages)."""
    p = Path(path)
    if not p.is_file():
        raise ScoreInputError(f"{what} file {p} does not exist")
    try:
        return json.loads(read_text(p, what))
    except json.JSONDecodeError as e:
        raise ScoreInputError(f"{p}: {json_position(e)}: not valid JSON ({e.msg}); expected the {what} "
                              f"file") from None


def json_position(e: json.JSONDecodeError) -> str:
    """Where in a document ``e`` happened: "line 1, column 52311 (character 52310)" (0-based character offset)."""
    return f"line {e.lineno}, column {e.colno} (character {e.pos})"


def load_records(path: str | Path, what: str) -> list[tuple[str, dict]]:
    """Records of a JSON list or of a JSONL file, each with its location ("line 7" or "record 7", 1-based).

    A file that parses as one JSON list is a list of records (the VQAv2/GQA results format); anything else
    is read as JSON Lines (POPE and LLaVA answer files), blank lines skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise ScoreInputError(f"{what} file {p} does not exist")
    text = read_text(p, what)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, list):
        out = []
        for i, rec in enumerate(doc, 1):
            if not isinstance(rec, dict):
                raise ScoreInputError(f"{p}: record {i}: expected a JSON object, got {type(rec).__name__}")
            out.append((f"record {i}", rec))
        return out
    out = []
    for n, line in enumerate(text_lines(text), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScoreInputError(f"{p}: line {n}, column {e.colno} (character {e.pos} of the line): not valid "
                                  f"JSON ({e.msg}); expected one JSON object per line in the {what} file") from None
        if not isinstance(rec, dict):
            raise ScoreInputError(f"{p}: line {n}: expected a JSON object, got {type(rec).__name__}")
        out.append((f"line {n}", rec))
    return out


_ID_KEYS = frozenset(("question_id", "questionId", "id", "image", "index"))


def require(rec: dict, keys: tuple[str, ...], path, loc: str, what: str):
    """The value of the first of ``keys`` present in ``rec``; a clear error naming file and line otherwise."""
    for k in keys:
        if k in rec:  # an id is looked up and compared: a string or a number, as a grouping label
            return label(rec[k], path, loc, f"{what} record's {k!r}") if k in _ID_KEYS else rec[k]
    names = " or ".join(repr(k) for k in keys)
    raise ScoreInputError(f"{path}: {loc}: {what} record has no {names} field (keys: {sorted(rec)})")


def label(value, path, loc: str, what: str):
    """A record's grouping value (a question type, subject, ...): a string or a number (or None: absent); a list or
    an object is refused naming the record (it cannot key a per-group mean)."""
    if isinstance(value, (list, dict)):
        raise ScoreInputError(f"{path}: {loc}: {what} must be a string or a number, got {type(value).__name__} "
                              f"{json.dumps(value)[:60]}")
    return value


def match_answers(answers: list[tuple[str, object, str]], gold_ids: list, answers_path, gold_path,
                  allow_missing: bool) -> dict:
    """Map question id -> answer text; every answer must be for a known question, at most once.

    ``answers`` holds (location, question id, answer text). Unless ``allow_missing``, every gold question must
    have an answer.
    """
    known = set(gold_ids)
    got: dict = {}
    for loc, qid, text in answers:
        if qid not in known:
            raise ScoreInputError(f"{answers_path}: {loc}: question id {qid!r} is not in the annotations {gold_path}")
        if qid in got:
            raise ScoreInputError(f"{answers_path}: {loc}: second answer for question id {qid!r}")
        if not isinstance(text, str):
            raise ScoreInputError(f"{answers_path}: {loc}: the answer must be a string, got {type(text).__name__}")
        got[qid] = text
    if not allow_missing and len(got) < len(known):
        missing = [q for q in gold_ids if q not in got]
        raise ScoreInputError(f"{answers_path}: no answer for {len(missing)} of {len(known)} questions of {gold_path} "
                              f"(first: {missing[:5]}); to score the answered ones only, pass --allow-missing: "
                              f"to `emma-mamba eval` (a rerun with the same --out scores the answers written, "
                              f"answering nothing again), or `emma-mamba score --task ... --answers {answers_path} --annotations "
                              f"{gold_path} --allow-missing` (Python: allow_missing=True)")
    return got
