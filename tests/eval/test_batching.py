"""Continuous batching in `emma-mamba eval` (emma_mamba.eval.runner, ``batching="continuous"``, the default):
each question's reply against the model's own generate() on that question alone (the oracle), with replies of
different lengths, so that rows free up at different steps and later questions take them; and fewer decode steps
than fixed batches need for the same replies (counted by hand from the oracle's lengths)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from emma_mamba.data.shapes import ShapesConfig, generate
from emma_mamba.eval.runner import _open_images, evaluate, prompt_for, read_questions
from emma_mamba.inference.generate import GenerationConfig

MAX_NEW = 8


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    generate(ShapesConfig(seed=3, n_train=6, n_heldout=4, image_size=96), d)
    return d


@pytest.fixture(scope="module")
def model():
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    m = EmmaMamba(get_preset("tiny"), for_training=False).eval()
    with torch.no_grad():  # sharper, input-dependent logits: a random model's replies then differ per question
        for p in m.lm.parameters():
            p.mul_(3.0)
    return m


def _alone(model, q, eos):
    """The oracle: generate() on this one question (its prompt, image and instruction), greedy."""
    p = prompt_for("vqav2", q.text)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0, eos_token_id=eos)
    r = model.generate(model.build_prompt(p, 1), _open_images([q])[0],
                       [p] if model.instruction is not None else None, config=cfg)
    return r.sequences[0], r.texts[0].strip()


@pytest.mark.parametrize("b", [3, 4])  # questions join one by one (3), or two at a time (4: once half are free)
def test_replies_equal_generate_alone_in_fewer_steps_than_fixed_batches(b, model, shapes, tmp_path, monkeypatch):
    qfile, images = shapes / "heldout" / "vqav2_questions.json", shapes / "images"
    qs = read_questions("vqav2", qfile, images)
    runs = [_alone(model, q, None)[0] for q in qs]
    assert len({tuple(r) for r in runs}) > len(qs) // 2  # the replies depend on the question

    # an end-of-text token that the greedy replies meet at different steps (or never): replies of varied lengths
    def lengths(tok):  # tokens each reply picks, its end-of-text token included
        return [r.index(tok) + 1 if tok in r else MAX_NEW for r in runs]

    counts = Counter(t for r in runs for t in r[:MAX_NEW - 1])
    eos = max(counts, key=lambda t: (len(set(lengths(t))), counts[t]))
    lens = lengths(eos)
    assert len(set(lens)) >= 3 and MAX_NEW in lens and min(lens) < MAX_NEW // 2, lens
    monkeypatch.setattr(model.tokenizer, "eos_token_id", eos)
    want = [_alone(model, q, eos) for q in qs]
    assert [len(s) + (n < MAX_NEW) for (s, _), n in zip(want, lens)] == lens  # sequences end before end-of-text

    # every question queued before the decoder admits any (it is held from the first submission until the first
    # collect): the admission rounds, hence the step count, do not depend on when this thread gets the CPU
    from emma_mamba.eval import runner

    held: dict = {}
    submit, collect = runner._ContinuousAnswers.submit, runner._Submitted.collect

    def held_submit(self, *a, **k):
        if "hold" not in held:
            held["hold"] = self.decoder.hold()
            held["hold"].__enter__()
        return submit(self, *a, **k)

    def release_then_collect(self):
        if held.get("hold") is not None:
            held.pop("hold").__exit__(None, None, None)
            held["hold"] = None
        return collect(self)

    monkeypatch.setattr(runner, "_BATCHES_AHEAD", len(qs))
    monkeypatch.setattr(runner._ContinuousAnswers, "submit", held_submit)
    monkeypatch.setattr(runner._Submitted, "collect", release_then_collect)
    reports = {}
    for how in ("continuous", "static"):
        out = tmp_path / how
        reports[how] = evaluate(model, "vqav2", qfile, images, out, batch_size=b, max_new_tokens=MAX_NEW,
                                progress=False, batching=how)
        got = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
        assert [g["question_id"] for g in got] == [q.qid for q in qs]  # question order
        assert [g["text"] for g in got] == [t for _, t in want], how
        assert reports[how]["batching"] == how

    # decode steps: a reply of n tokens needs n - 1 after its prefill; fixed batches run until their longest ends
    fixed = sum(max(lens[i:i + b]) - 1 for i in range(0, len(lens), b))
    rows_needed = sum(n - 1 for n in lens)
    steps = reports["continuous"]["decode_steps"]
    assert -(-rows_needed // b) <= steps < fixed, (steps, fixed, lens)
    assert reports["static"]["decode_steps"] is None


def test_bad_batching_is_named(model, shapes, tmp_path):
    with pytest.raises(ValueError, match="batching must be one of"):
        evaluate(model, "vqav2", shapes / "heldout" / "vqav2_questions.json", shapes / "images", tmp_path,
                 batching="dynamic", progress=False)


def test_decode_steps_from_cuda_graphs_give_the_same_answers(model, shapes, tmp_path):
    """`eval --cuda-graphs` through the continuous decoder (its graphs captured per batch size), on the CPU with
    the EagerReplay stand-in of :mod:`emma_mamba.inference.cuda_graphs` (the capture and replay bookkeeping,
    the static buffers; the GPU test of generate covers real graphs)."""
    from emma_mamba.inference import cuda_graphs

    qfile, images = shapes / "heldout" / "vqav2_questions.json", shapes / "images"
    answers = {}
    for graphs in (False, True):
        api = cuda_graphs.EagerReplay()
        if graphs:
            cuda_graphs.attach(model.lm, api)
        try:
            evaluate(model, "vqav2", qfile, images, tmp_path / str(graphs), batch_size=4, max_new_tokens=5,
                     limit=7, progress=False, cuda_graphs=graphs)
        finally:
            if graphs:
                cuda_graphs.release(model.lm)
        answers[graphs] = (tmp_path / str(graphs) / "answers.jsonl").read_text()
        assert (api.captures > 0) == graphs
    assert answers[True] == answers[False]
