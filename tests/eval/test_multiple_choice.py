"""Multiple-choice benchmarks: MMBench (TSV reading, circular evaluation by hand) and SEED-Bench (image questions,
per-type accuracy by hand); reply parsing; the runner end to end."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from emma_mamba.eval.mmbench import (MC_PROMPT, mmbench_prompt, parse_choice, read_mmbench, rotated_options,
                                     score_mmbench)
from emma_mamba.eval.runner import ScoreInputError, evaluate, read_questions

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def _png(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    return path


ROWS = [
    {"index": 5, "question": "What colour is the picture?", "hint": "nan", "A": "red", "B": "green",
     "answer": "A", "category": "colour", "l2-category": "attribute", "image": _png("red")},
    {"index": 9, "question": "Which shape?", "hint": "Look closely.", "A": "circle", "B": "square",
     "C": "star", "answer": "C", "category": "shape", "l2-category": "attribute", "image": _png("blue")},
    {"index": 12, "question": "How many?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B",
     "category": "count", "l2-category": "reasoning", "image": _png("white")},
]


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", ROWS)


def test_read_and_rotate(tsv):
    items = read_mmbench(tsv)
    assert [(it.index, it.options, it.answer, it.hint) for it in items] == [
        (5, ["red", "green"], "A", None), (9, ["circle", "square", "star"], "C", "Look closely."),
        (12, ["1", "2", "3", "4"], "B", None)]
    assert Image.open(io.BytesIO(items[0].image)).getpixel((0, 0)) == (255, 0, 0)
    assert rotated_options(items[1], 1) == ["square", "star", "circle"]
    assert mmbench_prompt(items[1], 2) == "Look closely.\nWhich shape?\nA. star\nB. circle\nC. square"


@pytest.mark.parametrize("reply, want", [
    ("B", "B"), ("B.", "B"), ("(C) star", "C"), ("A) red", "A"), ("The answer is B.", "B"), ("Answer: c", "C"),
    ("star", "C"), ("Star.", "C"), ("D", None), ("I am not sure", None), ("", None), ("Bright", None),
    # MMBench-CN replies (asked with "请直接回答选项字母。"): full-width punctuation and Chinese answer phrases
    ("B。", "B"), ("（C）星形", "C"), ("C：星形", "C"), ("答案是B", "B"), ("答案：（A）", "A"), ("选项 C。", "C"),
    ("我认为应选B。", "B"), ("答案是D", None), ("选项Bright", None), ("这是一个圆形", None),
])
def test_parse_choice(reply, want):
    assert parse_choice(reply, ["circle", "square", "star"]) == want


@pytest.mark.parametrize("reply, want", [
    # naming two options picks none (VLMEvalKit's can_infer_option needs exactly one letter); these picked the first
    ("A or B", None), ("B, C", None), ("A B", None), ("The answer is C or A", None), ("Answer: B or C", None),
    ("B\nC", None), ("A and C", None), ("答案是B或C", None), ("B - the circle, not A", None),
    # one letter, with the option's text or the article "A" beside it, still picks it
    ("B. A red square", "B"), ("A. A circle", "A"), ("C) star", "C"), ("The answer is B, a square.", "B"),
    ("B. A square, not a circle", "B"),
])
def test_parse_choice_refuses_a_reply_naming_two_options(reply, want):
    assert parse_choice(reply, ["circle", "square", "star"]) == want


def test_parse_choice_takes_the_options_texts_out_before_counting_letters():
    assert parse_choice("B. A red square", ["circle", "A red square", "star"]) == "B"
    assert parse_choice("C or D", ["circle", "square", "star"]) == "C"  # D is no option here


def test_a_model_naming_two_options_every_round_scores_nothing(tmp_path):
    """Circular evaluation of a model that hedges "<right> or <other>" in every round: accuracy 1.0 before (the
    first letter was credited), 0 with every reply unparsed."""
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", ROWS[:1])  # options red (A, correct), green
    ans = _answers(tmp_path, {"5/0": "A or B", "5/1": "B or A"})
    m = score_mmbench(ans, tsv)
    assert m["accuracy"] == 0.0 and m["n_unparsed_replies"] == 2


def _answers(tmp_path, replies: dict):
    p = tmp_path / "answers.jsonl"
    p.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in replies.items()))
    return p


def test_circular_scoring_by_hand(tsv, tmp_path):
    # q5 (2 options, answer "red"): round 0 shows red, green -> "A"; round 1 green, red -> "B": both right
    # q9 (answer "star"): round 0 -> C right; round 1 (square, star, circle) -> "B" right; round 2 (star, circle,
    # square) says "B": wrong
    # q12 (answer "2"): "B" in round 0 right; rounds 1-3 (2,3,4,1 / 3,4,1,2 / 4,1,2,3): A right, D right, C right
    replies = {"5/0": "A", "5/1": "B", "9/0": "C", "9/1": "B", "9/2": "B",
               "12/0": "B", "12/1": "A", "12/2": "D", "12/3": "the answer is C"}
    m = score_mmbench(_answers(tmp_path, replies), tsv)
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3) and m["accuracy_first_round"] == 1.0
    assert m["per_category"] == {"colour": 1.0, "count": 1.0, "shape": 0.0}
    assert m["per_l2_category"] == {"attribute": 0.5, "reasoning": 1.0}
    assert m["n_unparsed_replies"] == 0
    # always "A": right once per question, so never circularly right; first round right for q5 only
    always_a = {f"{i}/{r}": "A" for i, k in ((5, 2), (9, 3), (12, 4)) for r in range(k)}
    m = score_mmbench(_answers(tmp_path, always_a), tsv)
    assert m["accuracy"] == 0.0 and m["accuracy_first_round"] == pytest.approx(1 / 3)


def test_scoring_errors(tsv, tmp_path):
    with pytest.raises(ScoreInputError, match=r"question\(s\) \[9\] have answers for some circular rounds only"):
        score_mmbench(_answers(tmp_path, {"5/0": "A", "5/1": "B", "9/0": "C"}), tsv)
    with pytest.raises(ScoreInputError, match="no answer for 2 of 3 questions"):
        score_mmbench(_answers(tmp_path, {"5/0": "A", "5/1": "B"}), tsv)
    assert score_mmbench(_answers(tmp_path, {"5/0": "A", "5/1": "B"}), tsv, allow_missing=True)["n"] == 1
    with pytest.raises(ScoreInputError, match=r"question '5/2' is not in"):
        score_mmbench(_answers(tmp_path, {"5/2": "A"}), tsv)
    with pytest.raises(ScoreInputError, match=r"question_id '5' is not '<index>/<round>'"):
        score_mmbench(_answers(tmp_path, {"5": "A"}), tsv)
    bad = write_tsv(tmp_path / "bad.tsv", [{**ROWS[0], "image": "not base64!"}])
    with pytest.raises(ScoreInputError, match=r"bad.tsv: row 2: the image column is not valid base64"):
        read_mmbench(bad)
    bad = write_tsv(tmp_path / "bad2.tsv", [{**ROWS[0], "answer": "C"}])
    with pytest.raises(ScoreInputError, match=r"row 2: answer 'C' is not one of the options \['A', 'B'\]"):
        read_mmbench(bad)
    bad = write_tsv(tmp_path / "bad3.tsv", [{**ROWS[2], "C": ""}])
    with pytest.raises(ScoreInputError, match="options must be A, B and optionally C, D in order"):
        read_mmbench(bad)
    test_split = write_tsv(tmp_path / "test.tsv", [{**r, "answer": ""} for r in ROWS])
    with pytest.raises(ScoreInputError, match="a test split"):
        score_mmbench(_answers(tmp_path, {"5/0": "A", "5/1": "B"}), test_split)


def test_runner_asks_every_round_and_scores(tsv, tmp_path):
    items = {it.index: it for it in read_mmbench(tsv)}
    seen = {}

    def oracle(qs, ps):
        """Reads the shown options from the prompt and picks the correct text's letter."""
        out = []
        for q, p in zip(qs, ps):
            seen[q.qid] = p
            index, r = (int(x) for x in q.qid.split("/"))
            it = items[index]
            shown = rotated_options(it, r)
            out.append("ABCD"[shown.index(it.options["ABCD".index(it.answer)])])
            assert Image.open(io.BytesIO(q.image_bytes)).size == (24, 24)
        return out

    rep = evaluate(None, "mmbench", tsv, None, tmp_path / "ev", batch_size=4, progress=False, answer_fn=oracle)
    assert len(seen) == 2 + 3 + 4
    assert seen["9/1"] == f"Look closely.\nWhich shape?\nA. square\nB. star\nC. circle\n{MC_PROMPT}"
    assert rep["metrics"]["accuracy"] == 1.0 and rep["metrics"]["n"] == 3
    # --limit counts questions and keeps all their rounds
    rep = evaluate(None, "mmbench", tsv, None, tmp_path / "ev2", limit=2, progress=False, answer_fn=oracle)
    assert rep["n_questions"] == 2 + 3 and rep["metrics"]["n"] == 2
    assert [q.qid for q in read_questions("mmbench", tsv, None)][:3] == ["5/0", "5/1", "9/0"]


# MMBench-CN's layout (MMBench_DEV_CN.tsv): the same columns, the texts in Chinese; one question (a sum) without a
# Chinese character, as the translated files have some
CN_ROWS = [
    {**ROWS[0], "question": "图片是什么颜色？", "A": "红色", "B": "绿色"},
    {**ROWS[1], "question": "哪种形状？", "hint": "仔细看。", "A": "圆形", "B": "正方形", "C": "星形"},
    {**ROWS[2], "question": "1 + 1 = ?", "hint": "nan"},
]
CN_INSTRUCTION = "请直接回答选项字母。"  # LLaVA-1.5's model_vqa_mmbench.py --lang cn (scripts/v1_5/eval/mmbench_cn.sh)
EN_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _prompts(path, tmp_path, name, **kw) -> dict:
    seen = {}

    def record(qs, ps):
        seen.update((q.qid, p) for q, p in zip(qs, ps))
        return ["A"] * len(qs)

    evaluate(None, "mmbench", path, None, tmp_path / name, progress=False, answer_fn=record, **kw)
    return seen


def test_mmbench_cn_is_asked_with_llavas_chinese_instruction(tmp_path):
    """An MMBench-CN file (most questions with Chinese characters) is asked with LLaVA's Chinese instruction, every
    question of it (the sum without Chinese characters too, as LLaVA's --lang cn asks the whole file); an English
    file, or one English-majority file with a Chinese question, with the English one; --lang overrides either;
    the language is in eval_run.json, so a folder answered in one is not continued in the other."""
    cn = write_tsv(tmp_path / "MMBench_DEV_CN.tsv", CN_ROWS)
    en = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", ROWS)
    mixed = write_tsv(tmp_path / "mixed.tsv", [CN_ROWS[0], ROWS[1], ROWS[2]])
    seen = _prompts(cn, tmp_path, "cn")
    assert seen["9/1"] == f"仔细看。\n哪种形状？\nA. 正方形\nB. 星形\nC. 圆形\n{CN_INSTRUCTION}"
    assert seen["12/0"] == f"1 + 1 = ?\nA. 1\nB. 2\nC. 3\nD. 4\n{CN_INSTRUCTION}"
    assert len(seen) == 9 and all(p.endswith("\n" + CN_INSTRUCTION) for p in seen.values())
    assert json.loads((tmp_path / "cn" / "eval_run.json").read_text())["lang"] == "cn"
    assert all(p.endswith("\n" + EN_INSTRUCTION) for p in _prompts(en, tmp_path, "en").values())
    # a folder from before the language was recorded (English prompts) continues as English, not as Chinese
    run = tmp_path / "en" / "eval_run.json"
    assert json.loads(run.read_text())["lang"] == "en"
    run.write_text(json.dumps({k: v for k, v in json.loads(run.read_text()).items() if k not in ("lang", "ocr")}))
    assert _prompts(en, tmp_path, "en") == {}  # nothing left to ask: continued
    with pytest.raises(ScoreInputError, match=r"lang = \"en\", but this run has lang = \"cn\""):
        _prompts(en, tmp_path, "en", lang="cn")
    assert all(p.endswith("\n" + EN_INSTRUCTION) for p in _prompts(mixed, tmp_path, "mixed").values())
    seen = _prompts(cn, tmp_path, "cn_as_en", lang="en")
    assert seen["5/0"] == f"图片是什么颜色？\nA. 红色\nB. 绿色\n{EN_INSTRUCTION}"
    assert all(p.endswith("\n" + CN_INSTRUCTION) for p in _prompts(en, tmp_path, "en_as_cn", lang="cn").values())
    with pytest.raises(ScoreInputError, match=r"lang = \"cn\", but this run has lang = \"en\""):
        _prompts(cn, tmp_path, "cn", lang="en")


def test_mmbench_lang_option_and_suite_key(tmp_path, capsys):
    from emma_mamba.cli import main
    from emma_mamba.eval.suite import read_suite, run_suite

    cn = write_tsv(tmp_path / "MMBench_DEV_CN.tsv", CN_ROWS)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"root: {tmp_path}\nbenchmarks:\n  mmbench_cn: {{task: mmbench, questions: {cn.name}}}\n"
                     f"  mmbench_cn_en: {{task: mmbench, questions: {cn.name}, lang: en}}\n")
    seen = {}

    def record(qs, ps):
        seen.update(((q.qid, p.rsplit("\n", 1)[1]) for q, p in zip(qs, ps)))
        return ["A"] * len(qs)

    run_suite(None, read_suite(suite), tmp_path / "suite_cn", progress=False, answer_fn=record, only=["mmbench_cn"])
    assert set(seen.values()) == {CN_INSTRUCTION}
    seen.clear()
    run_suite(None, read_suite(suite), tmp_path / "suite_en", progress=False, answer_fn=record,
              only=["mmbench_cn_en"])
    assert set(seen.values()) == {EN_INSTRUCTION}
    suite.write_text(f"benchmarks:\n  mmbench: {{questions: {cn}, lang: chinese}}\n")
    with pytest.raises(ScoreInputError, match=r"benchmarks.mmbench: lang must be one of \['auto', 'en', 'cn'\]"):
        read_suite(suite)
    # --lang is mmbench's: refused on another task, named
    rc = main(["eval", "--task", "seed", "--questions", str(cn), "--images", str(tmp_path), "--lang", "cn",
               "--api", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--lang applies to mmbench only, not --task seed" in capsys.readouterr().err


def test_released_tsv_layout_circular_copies_and_shared_images(tmp_path):
    # The released TSVs (mmbench_dev_20230712.tsv, VLMEvalKit's MMBench_DEV_EN.tsv) already hold the CircularEval
    # passes: question i at index i, its options shifted at i + 1000000, i + 2000000, ... (open-compass/MMBench
    # issues #8, #12, #31; VLMEvalKit's mcq_circular_eval groups by index % 1e6); VLMEvalKit's files give a
    # repeated picture as the index of the row holding it. Each question is asked once per rotation, scored once.
    q7 = {"question": "Which shape?", "hint": "nan", "category": "shape", "l2-category": "attribute"}
    rows = [
        {**q7, "index": 7, "A": "circle", "B": "square", "C": "star", "answer": "C", "image": _png("blue")},
        {**q7, "index": 1000007, "A": "square", "B": "star", "C": "circle", "answer": "B", "image": "7"},
        {**q7, "index": 2000007, "A": "star", "B": "circle", "C": "square", "answer": "A", "image": "7"},
        {"index": 8, "question": "Same picture, other question?", "A": "yes", "B": "no", "answer": "A",
         "category": "c", "l2-category": "l2", "image": "7"},
        {"index": 1000008, "question": "Same picture, other question?", "A": "no", "B": "yes", "answer": "B",
         "category": "c", "l2-category": "l2", "image": "7"},
    ]
    tsv = write_tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    items = read_mmbench(tsv)
    assert [(it.index, it.options, it.answer) for it in items] == [(7, ["circle", "square", "star"], "C"),
                                                                   (8, ["yes", "no"], "A")]
    assert items[1].image == items[0].image == base64.b64decode(_png("blue"))
    qs = read_questions("mmbench", tsv, None)
    assert [q.qid for q in qs] == ["7/0", "7/1", "7/2", "8/0", "8/1"]
    # every rotation right: circular accuracy 1 over the two questions (not five "questions" of 3 x 3 rounds)
    replies = {"7/0": "C", "7/1": "B", "7/2": "A", "8/0": "A", "8/1": "B"}
    m = score_mmbench(_answers(tmp_path, replies), tsv)
    assert m["n"] == 2 and m["accuracy"] == 1.0 and m["n_missing"] == 0


def test_cli_eval_mmbench_with_a_random_checkpoint(tsv, tmp_path, capsys):
    import torch

    from emma_mamba.cli import main
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    EmmaMamba(get_preset("tiny"), for_training=False).save(ckpt)
    out = tmp_path / "ev"
    assert main(["eval", "--task", "mmbench", "--questions", str(tsv), "--checkpoint", str(ckpt), "--out", str(out),
                 "--max-new-tokens", "2", "--no-progress"]) == 0
    assert "MMBench  n=3" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and {x["question_id"] for x in lines} >= {"5/0", "12/3"}
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["metrics"] == score_mmbench(out / "answers.jsonl", tsv)  # the same as scoring the file
    assert main(["eval", "--task", "pope", "--questions", str(tsv), "--checkpoint", str(ckpt)]) == 2
    assert "--task pope needs --images DIR" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- SEED-Bench

def _seed_file(tmp_path, with_answers=True):
    imgs = tmp_path / "seed_images"
    imgs.mkdir(exist_ok=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (24, 24), colour).save(imgs / name)
    q = [
        {"question_id": "101", "question": "What colour?", "choice_a": "red", "choice_b": "blue", "choice_c": "green",
         "choice_d": "black", "answer": "A", "data_id": "a.png", "data_type": "image", "question_type_id": 1},
        {"question_id": "102", "question": "How many objects?", "choice_a": "0", "choice_b": "1", "choice_c": "2",
         "choice_d": "3", "answer": "B", "data_id": "b.png", "data_type": "image", "question_type_id": 2},
        {"question_id": "103", "question": "Which action?", "choice_a": "run", "choice_b": "sit", "choice_c": "jump",
         "choice_d": "walk", "answer": "D", "data_id": "b.png", "data_type": "image", "question_type_id": 2},
        {"question_id": "900", "question": "What happens next?", "choice_a": "x", "choice_b": "y", "choice_c": "z",
         "choice_d": "w", "answer": "A", "data_id": "clip.mp4", "data_type": "video", "question_type_id": 10},
    ]
    if not with_answers:
        for r in q:
            r.pop("answer")
    p = tmp_path / "SEED-Bench.json"
    p.write_text(json.dumps({"questions": q, "question_type": {"Scene Understanding": 1, "Instances Counting": 2,
                                                                "Action Prediction": 10}}))
    return p, imgs


def test_seed_by_hand(tmp_path):
    from emma_mamba.eval.scorers import score

    ann, _ = _seed_file(tmp_path)
    # 101 "A" right; 102 "blue"? not an option text -> unparsed, wrong; 103 "walk" (option D's text) right
    ans = tmp_path / "a.jsonl"
    ans.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n"
                           for k, v in (("101", "A"), ("102", "blue"), ("103", "walk"))))
    m = score("seed", ans, ann)
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3) and m["n_unparsed_replies"] == 1
    assert m["per_question_type"] == pytest.approx({"Scene Understanding": 1.0, "Instances Counting": 0.5})
    video = tmp_path / "v.jsonl"
    video.write_text(json.dumps({"question_id": "900", "text": "A"}) + "\n")
    with pytest.raises(ScoreInputError, match="question id '900' is not in the annotations"):
        score("seed", video, ann)  # video questions are not part of the image benchmark


def test_seed_runner(tmp_path):
    ann, imgs = _seed_file(tmp_path)
    seen = {}

    def fn(qs, ps):
        seen.update({q.qid: p for q, p in zip(qs, ps)})
        return ["A"] * len(qs)

    rep = evaluate(None, "seed", ann, imgs, tmp_path / "ev", progress=False, answer_fn=fn)
    assert sorted(seen) == ["101", "102", "103"]
    assert seen["102"] == f"How many objects?\nA. 0\nB. 1\nC. 2\nD. 3\n{MC_PROMPT}"
    assert rep["metrics"]["accuracy"] == pytest.approx(1 / 3)
    (tmp_path / "test").mkdir()
    no_answers, imgs2 = _seed_file(tmp_path / "test", with_answers=False)  # answers withheld: answer, do not score
    rep = evaluate(None, "seed", no_answers, imgs2, tmp_path / "ev2", progress=False, answer_fn=fn)
    assert rep["metrics"] is None


# ---------------------------------------------------------------------------------------------- ScienceQA

def _scienceqa(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["shark", "whale", "trout"], "answer": 1, "hint": "",
              "image": "image.png", "split": "test", "subject": "natural science", "grade": "grade4"},
        "2": {"question": "Which word is a noun?", "choices": ["run", "table"], "answer": 1,
              "hint": "Look at the words.", "image": "image.png", "split": "test", "subject": "language science",
              "grade": "grade8"},
        "3": {"question": "Which map shows Asia?", "choices": ["A map", "B map", "C map", "D map", "E map"],
              "answer": 4, "hint": "", "image": "image.png", "split": "test", "subject": "social science",
              "grade": "grade5"},
        "4": {"question": "No picture here?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
              "split": "test", "subject": "natural science", "grade": "grade2"},
        "5": {"question": "A val problem", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "split": "val", "subject": "natural science", "grade": "grade3"},
    }
    p = tmp_path / "problems.json"
    p.write_text(json.dumps(problems))
    imgs = tmp_path / "sqa"
    for pid, split in (("1", "test"), ("2", "test"), ("5", "val")):
        (imgs / split / pid).mkdir(parents=True)
        Image.new("RGB", (24, 24), "green").save(imgs / split / pid / "image.png")
    (imgs / "3").mkdir(parents=True)  # the flat layout works too
    Image.new("RGB", (24, 24), "white").save(imgs / "3" / "image.png")
    return p, imgs


def test_scienceqa_by_hand(tmp_path):
    from emma_mamba.eval.scorers import score

    problems, imgs = _scienceqa(tmp_path)
    seen = {}

    def fn(qs, ps):
        seen.update({q.qid: p for q, p in zip(qs, ps)})
        # 1: "whale" (B) right; 2: "A" (run) wrong; 3: "E" right
        return [{"1": "whale", "2": "A", "3": "E"}[q.qid] for q in qs]

    rep = evaluate(None, "scienceqa", problems, imgs, tmp_path / "ev", progress=False, answer_fn=fn)
    assert sorted(seen) == ["1", "2", "3"]  # the test split's image problems only
    assert seen["2"] == f"Context: Look at the words.\nWhich word is a noun?\nA. run\nB. table\n{MC_PROMPT}"
    m = rep["metrics"]
    assert m["split"] == "test" and m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_subject"] == {"language science": 0.0, "natural science": 1.0, "social science": 1.0}
    assert m["per_grade"] == pytest.approx({"grades 1-6": 1.0, "grades 7-12": 0.0})
    assert score("scienceqa", tmp_path / "ev" / "answers.jsonl", problems) == m
    # the val split on request; answers spanning two splits are refused
    rep = evaluate(None, "scienceqa", problems, imgs, tmp_path / "val", progress=False, split="val",
                   answer_fn=lambda qs, ps: ["a"] * len(qs))
    assert rep["metrics"]["split"] == "val" and rep["metrics"]["accuracy"] == 1.0
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"question_id": "1", "text": "B"}) + "\n" + json.dumps({"question_id": "5",
                                                                                        "text": "A"}) + "\n")
    with pytest.raises(ScoreInputError, match="answers span the splits"):
        score("scienceqa", both, problems)
    (imgs / "test" / "2" / "image.png").unlink()
    with pytest.raises(ScoreInputError, match=r"problem '2': image 'image.png' not found"):
        read_questions("scienceqa", problems, imgs)
