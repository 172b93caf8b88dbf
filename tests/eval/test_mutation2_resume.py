"""Mutation round 2: resuming an eval run (module doc of emma_mamba.eval.runner: "a torn last line from a crash
is dropped"). Only the last line may be dropped; an unreadable line before it is not a crash's torn write but a
damaged file, which the rerun must refuse (naming the line) rather than silently answer that question again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emma_mamba.data.shapes import ShapesConfig, generate
from emma_mamba.eval.runner import ScoreInputError, evaluate


@pytest.fixture(scope="module")
def pope(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("shapes")
    generate(ShapesConfig(seed=3, n_train=6, n_heldout=4, image_size=96), d)
    return d / "heldout" / "pope_adversarial.jsonl", d / "images"


def _crash_after_two_batches(questions, images, out):
    calls = []

    def fn(qs, ps):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ["yes"] * len(qs)

    with pytest.raises(KeyboardInterrupt):
        evaluate(None, "pope", questions, images, out, batch_size=4, progress=False, answer_fn=fn)
    return (out / "answers.jsonl").read_text().splitlines()


def test_a_damaged_line_before_the_last_is_refused_not_dropped(pope, tmp_path):
    questions, images = pope
    out = tmp_path / "run"
    lines = _crash_after_two_batches(questions, images, out)
    assert len(lines) == 8
    damaged = lines[:6] + ['{"question_id": 5, "te'] + lines[7:]  # line 7 of 8 unreadable
    text = "".join(x + "\n" for x in damaged)
    (out / "answers.jsonl").write_text(text)
    asked = []
    with pytest.raises(ScoreInputError, match=r"line 7: not valid JSON"):
        evaluate(None, "pope", questions, images, out, batch_size=4, progress=False,
                 answer_fn=lambda qs, ps: asked.extend(q.qid for q in qs) or ["yes"] * len(qs))
    assert asked == []  # nothing answered
    assert (out / "answers.jsonl").read_text() == text  # and the file left as it was


def test_a_torn_last_line_is_dropped_and_its_question_answered_once(pope, tmp_path):
    questions, images = pope
    out = tmp_path / "run"
    lines = _crash_after_two_batches(questions, images, out)
    torn = lines[:7] + [lines[7][: len(lines[7]) // 2]]  # the crash tore the 8th answer
    (out / "answers.jsonl").write_text("".join(x + "\n" for x in torn[:-1]) + torn[-1])
    asked = []
    evaluate(None, "pope", questions, images, out, batch_size=4, progress=False,
             answer_fn=lambda qs, ps: asked.extend(q.qid for q in qs) or ["yes"] * len(qs))
    all_ids = [json.loads(x)["question_id"] for x in questions.read_text().splitlines()]
    assert asked == all_ids[7:]  # the torn one and everything after it, each once
    got = [json.loads(x)["question_id"] for x in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(got) == sorted(all_ids) and len(got) == len(set(got))
