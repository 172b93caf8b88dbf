"""Mutation round 4 (emma_mamba.eval.runner): --limit on MME rounds up to whole image pairs, an MME reply with tabs
or line breaks stays one 4-column line, and the model's answer / option functions fuse the question (the prompt
eval asks), not the chat-formatted text (instruction fusion is the identity at initialisation, so the arguments
are read, not the outputs)."""

from __future__ import annotations

import pytest
import torch

from emma_mamba.eval.runner import (_model_answer_fn, _model_option_fn, evaluate, limit_questions, prompt_for,
                                    read_questions)
from tests.eval.test_runner import _files, shapes  # noqa: F401 (fixture)


def test_limit_rounds_mme_up_to_whole_pairs_only():
    qs = list(range(10))
    assert limit_questions("mme", qs, 3) == [0, 1, 2, 3]
    assert limit_questions("mme", qs, 4) == [0, 1, 2, 3]
    assert limit_questions("vqav2", qs, 3) == [0, 1, 2]


def test_an_mme_reply_with_tabs_and_line_breaks_is_one_line_of_four_columns(shapes, tmp_path):  # noqa: F811
    q = _files(shapes)["mme"]
    out = tmp_path / "ev"
    evaluate(None, "mme", q, shapes / "images", out, progress=False,
             answer_fn=lambda qs, ps: ["Yes\tit is\nso  "] * len(qs))
    n = 0
    for t in q.glob("*.txt"):
        want = t.read_text().splitlines()
        got = (out / "mme" / t.name).read_text().splitlines() if want else []
        assert got == [line + "\tYes it is so" for line in want]
        n += len(got)
    assert n == len(read_questions("mme", q, shapes / "images"))


@pytest.fixture(scope="module")
def model():
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    m = EmmaMamba(get_preset("tiny"), for_training=False).eval()
    assert m.instruction is not None
    return m


def test_answers_and_options_fuse_the_question_prompt(shapes, model, monkeypatch):  # noqa: F811
    qs = read_questions("pope", _files(shapes)["pope"], shapes / "images")[:2]
    prompts = [prompt_for("pope", x.text) for x in qs]
    seen = {}
    real_gen, real_opt = model.generate, model.option_probabilities
    monkeypatch.setattr(model, "generate", lambda texts, images, instructions, config: (
        seen.update(gen=(texts, instructions)), real_gen(texts, images, instructions, config=config))[1])
    monkeypatch.setattr(model, "option_probabilities", lambda texts, images, options, instructions: (
        seen.update(opt=(texts, instructions)), real_opt(texts, images, options, instructions))[1])
    _model_answer_fn(model, 1)(qs, prompts)
    _model_option_fn(model)(qs, prompts, ("yes", "no"))
    chat = [f"<|user|>\n<image>\n{p}<|endoftext|>\n<|assistant|>\n" for p in prompts]
    assert seen["gen"] == (chat, [[p] for p in prompts])
    assert seen["opt"] == (chat, [[p] for p in prompts])


def test_continuous_batching_fuses_the_question_prompt(shapes, model):  # noqa: F811
    from emma_mamba.eval.runner import _ContinuousAnswers

    qs = read_questions("pope", _files(shapes)["pope"], shapes / "images")[:2]
    prompts = [prompt_for("pope", x.text) for x in qs]
    ans = _ContinuousAnswers(model, 1, 2)
    jobs = []
    try:
        ans.decoder.submit = jobs.append  # record the jobs instead of decoding them
        ans.submit(qs, prompts, [None, None], [0, 1])
    finally:
        ans.close()
    assert len(jobs) == 2
    for job, p in zip(jobs, prompts):
        ids, images, instructions = job.start()["embed"]
        assert ids == model.tokenizer.encode(f"<|user|>\n<image>\n{p}<|endoftext|>\n<|assistant|>\n")
        assert len(images) == 1 and instructions == [p]


def test_mme_resume_counts_only_complete_four_column_lines(tmp_path):
    from emma_mamba.eval.runner import _read_done_mme

    (tmp_path / "mme").mkdir()
    p = tmp_path / "mme" / "color.txt"
    p.write_text("a.png\tIs it red?\tYes\tYes\nb.png\tIs it blue?\tNo\n", encoding="utf-8")  # last: 3 columns
    assert _read_done_mme(tmp_path, "color") == 1
    assert p.read_text(encoding="utf-8") == "a.png\tIs it red?\tYes\tYes\n"
    p.write_text("a.png\tIs it red?\tYes\tYes\nb.png\tIs it blue?\tNo\tN", encoding="utf-8")  # torn mid-reply
    assert _read_done_mme(tmp_path, "color") == 1
    assert _read_done_mme(tmp_path, "missing") == 0
