"""Mutation round 3: suite option precedence, the API client's retry rule, and the MMBench submission's
prediction letters and columns, each against a hand-worked expectation.

* ``eval --suite``: a value given on the command line wins over the entry's, the entry's over the suite file's
  top level, that over the built-in default (README: "--batch-size, --max-new-tokens and --limit, where given on
  the command line, win over the suite file's (top-level and per entry)").
* ``--api``: a refused request (HTTP 4xx) is not retried; a server error (5xx) is, ``retries`` more times with
  waits of 1 s, 2 s, ... (the waits recorded, not slept).
* MMBench submission: a CircularEval copy row's prediction is the letter of the reply among that row's own
  options (a reply naming the option's text); a ``prediction`` column already in the TSV is not carried over.
"""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from emma_mamba.eval import suite as suite_mod
from emma_mamba.eval.mmbench import mmbench_submission
from tests.eval.test_mmbench_submission import write_tsv  # an MMBench TSV of the given columns
from tests.eval.test_api import canned_endpoint


# ------------------------------------------------------------------------------------------------- suite

def test_command_line_beats_entry_beats_suite_top_level(tmp_path):
    (tmp_path / "q.jsonl").write_text("")
    p = tmp_path / "suite.yaml"
    p.write_text("root: .\nbatch_size: 4\nmax_new_tokens: 9\nbenchmarks:\n"
                 "  own: {task: pope, questions: q.jsonl, batch_size: 2, max_new_tokens: 5, limit: 3}\n"
                 "  plain: {task: pope, questions: q.jsonl}\n")
    own, plain = suite_mod.read_suite(p)
    assert (own.name, plain.name) == ("own", "plain")

    def opts(e, **given):
        o = suite_mod._options(e, given.get("batch_size"), given.get("max_new_tokens"), given.get("limit"), False)
        return o["batch_size"], o["max_new_tokens"], o["limit"]

    assert opts(own) == (2, 5, 3)                      # the entry's own values
    assert opts(plain) == (4, 9, None)                  # the suite's top level; no limit: every question
    assert opts(own, batch_size=16, limit=7) == (16, 5, 7)   # the command line wins where given
    assert opts(plain, max_new_tokens=1) == (4, 1, None)


# --------------------------------------------------------------------------------------------------- api

def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def server():
    state = {"status": 400, "body": json.dumps({"error": {"message": "nope"}}).encode()}
    with canned_endpoint(state) as url:
        yield url, state


@pytest.mark.parametrize("status, hits, waits", [(400, 1, []), (422, 1, []), (503, 3, [1.0, 2.0])])
def test_refused_requests_are_not_retried_server_errors_are(server, monkeypatch, status, hits, waits):
    from emma_mamba.eval import api

    url, state = server
    state["status"] = status
    slept = []
    monkeypatch.setattr(api.time, "sleep", lambda s: slept.append(s))
    fn = api.api_answer_fn(url, retries=2, concurrency=1, timeout=10)
    q = SimpleNamespace(qid="q1", image_bytes=_png(), image=None)
    with pytest.raises(api.ApiError, match=f"HTTP {status}"):
        fn([q], ["What is it?"])
    assert state["hits"] == hits
    assert slept == waits


# ---------------------------------------------------------------------------------------- MMBench submission

def _b64png(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_copy_rows_read_replies_against_their_own_options(tmp_path):
    # question 9 and its CircularEval copies (options rotated, the picture given as the row index holding it)
    rows = [{"index": "9", "image": _b64png("red"), "question": "Which colour?", "A": "red", "B": "green", "C": "pink"},
            {"index": "1000009", "image": "9", "question": "Which colour?", "A": "green", "B": "pink", "C": "red"},
            {"index": "2000009", "image": "9", "question": "Which colour?", "A": "pink", "B": "red", "C": "green"}]
    tsv = write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows, ["index", "image", "question", "A", "B", "C"])
    # every round answers "red" by its text: row 9 shows it as A, the copy 1000009 as C, the copy 2000009 as B
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": f"9/{r}", "text": "red"}) + "\n" for r in range(3)))
    sub = mmbench_submission(answers, tsv)
    assert [r[0] for r in sub.rows] == [9, 1000009, 2000009]
    assert [r[-1] for r in sub.rows] == ["A", "C", "B"]
    assert sub.n_unparsed == 0 and sub.complete


def test_a_prediction_column_in_the_tsv_is_replaced_not_repeated(tmp_path):
    rows = [{"index": "1", "image": _b64png("red"), "question": "Which colour?", "A": "red", "B": "green",
             "prediction": "stale"}]
    tsv = write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows, ["index", "question", "prediction", "A", "B", "image"])
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": f"1/{r}", "text": "B" if r == 0 else "A"}) + "\n"
                               for r in range(2)))
    sub = mmbench_submission(answers, tsv)
    assert sub.columns == ["index", "question", "A", "B", "prediction"]  # the TSV's order, less image / prediction
    assert sub.rows == [[1, "Which colour?", "red", "green", "B"]]
