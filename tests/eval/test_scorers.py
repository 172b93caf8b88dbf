"""Scorers against values computed by hand on small files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emma_mamba import cli
from emma_mamba.eval.scorers import (ScoreInputError, normalize_answer, normalize_gqa, parse_choice, parse_mme_answer,
                                     score, summary, vqa_accuracy, yes_no)
from emma_mamba.eval.vqa import normalize_textvqa


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- VQAv2

@pytest.mark.parametrize("raw, expected", [
    ("The dog", "dog"),                      # article
    ("an apple", "apple"),
    ("A Red Car", "red car"),                # case + article
    ("yes.", "yes"),                         # final period
    ("Yes. ", "yes"),                        # trailing space
    ("  no  ", "no"),
    ("two", "2"),                            # number words
    ("None", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),                    # only zero..ten are mapped
    ("Two dogs!", "2 dogs"),
    ("dont", "don't"),                       # contractions
    ("isnt", "isn't"),
    ("cant", "can't"),
    ("wont", "won't"),
    ("youre", "you're"),
    ("it's", "it's"),                        # apostrophes are not punctuation
    ("red-white", "red white"),              # punctuation not touching a space -> space
    ("red - white", "red white"),            # touching a space -> deleted
    ("hello, world", "hello world"),
    ("red,blue", "red blue"),
    ("1,000", "1000"),                       # digit,digit: every mark deleted
    ("3.5", "3.5"),                          # decimal point kept
    ("3.5.", "3.5"),
    ("what?", "what"),
    ("(left)", "left"),
    ("the\tcat\nsat", "cat sat"),            # tabs and newlines are spaces
])
def test_vqa_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_period_strip_stops_after_32():
    # the official scripts call periodStrip.sub("", text, re.UNICODE): the flag lands in sub's count argument
    # (re.UNICODE == 32), so only the first 32 periods not followed by a digit are deleted
    assert normalize_answer("." * 40 + "yes") == "." * 8 + "yes"
    assert normalize_answer("." * 32 + "yes") == "yes"
    assert normalize_answer("yes." * 34) == "yes" * 33 + ".yes."  # 34 periods: the last two stay


def test_vqa_soft_accuracy_by_hand():
    # k humans of 10 gave the answer. Leaving out one of the k: k-1 matches (k such subsets); leaving out
    # another: k matches (10-k subsets). acc = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
    ten = lambda k: ["red"] * k + ["blue"] * (10 - k)  # noqa: E731
    assert vqa_accuracy("red", ten(0)) == 0.0
    assert vqa_accuracy("red", ten(1)) == pytest.approx((1 * 0 + 9 * (1 / 3)) / 10)  # 0.3
    assert vqa_accuracy("red", ten(2)) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert vqa_accuracy("red", ten(3)) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("red", ten(4)) == pytest.approx(1.0)
    assert vqa_accuracy("red", ten(10)) == pytest.approx(1.0)


def _vqa_files(tmp_path):
    def ann(qid, humans, atype, qtype):
        return {"question_id": qid, "image_id": qid, "question_type": qtype, "answer_type": atype,
                "multiple_choice_answer": humans[0],
                "answers": [{"answer": h, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, h in enumerate(humans)]}
    anns = {"annotations": [
        ann(1, ["red"] * 2 + ["blue"] * 8, "other", "what color is the"),
        ann(2, ["2", "two", "Two."] + ["3"] * 7, "number", "how many"),
        ann(3, ["yes"] * 4 + ["no"] * 6, "yes/no", "is the"),
        ann(4, ["dog"] * 10, "other", "what is"),
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(anns))
    return tmp_path / "ann.json"


def test_vqav2_file_by_hand(tmp_path):
    ann = _vqa_files(tmp_path)
    res = tmp_path / "res.json"  # the official results format: a JSON list
    res.write_text(json.dumps([{"question_id": 1, "answer": "Red."},   # 2 humans -> 0.6
                               {"question_id": 2, "answer": "two"},    # "2","two","Two." -> 3 humans -> 0.9
                               {"question_id": 3, "answer": "Yes"},    # 4 humans -> 1.0
                               {"question_id": 4, "answer": "a cat"}]))  # 0
    m = score("vqav2", res, ann)
    assert m["n"] == 4 and m["n_missing"] == 0
    assert m["accuracy"] == pytest.approx((0.6 + 0.9 + 1.0 + 0.0) / 4)
    assert m["per_answer_type"] == pytest.approx({"other": 0.3, "number": 0.9, "yes/no": 1.0})
    assert m["per_question_type"]["how many"] == pytest.approx(0.9)
    # LLaVA-style JSONL answers with "text" work the same
    write_jsonl(tmp_path / "res.jsonl", [{"question_id": 1, "text": "red"}, {"question_id": 2, "text": "2"},
                                         {"question_id": 3, "text": "no"}, {"question_id": 4, "text": "Dog"}])
    m = score("vqav2", tmp_path / "res.jsonl", ann)
    # q3 "no": 6 humans -> 1.0
    assert m["accuracy"] == pytest.approx((0.6 + 0.9 + 1.0 + 1.0) / 4)


def test_vqav2_and_vizwiz_replies_pass_llava_submission_pre_pass(tmp_path):
    # LLaVA-1.5's convert_{vqav2,vizwiz}_for_submission.py run the EvalAI answer processor on every reply (commas
    # and "?" deleted, "'s" split off) before the server's rules; the human answers only get the server's rules.
    # By hand: "red,white" -> "redwhite" (no human said it) where the plain rules give "red white" (3 humans: 0.9);
    # "men's" -> "men 's" (no human) where the plain rules keep "men's" (10 humans: 1.0); "blue?" -> "blue" (8).
    anns = {"annotations": [
        {"question_id": i, "answers": [{"answer": h} for h in humans]}
        for i, humans in ((1, ["red white"] * 3 + ["red"] * 7), (2, ["men's"] * 10), (3, ["blue"] * 8 + ["red"] * 2))]}
    (tmp_path / "ann.json").write_text(json.dumps(anns))
    res = write_jsonl(tmp_path / "r.jsonl", [{"question_id": 1, "text": "red,white"},
                                             {"question_id": 2, "text": "men's"},
                                             {"question_id": 3, "text": "Blue?"}])
    assert score("vqav2", res, tmp_path / "ann.json")["accuracy"] == pytest.approx((0.0 + 0.0 + 1.0) / 3)
    assert normalize_answer("red,white") == "red white" and normalize_answer("men's") == "men's"
    doc = [{"image": f"VizWiz_val_{i:08d}.jpg", "question": "?", "answers": [{"answer": h} for h in humans]}
           for i, humans in enumerate((["red white"] * 3 + ["red"] * 7, ["men's"] * 10, ["blue"] * 8 + ["red"] * 2))]
    (tmp_path / "val.json").write_text(json.dumps(doc))
    res = write_jsonl(tmp_path / "v.jsonl", [{"question_id": d["image"], "text": t}
                                             for d, t in zip(doc, ("red,white", "men's", "Blue?"))])
    assert score("vizwiz", res, tmp_path / "val.json")["accuracy"] == pytest.approx((0.0 + 0.0 + 1.0) / 3)


def test_vqav2_errors(tmp_path):
    ann = _vqa_files(tmp_path)
    write_jsonl(tmp_path / "r.jsonl", [{"question_id": 1, "answer": "red"}, {"question_id": 99, "answer": "x"}])
    with pytest.raises(ScoreInputError, match=r"r\.jsonl: line 2: question id 99 is not in the annotations"):
        score("vqav2", tmp_path / "r.jsonl", ann)
    write_jsonl(tmp_path / "r.jsonl", [{"question_id": 1, "answer": "red"}, {"question_id": 2}])
    with pytest.raises(ScoreInputError, match=r"r\.jsonl: line 2: .*no 'answer' or 'text' field"):
        score("vqav2", tmp_path / "r.jsonl", ann)
    write_jsonl(tmp_path / "r.jsonl", [{"question_id": 1, "answer": "red"}])
    with pytest.raises(ScoreInputError, match="no answer for 3 of 4 questions"):
        score("vqav2", tmp_path / "r.jsonl", ann)
    assert score("vqav2", tmp_path / "r.jsonl", ann, allow_missing=True)["n_missing"] == 3
    bad = tmp_path / "bad_ann.json"
    bad.write_text(json.dumps({"annotations": [{"question_id": 1, "answers": [{"answer": "a"}]}, {"answers": []}]}))
    with pytest.raises(ScoreInputError, match=r"bad_ann\.json: annotations\[1\]: .*no 'question_id'"):
        score("vqav2", tmp_path / "r.jsonl", bad)
    (tmp_path / "broken.jsonl").write_text('{"question_id": 1, "answer": "red"}\n{"question_id": 2,\n')
    with pytest.raises(ScoreInputError,
                       match=r"broken\.jsonl: line 2, column \d+ \(character \d+ of the line\): not valid JSON"):
        score("vqav2", tmp_path / "broken.jsonl", ann)


# -------------------------------------------------------------------------------------------- TextVQA, VizWiz

def _textvqa_file(tmp_path):
    # ten human answers per question, as strings (TextVQA_0.5.1_val.json)
    doc = {"dataset_name": "textvqa", "data": [
        {"question_id": 7, "image_id": "a1", "question": "what brand?",
         "answers": ["Nokia"] * 4 + ["nokia."] + ["sony"] * 5},
        {"question_id": 8, "image_id": "b2", "question": "what number?", "answers": ["two"] * 2 + ["3"] * 8},
        {"question_id": 9, "image_id": "c3", "question": "what word?", "answers": ["stop"] * 10},
    ]}
    p = tmp_path / "TextVQA_0.5.1_val.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize("raw, expected", [
    # M4C's EvalAI answer processor: lower-case, delete every "," and "?", split "'s" off, then the VQAv2 rules
    ("red,blue", "redblue"),                 # VQAv2's rules: "red blue"
    ("hello, world", "hello world"),
    ("1,000", "1000"),
    ("1,000-2,000", "1000 2000"),            # no comma left, so "-" becomes a space (VQAv2: "10002000")
    ("It's", "it 's"),                       # VQAv2: "it's"
    ("McDonald's", "mcdonald 's"),
    ("what?", "what"),
    ("who?no", "whono"),                     # VQAv2: "who no"
    ("Two.", "2"),
    ("The Stop", "stop"),
])
def test_textvqa_normalisation(raw, expected):
    assert normalize_textvqa(raw) == expected


def test_textvqa_uses_its_own_normalisation(tmp_path):
    doc = {"data": [{"question_id": 1, "answers": ["coca cola"] * 10},
                    {"question_id": 2, "answers": ["joe's"] * 2 + ["joe 's"] * 2 + ["joes"] * 6},
                    {"question_id": 3, "answers": ["red, white"] * 3 + ["red white"] * 7}]}
    (tmp_path / "val.json").write_text(json.dumps(doc))
    # q1 "coca,cola" -> "cocacola": no human (1.0 under the VQAv2 rules); q2 "Joe's" -> "joe 's", as the four
    # "joe's"/"joe 's" -> 1.0; q3 "red,white" -> "redwhite": 0 (VQAv2 rules: "red white", all ten -> 1.0)
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "coca,cola"},
                                             {"question_id": 2, "text": "Joe's"},
                                             {"question_id": 3, "text": "red,white"}])
    assert score("textvqa", ans, tmp_path / "val.json")["accuracy"] == pytest.approx(1.0 / 3)


def test_textvqa_by_hand(tmp_path):
    ann = _textvqa_file(tmp_path)
    # q7 "NOKIA": 5 humans after normalisation -> 1.0; q8 "2": 2 humans -> 0.6; q9 "go": 0
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 7, "text": "NOKIA"}, {"question_id": 8, "text": "2"},
                                             {"question_id": 9, "text": "go"}])
    m = score("textvqa", ans, ann)
    assert m["n"] == 3 and m["accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    # the official results list works too, and a partial one with allow_missing
    res = tmp_path / "results.json"
    res.write_text(json.dumps([{"question_id": 8, "answer": "Two."}]))
    assert score("textvqa", res, ann, allow_missing=True)["accuracy"] == pytest.approx(0.6)
    with pytest.raises(ScoreInputError, match="no answer for 2 of 3 questions"):
        score("textvqa", res, ann)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ScoreInputError, match=r"expected a JSON object with a 'data' list \(TextVQA_0.5.1_val.json\)"):
        score("textvqa", ans, bad)


def _vizwiz_file(tmp_path):
    a = lambda text, n: [{"answer": text, "answer_confidence": "yes"}] * n  # noqa: E731
    doc = [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answers": a("soup", 3) + a("can", 7),
         "answer_type": "other", "answerable": 1},
        {"image": "VizWiz_val_00000001.jpg", "question": "What colour?", "answers": a("unanswerable", 10),
         "answer_type": "unanswerable", "answerable": 0},
        {"image": "VizWiz_val_00000002.jpg", "question": "Is it on?", "answers": a("yes", 9) + a("no", 1),
         "answer_type": "yes/no", "answerable": 1},
    ]
    p = tmp_path / "val.json"
    p.write_text(json.dumps(doc))
    return p


def test_vizwiz_by_hand(tmp_path):
    ann = _vizwiz_file(tmp_path)
    # official submission format, keyed by image: "soup" 3 humans -> 0.9; "Unanswerable" -> 1.0; "no" 1 -> 0.3
    res = tmp_path / "results.json"
    res.write_text(json.dumps([{"image": "VizWiz_val_00000000.jpg", "answer": "Soup"},
                               {"image": "VizWiz_val_00000001.jpg", "answer": "Unanswerable"},
                               {"image": "VizWiz_val_00000002.jpg", "answer": "no"}]))
    m = score("vizwiz", res, ann)
    assert m["accuracy"] == pytest.approx((0.9 + 1.0 + 0.3) / 3)
    assert m["per_answer_type"] == pytest.approx({"other": 0.9, "unanswerable": 1.0, "yes/no": 0.3})
    assert m["per_answerability"] == pytest.approx({"answerable": 0.6, "unanswerable": 1.0})
    # the runner's answers.jsonl (question_id = image name) scores the same
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": r["image"], "text": r["answer"]}
                                             for r in json.loads(res.read_text())])
    assert score("vizwiz", ans, ann)["accuracy"] == pytest.approx(m["accuracy"])
    wrong = write_jsonl(tmp_path / "w.jsonl", [{"question_id": "VizWiz_val_00000009.jpg", "text": "x"}])
    with pytest.raises(ScoreInputError, match="question id 'VizWiz_val_00000009.jpg' is not in the annotations"):
        score("vizwiz", wrong, ann)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ScoreInputError, match="expected a JSON list"):
        score("vizwiz", ans, bad)


# ------------------------------------------------------------------------------- multiple-choice replies

@pytest.mark.parametrize("reply, want", [
    ("The answer is a dog.", None),   # the article "a" is not option A (LLaVA's ScienceQA parser: FAILED)
    ("The answer is an owl", None),
    ("The answer is B.", "B"),
    ("Answer: b", "B"),               # a lone lower-case letter at the end is still read
    ("ANSWER IS C", "C"),
])
def test_parse_choice_reads_no_article_as_a_letter(reply, want):
    assert parse_choice(reply, ["cat", "dog", "owl"]) == want


def test_scienceqa_article_is_not_option_a(tmp_path):
    problems = {"7": {"question": "Which animal barks?", "choices": ["cat", "dog"], "answer": 0, "hint": "",
                      "image": "image.png", "split": "test", "subject": "natural science", "grade": "grade3"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": "7", "text": "The answer is a dog."}])
    m = score("scienceqa", ans, tmp_path / "problems.json")
    assert m["accuracy"] == 0.0 and m["n_unparsed_replies"] == 1  # was read as "A" (cat, the gold answer)


# ------------------------------------------------------------------------------------------------ POPE

POPE_QUESTIONS = [{"question_id": i + 1, "image": f"img{i // 2}.jpg", "text": "Is there a dog in the image?",
                   "label": "yes" if i < 5 else "no"} for i in range(10)]
POPE_REPLIES = [  # reply, what it is read as, and whether it started with yes/no
    ("Yes, there is a dog.", True),      # 1 label yes -> TP
    ("No.", False),                      # 2 yes -> FN
    ("yes", True),                       # 3 yes -> TP
    ("There is a cat in the image.", True),  # 4 yes -> TP (POPE's fallback: no "no"/"not" -> yes)
    ("I do not see one.", False),        # 5 yes -> FN (fallback: "not")
    ("no", False),                       # 6 no -> TN
    ("Yes", True),                       # 7 no -> FP
    ("NO!", False),                      # 8 no -> TN
    ("No, there is not.", False),        # 9 no -> TN
    ("There is no dog. Yes.", False),    # 10 no -> TN (fallback on the first sentence: "no")
]


def test_pope_yes_no_reading():
    assert [yes_no(r)[0] for r, _ in POPE_REPLIES] == [want for _, want in POPE_REPLIES]
    assert [yes_no(r)[1] for r, _ in POPE_REPLIES].count(False) == 3
    # quotes around the word are punctuation too (an apostrophe is a word character: "'No'" was read as the word
    # "'no'", not "no", and fell to the fallback, which says yes); inside a word it stays ("isn't")
    assert [yes_no(r) for r in ("'No'", "'yes'.", "' no '", "It isn't.")] == \
        [(False, True), (True, True), (False, True), (True, False)]


@pytest.mark.parametrize("reply, want", [
    # POPE's evaluate.py / LLaVA's eval_pope.py: the first sentence holds "no" or "not" -> no, even after "Yes"
    # (these were read as yes by a first-word rule)
    ("Yes, there is no dog.", False), ("Yes, but it is not clear.", False), ("yes, no", False),
    ("Yes it is not", False),
    ("Yes. There is no dog.", True), ("Yes, there is a dog.", True), ("No", False), ("Yes", True),
])
def test_pope_reads_the_first_sentence_as_pope_does(reply, want):
    def official(text):  # POPE's / LLaVA-1.5's rule, written from their scripts
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return not ("No" in words or "not" in words or "no" in words)
    assert official(reply) == want
    assert yes_no(reply)[0] == want


def test_pope_file_by_hand(tmp_path):
    q = write_jsonl(tmp_path / "coco_pope_random.jsonl", POPE_QUESTIONS)
    a = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": i + 1, "text": r}
                                                 for i, (r, _) in reversed(list(enumerate(POPE_REPLIES)))])
    m = score("pope", a, q)
    # TP = 3 (1, 3, 4), FN = 2 (2, 5), TN = 4 (6, 8, 9, 10), FP = 1 (7)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 2, 4, 1)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))  # 2/3
    assert m["yes_ratio"] == pytest.approx(4 / 10)
    assert m["n_unparsed"] == 3
    # POPE's own answer files: "answer" key, no question_id, matched by line order
    a2 = write_jsonl(tmp_path / "pope_answers.jsonl", [{"question": "q", "answer": r} for r, _ in POPE_REPLIES])
    assert score("pope", a2, q)["accuracy"] == pytest.approx(0.7)


def test_pope_errors(tmp_path):
    q = write_jsonl(tmp_path / "q.jsonl", POPE_QUESTIONS)
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 11, "text": "no"}])
    with pytest.raises(ScoreInputError, match=r"a\.jsonl: line 2: question id 11 is not in the annotations .*q\.jsonl"):
        score("pope", a, q)
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}, {"text": "no"}])
    with pytest.raises(ScoreInputError, match=r"a\.jsonl: line 2: answer has no 'question_id'"):
        score("pope", a, q)
    bad = write_jsonl(tmp_path / "bad.jsonl", POPE_QUESTIONS[:3] + [{"question_id": 4, "text": "x"}])
    with pytest.raises(ScoreInputError, match=r"bad\.jsonl: line 4: .*no 'label' field"):
        score("pope", a, bad)
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(POPE_QUESTIONS[0], label="maybe")])
    with pytest.raises(ScoreInputError, match=r"bad\.jsonl: line 1: label must be 'yes' or 'no'"):
        score("pope", a, bad)
    a = write_jsonl(tmp_path / "a.jsonl", [{"answer": "yes"}] * 3)
    with pytest.raises(ScoreInputError, match="3 answers without question_id but .* has 10 questions"):
        score("pope", a, q)
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 1, "text": "no"}])
    with pytest.raises(ScoreInputError, match="line 2: second answer for question id 1"):
        score("pope", a, q)


# ------------------------------------------------------------------------------------------------- GQA

def test_gqa_by_hand(tmp_path):
    qs = {"101": {"imageId": "n1", "question": "Is the cup to the left or right of the plate?", "answer": "left",
                  "types": {"structural": "choose", "semantic": "rel"}},
          "102": {"imageId": "n1", "question": "Is there a cat?", "answer": "yes",
                  "types": {"structural": "verify", "semantic": "rel"}},
          "103": {"imageId": "n2", "question": "What color is the car?", "answer": "red",
                  "types": {"structural": "query", "semantic": "attr"}}}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(qs))
    preds = [{"questionId": "101", "prediction": "Left."}, {"questionId": 102, "prediction": "no"},
             {"questionId": "103", "prediction": " RED "}]
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    m = score("gqa", tmp_path / "pred.json", tmp_path / "testdev_balanced_questions.json")
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_structural_type"] == {"choose": 1.0, "query": 1.0, "verify": 0.0}
    assert m["per_semantic_type"] == pytest.approx({"attr": 1.0, "rel": 0.5})
    assert normalize_gqa("The red.") == "the red"  # light normalisation only: no article removal
    (tmp_path / "pred.json").write_text(json.dumps(preds + [{"questionId": "999", "prediction": "x"}]))
    with pytest.raises(ScoreInputError, match=r"pred\.json: record 4: question id '999' is not in the annotations"):
        score("gqa", tmp_path / "pred.json", tmp_path / "testdev_balanced_questions.json")
    (tmp_path / "pred.json").write_text(json.dumps([{"questionId": "101"}]))
    with pytest.raises(ScoreInputError, match=r"record 1: .*no 'prediction' or 'answer' or 'text' field"):
        score("gqa", tmp_path / "pred.json", tmp_path / "testdev_balanced_questions.json")


def test_gqa_counts_balanced_questions_only(tmp_path):
    # GQA's eval.py adds a question to the accuracy only when question["isBalanced"]
    qs = {"1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify", "semantic": "obj"}},
          "2": {"answer": "no", "isBalanced": False, "types": {"structural": "verify", "semantic": "obj"}},
          "3": {"answer": "red", "isBalanced": True, "types": {"structural": "query", "semantic": "attr"}}}
    (tmp_path / "testdev_all_questions.json").write_text(json.dumps(qs))
    preds = [{"questionId": "1", "prediction": "yes"}, {"questionId": "2", "prediction": "yes"},
             {"questionId": "3", "prediction": "blue"}]
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    m = score("gqa", tmp_path / "pred.json", tmp_path / "testdev_all_questions.json")
    assert m["n"] == 2 and m["accuracy"] == pytest.approx(1 / 2)  # all three: 1/3
    assert m["per_structural_type"] == {"query": 0.0, "verify": 1.0}


# ------------------------------------------------------------------------------------------------- MME

def test_mme_answer_parsing():
    assert [parse_mme_answer(r) for r in ("Yes", " no ", "Yes, it is.", "Not really", "I think so", "")] == \
        ["yes", "no", "yes", "no", "other", "other"]


def test_mme_by_hand(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "count.txt").write_text(
        "a.png\tAre there two dogs?\tYes\tYes\n"           # right
        "a.png\tAre there three dogs?\tNo\tno\n"           # right -> image a: both right
        "b.png\tIs there one cat?\tYes\tYes, there is\n"   # right
        "b.png\tIs there two cats?\tNo\tyes\n"             # wrong
        "c.png\tIs it red?\tYes\tI think so\n"             # "other": wrong
        "c.png\tIs it blue?\tNo\tNot really\n")            # right
    (res / "color.txt").write_text("d.png\tq1\tYes\tyes\nd.png\tq2\tNo\tNo\n")
    (res / "numerical_calculation.txt").write_text("e.png\tq1\tYes\tNo\ne.png\tq2\tNo\tNo\n")
    m = score("mme", res, None)
    c = m["categories"]["count"]
    assert c["acc"] == pytest.approx(100 * 4 / 6) and c["acc_plus"] == pytest.approx(100 * 1 / 3)
    assert c["score"] == pytest.approx(100.0)
    assert m["categories"]["color"]["score"] == pytest.approx(200.0)
    assert m["categories"]["numerical_calculation"]["acc"] == pytest.approx(50.0)
    assert m["categories"]["numerical_calculation"]["acc_plus"] == pytest.approx(0.0)
    assert m["perception"] == pytest.approx(300.0) and m["cognition"] == pytest.approx(50.0)
    assert m["total"] == pytest.approx(350.0)
    # a template that matches is accepted; one that does not is named
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    for p in res.glob("*.txt"):
        (tpl / p.name).write_text("".join(l.rsplit("\t", 1)[0] + "\n" for l in p.read_text().splitlines()))
    assert score("mme", res, tpl)["total"] == pytest.approx(350.0)
    # a template category with no lines (a subset of MME) is skipped and named, its answers empty or absent
    (tpl / "artwork.txt").write_text("")
    m2 = score("mme", res, tpl)
    assert m2["empty_categories"] == ["artwork"] and m2["total"] == pytest.approx(350.0)
    assert "(empty in the templates, not scored: artwork)" in summary("mme", m2)
    (res / "artwork.txt").write_text("")
    assert score("mme", res, tpl)["empty_categories"] == ["artwork"]
    (res / "artwork.txt").write_text("f.png\tq1\tYes\tYes\nf.png\tq2\tNo\tNo\n")
    with pytest.raises(ScoreInputError, match=r"artwork\.txt: answers for MME category 'artwork', but its template"):
        score("mme", res, tpl)
    (res / "artwork.txt").unlink()
    (tpl / "artwork.txt").unlink()
    (tpl / "color.txt").write_text("d.png\tq1\tYes\nd.png\tDIFFERENT\tNo\n")
    with pytest.raises(ScoreInputError, match=r"color\.txt: line 2 does not match"):
        score("mme", res, tpl)


def test_mme_errors(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "count.txt").write_text("a.png\tq1\tYes\tYes\nb.png\tq2\tNo\tNo\n")
    with pytest.raises(ScoreInputError, match=r"count\.txt: lines 1 and 2 should be the two questions of one image"):
        score("mme", res, None)
    (res / "count.txt").write_text("a.png\tq1\tYes\tYes\na.png\tq2\tNo\n")
    with pytest.raises(ScoreInputError, match=r"count\.txt: line 2: expected 4 tab-separated columns"):
        score("mme", res, None)
    (res / "count.txt").write_text("a.png\tq1\tYes\tYes\n")
    with pytest.raises(ScoreInputError, match="two questions per image"):
        score("mme", res, None)
    (res / "count.txt").unlink()
    (res / "colour.txt").write_text("a.png\tq1\tYes\tYes\na.png\tq2\tNo\tNo\n")
    with pytest.raises(ScoreInputError, match=r"unknown MME category 'colour'"):
        score("mme", res, None)


def test_mme_reads_each_template_file_once(tmp_path, monkeypatch):
    """score_mme reads every template file once (to find the empty categories and to check the answers), and
    every answer file once; the scores are those of the hand computation (count: 3 of 4 right, 1 of 2 images
    with both right: 75 + 50; the empty artwork template: skipped)."""
    res, tpl = tmp_path / "results", tmp_path / "tpl"
    res.mkdir()
    tpl.mkdir()
    (res / "count.txt").write_text("a.png\tq1\tYes\tYes\na.png\tq2\tNo\tno\nb.png\tq3\tYes\tYes\nb.png\tq4\tNo\tYes\n")
    (tpl / "count.txt").write_text("a.png\tq1\tYes\na.png\tq2\tNo\nb.png\tq3\tYes\nb.png\tq4\tNo\n")
    (tpl / "artwork.txt").write_text("")
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (reads.append(self.name), read_text(self, *a, **k))[1])
    m = score("mme", res, tpl)
    assert m["categories"]["count"]["score"] == pytest.approx(125.0) and m["empty_categories"] == ["artwork"]
    assert sorted(reads) == ["artwork.txt", "count.txt", "count.txt"]  # the template's and the answers' count.txt


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_score(tmp_path, capsys):
    q = write_jsonl(tmp_path / "q.jsonl", POPE_QUESTIONS)
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i + 1, "text": r} for i, (r, _) in enumerate(POPE_REPLIES)])
    out = tmp_path / "metrics.json"
    rc = cli.main(["score", "--task", "pope", "--answers", str(a), "--annotations", str(q), "--out", str(out)])
    assert rc == 0
    assert "F1 66.67" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["accuracy"] == pytest.approx(0.7)
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 42, "text": "yes"}])
    rc = cli.main(["score", "--task", "pope", "--answers", str(a), "--annotations", str(q)])
    assert rc == 2 and "question id 42 is not in the annotations" in capsys.readouterr().err


def test_summary_lines_by_hand():
    """The printed table: a breakdown with a single group (TextVQA's one answer type) is left out, a real one kept;
    MMBench-CN's categories align by terminal columns (an ideograph takes two); a --limit run's unanswered
    questions are said as such."""
    from emma_mamba.eval.scorers import summary

    one = summary("textvqa", {"n": 3, "accuracy": 0.5, "per_answer_type": {"textvqa": 0.5}})
    assert one.splitlines() == ["TEXTVQA  n=3  accuracy 50.00"]
    three = summary("vqav2", {"n": 3, "accuracy": 0.5, "per_answer_type": {"yes/no": 1.0, "number": 0.0,
                                                                           "other": 0.5}})
    assert three.splitlines()[1:] == ["  answer_type      yes/no       100.00", "  answer_type      number       0.00",
                                      "  answer_type      other        50.00"]
    mm = summary("mmbench", {"n": 2, "accuracy": 0.5, "accuracy_first_round": 0.5, "n_unparsed_replies": 0,
                             "per_l2_category": {"感知": 1.0, "reasoning": 0.0}})
    rows = mm.splitlines()[1:]
    assert rows == ["  感知" + " " * 28 + " 100.00", "  reasoning" + " " * 23 + " 0.00"]  # 4 + 28 = 9 + 23 columns
    pope = summary("pope", {"n": 4, "accuracy": 1, "precision": 1, "recall": 1, "f1": 1, "yes_ratio": 0.5, "tp": 2,
                            "fp": 0, "tn": 2, "fn": 0, "n_unparsed": 0, "n_missing": 838})
    assert pope.splitlines()[-1] == ("  (838 questions of the annotations were not answered (--limit, or a subset of "
                                     "the questions) and are left out of the scores)")


# ------------------------------------------------------------------------------------- malformed files, named

_SEEDQ = {"question_id": "1", "question": "q", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
          "data_id": "x.jpg", "answer": "A"}
_REF = {"question_id": 0, "image": "x.jpg", "sentence": "s", "bbox": [10, 10, 50, 50], "width": 100, "height": 100}
_MALFORMED = {  # task: (answers, annotations, the message's file, its record and what it says); these were
    # tracebacks (an unhashable id or type, a string size, a byte that is not UTF-8) before
    "pope answer id": ("pope", [{"question_id": [1], "text": "yes"}], [{"question_id": 1, "label": "yes"}],
                       "answers", "line 1", "'question_id' must be a string or a number, got list"),
    "pope question id": ("pope", [{"question_id": 1, "text": "yes"}], [{"question_id": [1], "label": "yes"}],
                         "annotations", "line 1", "'question_id' must be a string or a number, got list"),
    "pope not utf-8": ("pope", b'{"question_id": 1, "text": "oui \xe9"}\n', [{"question_id": 1, "label": "yes"}],
                       "answers", "line 1", "not UTF-8 text (byte b'\\xe9' at byte offset 32)"),
    "vqav2 result id": ("vqav2", [{"question_id": {"id": 1}, "answer": "yes"}],
                        {"annotations": [{"question_id": 1, "answers": [{"answer": "yes"}] * 10}]},
                        "answers", "line 1", "'question_id' must be a string or a number, got dict"),
    "vqav2 answer_type": ("vqav2", [{"question_id": 1, "answer": "yes"}],
                          {"annotations": [{"question_id": 1, "answers": [{"answer": "yes"}] * 10,
                                            "answer_type": ["yes/no"]}]},
                          "annotations", "annotations[0]", "'answer_type' must be a string or a number, got list"),
    "gqa structural": ("gqa", [{"questionId": "1", "prediction": "yes"}],
                       {"1": {"answer": "yes", "types": {"structural": ["verify"]}}},
                       "annotations", "question '1'", "'types.structural' must be a string or a number"),
    "refcoco image_size": ("refcoco", [{"question_id": 0, "text": "[0.1, 0.1, 0.6, 0.6]", "image_size": "100x100"}],
                           [_REF], "answers", "line 1", "image_size must be [width, height] in pixels, got '100x100'"),
    "refcoco width": ("refcoco", [{"question_id": 0, "text": "[0.1, 0.1, 0.6, 0.6]"}], [{**_REF, "width": "100"}],
                      "annotations", "record 1", "width must be a positive number of pixels, got '100'"),
    "seed type id": ("seed", [{"question_id": "1", "text": "A"}],
                     {"questions": [{**_SEEDQ, "question_type_id": [1]}], "question_type": {"Scene": 1}},
                     "annotations", "questions[0]", "'question_type_id' must be a string or a number, got list"),
    "seed types": ("seed", [{"question_id": "1", "text": "A"}],
                   {"questions": [{**_SEEDQ, "question_type_id": 1}], "question_type": [["Scene", 1]]},
                   "annotations", "", "'question_type' must be an object {name: id}"),
    "scienceqa subject": ("scienceqa", [{"question_id": "5", "text": "A"}],
                          {"5": {"question": "q", "choices": ["a", "b"], "answer": 0, "image": "i.png",
                                 "split": "test", "subject": ["natural science"]}},
                          "annotations", "problem '5'", "'subject' must be a string or a number, got list"),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_malformed_files_are_named_with_their_record(case, tmp_path):
    task, answers, annotations, which, loc, says = _MALFORMED[case]

    def put(name, content):
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif name.endswith(".jsonl"):
            write_jsonl(p, content)
        else:
            p.write_text(json.dumps(content))
        return p

    a = put("answers.jsonl", answers)
    g = put("annotations.jsonl" if isinstance(annotations, list) and task != "refcoco" else "annotations.json",
            annotations)
    with pytest.raises(ScoreInputError) as e:
        score(task, a, g)
    msg = str(e.value)
    assert msg.startswith(f"{a if which == 'answers' else g}: {loc}" if loc else str(g)) and says in msg, msg


def test_an_mme_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "mme").mkdir()
    (tmp_path / "mme" / "existence.txt").write_bytes(b"a.jpg\tq1\tYes\tyes\xff\na.jpg\tq2\tNo\tno\n")
    with pytest.raises(ScoreInputError, match=r"existence\.txt: line 1: not UTF-8 text \(byte b'\\xff'"):
        score("mme", tmp_path / "mme", None)
