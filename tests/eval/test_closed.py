"""Closed-set benchmarks scored by the options' likelihood (VSR, TallyQA; emma_mamba.eval.closed): ranking metrics
against brute-force definitions, metrics of known probabilities and replies by hand, the runner's probabilities
against the model's option probabilities for each question alone, `emma-mamba eval`/`score` on the files, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from emma_mamba.eval.closed import TALLY_OPTIONS, VSR_OPTIONS, auc_roc, average_precision, pick_option
from emma_mamba.eval.runner import ScoreInputError, evaluate
from emma_mamba.eval.scorers import score
from tests.eval.test_runner import checkpoint, shapes  # noqa: F401 - fixtures: a random tiny checkpoint, ShapesWorld


def _images(shapes: Path, n: int) -> list[str]:
    return [f"heldout/{p.name}" for p in sorted((shapes / "images" / "heldout").glob("*.png"))[:n]]


def _vsr_file(shapes: Path, path: Path, labels=(1, 0, 1, 0, 1)) -> Path:
    imgs = _images(shapes, 4)
    rels = ["left of", "right of", "above", "left of", "below"]
    path.write_text("".join(json.dumps({"image": imgs[i % len(imgs)], "caption": f"The circle is {rels[i]} the star.",
                                        "label": lab, "relation": rels[i], "subj": "circle", "obj": "star"}) + "\n"
                            for i, lab in enumerate(labels)))
    return path


def _tally_file(shapes: Path, path: Path) -> Path:
    imgs = _images(shapes, 4)
    recs = [{"question_id": 100 + i, "image": imgs[i % len(imgs)], "question": f"How many shapes {i}?",
             "answer": a, "issimple": simple, "data_source": "shapes"}
            for i, (a, simple) in enumerate([(2, True), (0, True), (15, False), (3, False), (1, True)])]
    path.write_text(json.dumps(recs))
    return path


# ------------------------------------------------------------------------------------------- ranking metrics

def _auc_pairs(labels, scores):
    """ROC AUC by definition: the fraction of (positive, negative) pairs ranked right, ties half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def _ap_thresholds(labels, scores):
    """Average precision by definition: over each distinct threshold t (high to low), the recall gained at
    'score >= t' times the precision at 'score >= t'."""
    out, prev = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        sel = [y for s, y in zip(scores, labels) if s >= t]
        recall = sum(sel) / sum(labels)
        out += (recall - prev) * sum(sel) / len(sel)
        prev = recall
    return out


def test_ranking_metrics_against_their_definitions():
    # by hand: ranked 1 0 1 0 -> AP = 1 * 1/2 + 2/3 * 1/2; AUC: 3 of 4 pairs right
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 1 / 3)
    assert auc_roc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.75)
    # ties: one threshold takes both tied items (precision 1/2 at recall 1/2), AUC counts the tie half
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.25 + 0.5 * 2 / 3)
    assert auc_roc([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.25)
    assert auc_roc([1, 1], [0.2, 0.3]) is None and average_precision([0, 0], [0.1, 0.2]) is None
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 40)
        labels = [rng.random() < 0.4 for _ in range(n)]
        if not any(labels) or all(labels):
            continue
        scores = [round(rng.random(), 1) for _ in range(n)]  # coarse: many ties
        assert auc_roc(labels, scores) == pytest.approx(_auc_pairs(labels, scores))
        assert average_precision(labels, scores) == pytest.approx(_ap_thresholds(labels, scores))


def test_pick_option_from_probabilities_and_replies():
    assert pick_option("whatever", VSR_OPTIONS, [0.2, 0.8]) == 1
    assert [pick_option(r, VSR_OPTIONS, task="vsr") for r in ("True.", "false", "Yes, it is", "No", "maybe", "")] \
        == [0, 1, 0, 1, None, None]
    assert [pick_option(r, TALLY_OPTIONS, task="tallyqa") for r in ("B", "P. 15", "3", "There are 3", "a", "16")] \
        == [1, 15, 3, None, None, None]
    # "A" and "I" are option letters only standing alone: as a sentence's first word they pick nothing (they
    # read as A = 0 and I = 8 before); other capitals pick their option even before more words
    replies = ("A total of 3 dogs", "A few", "I see 2", "A", "(A)", "A. 0", "I.", "A: 0", "B because", "(C) 2")
    assert [pick_option(r, TALLY_OPTIONS, task="tallyqa") for r in replies] == [None, None, None, 0, 0, 0, 8, 0, 1, 2]


# ------------------------------------------------------------------------------------------- known answers

class _Known:
    """An answer_fn with fixed option probabilities for some questions (None: answered by a reply)."""

    def __init__(self, probs: dict, replies: dict):
        self.probs, self.replies, self.prompts = probs, replies, {}

    def option_probabilities(self, qs, ps, options):
        for q, p in zip(qs, ps):
            self.prompts[q.qid] = p
        return [self.probs.get(q.qid) for q in qs]

    def __call__(self, qs, ps):
        return [self.replies[q.qid] for q in qs]


def test_vsr_known_probabilities_and_replies_give_hand_computed_metrics(shapes, tmp_path):
    f = _vsr_file(shapes, tmp_path / "test.jsonl")  # labels 1 0 1 0 1
    probs = {0: [0.9, 0.1], 1: [0.6, 0.4], 2: [0.3, 0.7], 3: [0.2, 0.8], 4: [0.55, 0.45]}
    fn = _Known(probs, {})
    rep = evaluate(None, "vsr", f, shapes / "images", tmp_path / "a", batch_size=2, progress=False, answer_fn=fn)
    m = rep["metrics"]
    # picks: T T F F T against 1 0 1 0 1 -> right: 0, 3, 4
    assert m["n"] == 5 and m["accuracy"] == pytest.approx(3 / 5) and m["always_true_accuracy"] == pytest.approx(3 / 5)
    # P(True): positives .9 .3 .55, negatives .6 .2: pairs right: .9>.6 .9>.2 .3>.2 .55>.2 -> 4 of 6
    assert m["auc_roc"] == pytest.approx(4 / 6)
    # ranked .9(1) .6(0) .55(1) .3(1) .2(0): AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/4
    assert m["auc_pr"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert m["per_relation"] == pytest.approx({"above": 0.0, "below": 1.0, "left of": 1.0, "right of": 0.0})
    assert fn.prompts[1] == ('Based on the image, is this statement "True" or "False"? The circle is right of the '
                             'star.\nRespond with "True" or "False" directly.')
    recs = [json.loads(x) for x in (tmp_path / "a" / "answers.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == ["True", "True", "False", "False", "True"]
    assert [r["probabilities"] for r in recs] == [probs[i] for i in range(5)]
    assert score("vsr", tmp_path / "a" / "answers.jsonl", f) == m
    # replies for some questions (an API without log-probabilities): parsed; the ranking metrics need them all
    fn = _Known({0: [0.9, 0.1]}, {1: "False.", 2: "yes", 3: "I cannot tell", 4: "No"})
    m = evaluate(None, "vsr", f, shapes / "images", tmp_path / "b", progress=False, answer_fn=fn)["metrics"]
    assert m["accuracy"] == pytest.approx(3 / 5) and m["n_unparsed_replies"] == 1
    assert m["auc_roc"] is None and m["auc_pr"] is None


def test_tallyqa_known_answers_give_hand_computed_metrics(shapes, tmp_path):
    f = _tally_file(shapes, tmp_path / "test.json")  # answers 2 0 15 3 1; simple, simple, complex, complex, simple
    onehot = lambda k: [1.0 if i == k else 0.0 for i in range(16)]  # noqa: E731
    fn = _Known({100: onehot(2), 101: onehot(1), 102: onehot(15)}, {103: "D", 104: "one"})
    rep = evaluate(None, "tallyqa", f, shapes / "images", tmp_path / "t", batch_size=2, progress=False, answer_fn=fn)
    m = rep["metrics"]
    # simple: 100 right, 101 wrong, 104 unparsed -> 1/3; complex: 102 right, 103 ("D" = 3) right -> 2/2
    assert m["accuracy_simple"] == pytest.approx(1 / 3) and m["accuracy_complex"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(3 / 5) and (m["n_simple"], m["n_complex"]) == (3, 2)
    assert m["n_unparsed_replies"] == 1 and m["auc_roc_ovo"] is None  # AUC: only with probabilities for all
    lines = fn.prompts[100].splitlines()
    assert lines[0] == "How many shapes 0?" and lines[1] == "A. 0" and lines[16] == "P. 15"
    assert lines[17] == "Answer with the option's letter from the given choices directly."
    assert score("tallyqa", tmp_path / "t" / "answers.jsonl", f) == m


# ------------------------------------------------------------------------------------------- with a model

@pytest.mark.parametrize("task", ["vsr", "tallyqa"])
def test_cli_eval_probabilities_equal_each_question_alone(task, shapes, checkpoint, tmp_path, capsys):
    """A random tiny checkpoint through `emma-mamba eval` on ShapesWorld's VSR / TallyQA files (batches of 3,
    ragged prompts): each written probability row equals the model's option probabilities for that question
    alone, its text the most likely option; `score` on the files agrees with the run's metrics."""
    from PIL import Image

    from emma_mamba.cli import main
    from emma_mamba.eval.runner import CLOSED_SET
    from emma_mamba.models.vlm import build_chat_prompt, load

    f = shapes / "heldout" / ("vsr_test.jsonl" if task == "vsr" else "tallyqa_test.json")
    out = tmp_path / "ev"
    assert main(["eval", "--task", task, "--questions", str(f), "--images", str(shapes / "images"), "--checkpoint",
                 str(checkpoint), "--out", str(out), "--batch-size", "3", "--limit", "5", "--no-progress"]) == 0
    assert ("VSR  n=5" if task == "vsr" else "TallyQA  n=5") in capsys.readouterr().out
    recs = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(recs) == 5
    model, options = load(checkpoint), CLOSED_SET[task]
    for r in recs:
        with Image.open(shapes / "images" / "heldout" / r["image"]) as im:
            alone = model.option_probabilities([build_chat_prompt(r["prompt"], 1, model.config.image_token)],
                                               [[im.convert("RGB")]], options, [[r["prompt"]]])[0]
        assert r["probabilities"] == pytest.approx(alone.tolist(), abs=1e-5)
        assert r["text"] == options[int(alone.argmax())]
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] == score(task, out / "answers.jsonl", f, allow_missing=True)
    assert main(["score", "--task", task, "--answers", str(out / "answers.jsonl"), "--annotations", str(f),
                 "--allow-missing"]) == 0


def test_options_outside_the_vocabulary_are_refused(tmp_path):
    """A model whose word-level tokenizer has no "True" (the quickstart's ShapesWorld vocabulary) is told so,
    instead of scoring its unknown token for both options."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1, "<image>": 2, "yes": 3, "no": 4,
                                      "<|user|>": 5, "<|assistant|>": 6}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = get_preset("tiny")
    cfg.lm.tokenizer, cfg.lm.vocab_size = str(tmp_path / "tokenizer.json"), 8
    torch.manual_seed(0)
    model = EmmaMamba(cfg, for_training=False)
    with pytest.raises(ValueError, match=r"option 'True' is not in this model's vocabulary \('True' tokenises to "
                                         r"'\[UNK\]'\)"):
        model.option_probabilities(["<image>\nIs it?"], [[]], ["True", "False"])
    # spellings: an option's probability sums its spellings in the vocabulary ("Yes" is not, "yes" is)
    lowercase = model.option_probabilities(["Is it?"], [[]], ["yes", "no"])
    either = model.option_probabilities(["Is it?"], [[]], [("Yes", "yes"), ("No", "no")])
    torch.testing.assert_close(either, lowercase)


# ------------------------------------------------------------------------------------------- errors

def test_bad_closed_set_inputs_name_the_problem(shapes, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": _images(shapes, 1)[0], "caption": "x", "label": "yes"}) + "\n")
    with pytest.raises(ScoreInputError, match=r"bad.jsonl: line 1: label must be 1 .* or 0, got 'yes'"):
        evaluate(None, "vsr", bad, shapes / "images", tmp_path / "o", progress=False, answer_fn=lambda q, p: [])
    bad.write_text(json.dumps({"image": "nope.jpg", "caption": "x", "label": 1}) + "\n")
    with pytest.raises(ScoreInputError, match=r"image 'nope.jpg' not found under --images .* train2017/ and val2017/"):
        evaluate(None, "vsr", bad, shapes / "images", tmp_path / "o", progress=False, answer_fn=lambda q, p: [])
    t = tmp_path / "t.json"
    t.write_text(json.dumps([{"question_id": 1, "image": _images(shapes, 1)[0], "question": "How many?",
                              "answer": 16}]))
    with pytest.raises(ScoreInputError, match=r"t.json: record 1: answer must be a count from 0 to 15, got 16"):
        evaluate(None, "tallyqa", t, shapes / "images", tmp_path / "o", progress=False, answer_fn=lambda q, p: [])
    f = _vsr_file(shapes, tmp_path / "test.jsonl", labels=(1,))
    ans = tmp_path / "answers.jsonl"
    ans.write_text(json.dumps({"question_id": 0, "text": "True", "probabilities": [1.0]}) + "\n")
    with pytest.raises(ScoreInputError, match=r"answers.jsonl: line 1: probabilities must be a list of 2 numbers"):
        score("vsr", ans, f)


# ------------------------------------------------------------------------------------------- --likelihood

def test_likelihood_answers_the_other_closed_set_benchmarks(shapes, tmp_path):
    """`eval --likelihood`: ScienceQA (2, 3 and 5 choices: A-B, A-C, A-E), MMBench (each circular round) and POPE
    (Yes / No) questions get their own options; the most probable one is the reply the usual scorers read."""
    from tests.eval.test_multiple_choice import _scienceqa, write_tsv, ROWS

    from emma_mamba.eval.runner import read_questions

    problems, imgs = _scienceqa(tmp_path)
    want = {"1": 1, "2": 0, "3": 4}  # picks: whale (right), run (wrong), E map (right)
    asked = {}

    class Probs:
        def option_probabilities(self, qs, ps, options):
            out = []
            for q in qs:
                asked[q.qid] = options
                row = [0.1] * len(options)
                row[want[q.qid]] = 0.9
                out.append(row)
            return out

        def __call__(self, qs, ps):
            raise AssertionError("no reply is generated when every question has probabilities")

    rep = evaluate(None, "scienceqa", problems, imgs, tmp_path / "sqa", batch_size=3, progress=False,
                   likelihood=True, answer_fn=Probs())
    assert asked == {"1": ("A", "B", "C"), "2": ("A", "B"), "3": ("A", "B", "C", "D", "E")}
    assert rep["metrics"]["accuracy"] == pytest.approx(2 / 3) and rep["metrics"]["n_unparsed_replies"] == 0
    assert rep["answered_by"] == "likelihood"
    recs = [json.loads(x) for x in (tmp_path / "sqa" / "answers.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == ["B", "A", "E"] and len(recs[2]["probabilities"]) == 5

    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", ROWS)
    qs = read_questions("mmbench", tsv, None, likelihood=True)
    assert [q.options for q in qs if q.qid.startswith("12/")] == [("A", "B", "C", "D")] * 4
    assert {q.options for q in qs if q.qid.startswith("5/")} == {("A", "B")}
    pope = shapes / "heldout" / "pope_random.jsonl"
    qs = read_questions("pope", pope, shapes / "images", likelihood=True)
    assert {q.options for q in qs} == {("Yes", "No")}
    labels = [json.loads(x)["label"] for x in pope.read_text().splitlines()][:6]

    class YesNo:  # the label's option most probable: every answer right
        def option_probabilities(self, qs, ps, options):
            return [[0.8, 0.2] if labels[i] == "yes" else [0.3, 0.7] for i in (qs_ids.index(q.qid) for q in qs)]

    qs_ids = [q.qid for q in qs]
    rep = evaluate(None, "pope", pope, shapes / "images", tmp_path / "pope", limit=6, progress=False,
                   likelihood=True, answer_fn=YesNo())
    assert rep["metrics"]["accuracy"] == 1.0 and rep["metrics"]["n"] == 6
    with pytest.raises(ScoreInputError, match="task vqav2 is open-ended"):
        read_questions("vqav2", shapes / "heldout" / "vqav2_questions.json", shapes / "images", likelihood=True)


def test_cli_likelihood_with_a_checkpoint_equals_each_question_alone(shapes, checkpoint, tmp_path, capsys):
    """`eval --task mme --likelihood` with a random checkpoint: each answer is the more probable of Yes / No for
    that question alone, the MME results folder holds it as the reply."""
    from PIL import Image

    from emma_mamba.cli import main
    from emma_mamba.models.vlm import build_chat_prompt, load

    q = shapes / "heldout" / "mme"
    out = tmp_path / "mme"
    assert main(["eval", "--task", "mme", "--questions", str(q), "--images", str(shapes / "images"),
                 "--checkpoint", str(checkpoint), "--out", str(out), "--likelihood", "--limit", "4",
                 "--no-progress"]) == 0
    model = load(checkpoint)
    lines = [ln.split("\t") for f in sorted((out / "mme").glob("*.txt")) for ln in f.read_text().splitlines()]
    assert len(lines) == 4
    for img, question, _, reply in lines:
        with Image.open(shapes / "images" / img) as im:
            p = model.option_probabilities([build_chat_prompt(question, 1, model.config.image_token)],
                                           [[im.convert("RGB")]], ("Yes", "No"), [[question]])[0]
        assert reply == ("Yes", "No")[int(p.argmax())]
    assert json.loads((out / "metrics.json").read_text())["answered_by"] == "likelihood"
    assert main(["eval", "--task", "gqa", "--questions", str(shapes / "heldout" / "gqa_questions.json"), "--images",
                 str(shapes / "images"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "g"),
                 "--likelihood"]) == 2
    assert "task gqa is open-ended" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- AI2D

def _ai2d(shapes: Path, root: Path) -> tuple[Path, Path]:
    """An AI2D-layout release: questions/<n>.png.json per diagram, images/<n>.png, ai2d_test_ids.csv."""
    import shutil

    qdir, idir = root / "questions", root / "images"
    qdir.mkdir(parents=True)
    idir.mkdir()
    src = _images(shapes, 3)
    docs = {
        "0": {"Which part is the root?": {"answerTexts": ["leaf", "stem", "root hair", "flower"], "correctAnswer": 2,
                                          "questionId": "0.png-0", "abcLabel": False},
              "Which label shows the stem?": {"answerTexts": ["A", "B", "C", "D"], "correctAnswer": 1,
                                              "questionId": "0.png-1", "abcLabel": True}},
        "1": {"What eats grass?": {"answerTexts": ["cow", "lion", "hawk"], "correctAnswer": 0,
                                   "questionId": "1.png-0", "abcLabel": False}},
        "2": {"Which is a producer?": {"answerTexts": ["grass", "fox"], "correctAnswer": 0, "questionId": "2.png-0",
                                       "abcLabel": False}},
    }
    for n, qs in docs.items():
        shutil.copy(shapes / "images" / src[int(n)], idir / f"{n}.png")
        (qdir / f"{n}.png.json").write_text(json.dumps({"imageName": f"{n}.png", "questions": qs}))
    (root / "ai2d_test_ids.csv").write_text("0\n1\n")
    return qdir, idir


def test_ai2d_by_hand(shapes, tmp_path):
    """AI2D's folder layout: the test split is the diagrams of ai2d_test_ids.csv, each question's answer texts are
    its lettered options (as many as it has), accuracy overall and on the letter-label questions by hand."""
    qdir, idir = _ai2d(shapes, tmp_path / "ai2d")
    asked, prompts = {}, {}

    class Probs:
        def option_probabilities(self, qs, ps, options):
            asked.update({q.qid: options for q in qs})
            prompts.update({q.qid: p for q, p in zip(qs, ps)})
            pick = {"0.png-0": 2, "0.png-1": 0, "1.png-0": 0}  # right, wrong, right
            return [[0.9 if i == pick[q.qid] else 0.05 for i in range(len(options))] for q in qs]

    rep = evaluate(None, "ai2d", qdir, idir, tmp_path / "ev", batch_size=2, progress=False, answer_fn=Probs())
    assert asked == {"0.png-0": ("A", "B", "C", "D"), "0.png-1": ("A", "B", "C", "D"), "1.png-0": ("A", "B", "C")}
    assert prompts["1.png-0"] == ("What eats grass?\nA. cow\nB. lion\nC. hawk\nAnswer with the option's letter from "
                                  "the given choices directly.")
    m = rep["metrics"]
    assert (m["split"], m["n"]) == ("test", 3) and m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_kind"] == {"letter labels": 0.0, "other": 1.0}
    assert m["auc_roc_ovo"] is None  # 4, 4 and 3 options: no common columns
    two = tmp_path / "two.jsonl"  # the two 4-option questions (answers C and B), both ranked right in their columns
    two.write_text(json.dumps({"question_id": "0.png-0", "text": "C", "probabilities": [0.1, 0.2, 0.6, 0.1]}) + "\n"
                   + json.dumps({"question_id": "0.png-1", "text": "B", "probabilities": [0.1, 0.5, 0.3, 0.1]}) + "\n")
    m2 = score("ai2d", two, qdir, allow_missing=True)
    # one pair (C=2, B=1): column 2 ranks the C-question first (0.6 > 0.3), column 1 the B-question (0.5 > 0.2)
    assert m2["auc_roc_ovo"] == 1.0 and m2["accuracy"] == 1.0
    assert score("ai2d", tmp_path / "ev" / "answers.jsonl", qdir) == m
    # the train split: the other diagram; replies parsed (a letter or the answer text) when no probabilities
    rep = evaluate(None, "ai2d", qdir, idir, tmp_path / "tr", split="train", progress=False,
                   answer_fn=lambda qs, ps: ["grass"] * len(qs))
    assert rep["metrics"]["split"] == "train" and rep["metrics"]["accuracy"] == 1.0
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"question_id": "0.png-0", "text": "C"}) + "\n" +
                     json.dumps({"question_id": "2.png-0", "text": "A"}) + "\n")
    m = score("ai2d", mixed, qdir, allow_missing=True)  # answers of both splits: scored as split all
    assert (m["split"], m["n"], m["accuracy"], m["n_missing"]) == ("all", 2, 1.0, 2)
    rep = evaluate(None, "ai2d", qdir, idir, tmp_path / "every", split="all", progress=False,
                   answer_fn=lambda qs, ps: ["A"] * len(qs))  # every question, with the ids file present
    assert (rep["metrics"]["split"], rep["metrics"]["n"]) == ("all", 4)
    (tmp_path / "ai2d" / "ai2d_test_ids.csv").unlink()
    with pytest.raises(ScoreInputError, match="AI2D split test: no ai2d_test_ids.csv"):
        evaluate(None, "ai2d", qdir, idir, tmp_path / "x", progress=False, answer_fn=Probs())
    # without the ids file, split all takes every question ("A": right on 1.png-0 and 2.png-0)
    rep = evaluate(None, "ai2d", qdir, idir, tmp_path / "all", split="all", progress=False,
                   answer_fn=lambda qs, ps: ["A"] * len(qs))
    assert (rep["metrics"]["split"], rep["metrics"]["n"], rep["metrics"]["accuracy"]) == ("all", 4, 0.5)
    (qdir / "1.png.json").write_text(json.dumps({"imageName": "1.png", "questions": {"Q?": {
        "answerTexts": ["a", "b"], "correctAnswer": 2, "questionId": "1.png-0"}}}))
    with pytest.raises(ScoreInputError, match=r"1.png.json: question 'Q\?': correctAnswer must index answerTexts"):
        evaluate(None, "ai2d", qdir, idir, tmp_path / "y", split="all", progress=False, answer_fn=Probs())


def test_resuming_with_the_other_answering_method_is_refused(shapes, tmp_path):
    """An output folder whose answers were generated is not continued by likelihood (and the reverse): the two
    methods' answers would be mixed in one file."""
    pope = shapes / "heldout" / "pope_random.jsonl"
    out = tmp_path / "pope"
    evaluate(None, "pope", pope, shapes / "images", out, limit=2, progress=False,
             answer_fn=lambda qs, ps: ["yes"] * len(qs))

    class Probs:
        def option_probabilities(self, qs, ps, options):
            return [[0.6, 0.4] for _ in qs]

    with pytest.raises(ScoreInputError, match="its answers so far were generation-based; continue without "
                                              "--likelihood, or answer into another --out"):
        evaluate(None, "pope", pope, shapes / "images", out, limit=4, likelihood=True, progress=False,
                 answer_fn=Probs())
    rep = evaluate(None, "pope", pope, shapes / "images", tmp_path / "ll", limit=2, likelihood=True, progress=False,
                   answer_fn=Probs())
    assert rep["answered_by"] == "likelihood"
    with pytest.raises(ScoreInputError, match="were likelihood-based; continue with --likelihood"):
        evaluate(None, "pope", pope, shapes / "images", tmp_path / "ll", limit=4, progress=False,
                 answer_fn=lambda qs, ps: ["no"] * len(qs))
    rep = evaluate(None, "pope", pope, shapes / "images", tmp_path / "ll", limit=4, likelihood=True, progress=False,
                   answer_fn=Probs())  # the same method continues
    assert rep["n_answered_this_run"] == 2 and rep["metrics"]["n"] == 4


def test_one_against_one_auc_by_hand_and_by_definition():
    """Hand & Till's multi-class AUC: by hand on three samples, and against a direct pairwise count on random
    probabilities (ties included)."""
    from emma_mamba.eval.closed import auc_roc_ovo

    # classes 0, 1, 2 with one sample each; pair (0,1): column 0 ranks the 0-sample above the 1-sample (1.0),
    # column 1 ranks the 1-sample above the 0-sample (1.0); pair (0,2): 1.0 and 0.0 (column 2 ranks them wrongly);
    # pair (1,2): 1.0 and 1.0 -> mean of 1, 0.5, 1
    probs = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]
    probs[0][2] = 0.9  # the 0-sample now scores higher than the 2-sample in column 2
    assert auc_roc_ovo([0, 1, 2], probs) == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert auc_roc_ovo([1, 1], probs[:2]) is None
    rng = random.Random(1)
    for _ in range(20):
        n = rng.randint(3, 25)
        labels = [rng.randrange(4) for _ in range(n)]
        probs = [[round(rng.random(), 1) for _ in range(4)] for _ in range(n)]
        classes = sorted(set(labels))
        if len(classes) < 2:
            continue
        pair_aucs = []
        for a, j in enumerate(classes):
            for k in classes[a + 1:]:
                def half(pos, col):
                    P = [p[col] for y, p in zip(labels, probs) if y == pos]
                    N = [p[col] for y, p in zip(labels, probs) if y == (k if pos == j else j)]
                    return sum((x > z) + 0.5 * (x == z) for x in P for z in N) / (len(P) * len(N))
                pair_aucs.append((half(j, j) + half(k, k)) / 2)
        assert auc_roc_ovo(labels, probs) == pytest.approx(sum(pair_aucs) / len(pair_aucs))
