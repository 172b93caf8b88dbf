"""Answer and data files are read line by line at ``\\n`` only: a model's answer, or a record written with
``json.dumps(..., ensure_ascii=False)``, may hold U+2028, U+2029, U+0085 or a form feed unescaped, which
``str.splitlines`` also splits at (a resumed eval then stopped at "not valid JSON", a scorer at a broken record)."""

from __future__ import annotations

import json

from emma_mamba.eval._io import load_records
from emma_mamba.eval.runner import _read_done_jsonl
from emma_mamba.fileio import text_lines

ODD = "a\u2028b\u2029c\x85d\x0ce\x1cf\x1dg\x1eh\x0bi"  # every separator str.splitlines knows but \n and \r


def _answers():
    return [{"question_id": i, "text": f"answer {i}: {ODD}"} for i in range(3)]


def test_text_lines_splits_at_newlines_only():
    recs = _answers()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    assert len(text.splitlines()) > len(recs)  # the trap: splitlines breaks these records apart
    assert [json.loads(x) for x in text_lines(text)] == recs
    assert text_lines("x\r\ny\n\nz") == ["x", "y", "", "z"]  # CRLF files; a blank line kept, as a line
    assert text_lines("") == [] and text_lines("\n") == [""]


def test_scorer_and_eval_resume_read_answers_holding_separators(tmp_path):
    recs = _answers()
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    got = load_records(path, "answers")
    assert [loc for loc, _ in got] == ["line 1", "line 2", "line 3"] and [r for _, r in got] == recs
    assert _read_done_jsonl(path) == {r["question_id"]: r for r in recs}
    assert path.read_text(encoding="utf-8").count("\n") == 3  # nothing dropped or rewritten
