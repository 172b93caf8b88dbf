"""The evaluation runner (emma_mamba.eval.runner, `emma-mamba eval`): answer files the scorers accept, metrics
equal to scoring those files independently, prompts, resumption after a crash, clear input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from emma_mamba.data.shapes import SHORT_ANSWER_PROMPT, ShapesConfig, generate
from emma_mamba.eval.runner import ScoreInputError, evaluate, read_questions
from emma_mamba.eval.scorers import score


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    generate(ShapesConfig(seed=3, n_train=6, n_heldout=4, image_size=96), d)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt")
    EmmaMamba(get_preset("tiny"), for_training=False).save(d)
    return d


def _files(shapes: Path) -> dict:
    ho = shapes / "heldout"
    return {"pope": ho / "pope_adversarial.jsonl", "vqav2": ho / "vqav2_questions.json",
            "gqa": ho / "gqa_questions.json", "mme": ho / "mme"}


@pytest.mark.parametrize("task", ["pope", "vqav2", "gqa", "mme"])
def test_cli_eval_random_checkpoint_answers_score_independently(task, shapes, checkpoint, tmp_path, capsys):
    from emma_mamba.cli import main

    out = tmp_path / "ev"
    q = _files(shapes)[task]
    argv = ["eval", "--task", task, "--questions", str(q), "--images", str(shapes / "images"), "--checkpoint",
            str(checkpoint), "--out", str(out), "--batch-size", "3", "--max-new-tokens", "3", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    n_q = len(read_questions(task, q, shapes / "images"))
    assert report["n_questions"] == n_q and report["n_answered_this_run"] == n_q
    # the scorer run on its own, on the files the runner wrote, gives the same metrics
    if task == "mme":
        independent = score("mme", out / "mme", q)  # checked against the templates, empty categories skipped
        for t in q.glob("*.txt"):  # every template line answered, in order (4th column appended)
            got = (out / "mme" / t.name).read_text().splitlines() if t.read_text().strip() else []
            assert [g.rsplit("\t", 1)[0] for g in got] == t.read_text().splitlines()
    else:
        ann = shapes / "heldout" / "vqav2_annotations.json" if task == "vqav2" else q
        lines = (out / "answers.jsonl").read_text().splitlines()
        assert len(lines) == n_q
        independent = score(task, out / "answers.jsonl", ann)
        # and `emma-mamba score` accepts the file
        assert main(["score", "--task", task, "--answers", str(out / "answers.jsonl"), "--annotations",
                     str(ann), "--out", str(tmp_path / "m.json")]) == 0
        assert json.loads((tmp_path / "m.json").read_text())["metrics"] == independent
    if task in ("vqav2", "gqa"):
        assert score(task, out / "results.json", ann) == independent  # the official results list too
    assert report["metrics"] == independent


def test_a_run_without_ground_truth_does_not_say_scored(shapes, checkpoint, tmp_path, capsys):
    """VQAv2 questions without their annotations file beside them: answered, not scored (the runner's warning says
    so); the command's --limit line said "2 of 12 questions answered and scored" all the same."""
    import shutil

    from emma_mamba.cli import main

    q = tmp_path / "v2_questions.json"
    shutil.copy(_files(shapes)["vqav2"], q)
    argv = ["eval", "--task", "vqav2", "--questions", str(q), "--images", str(shapes / "images"), "--checkpoint",
            str(checkpoint), "--out", str(tmp_path / "ev"), "--max-new-tokens", "2", "--no-progress", "--limit", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"] is None
    n = len(read_questions("vqav2", q, shapes / "images"))
    assert f"2 of {n} questions answered\n" in out and "scored" not in out


def test_known_replies_give_hand_computed_metrics(shapes, tmp_path):
    f = _files(shapes)
    # POPE, always "Yes.": accuracy = share of "yes" labels, recall 1, yes-ratio 1
    labels = [json.loads(x)["label"] for x in f["pope"].read_text().splitlines()]
    rep = evaluate(None, "pope", f["pope"], shapes / "images", tmp_path / "pope", progress=False,
                   answer_fn=lambda qs, ps: ["Yes." for _ in qs])
    assert rep["metrics"]["accuracy"] == pytest.approx(labels.count("yes") / len(labels))
    assert rep["metrics"]["recall"] == 1.0 and rep["metrics"]["yes_ratio"] == 1.0
    # VQAv2, the gold answer for the first question and a wrong one for the others: (1 + 0...) / n
    ann = json.loads((shapes / "heldout" / "vqav2_annotations.json").read_text())["annotations"]
    gold = {a["question_id"]: a["multiple_choice_answer"] for a in ann}
    first = ann[0]["question_id"]
    rep = evaluate(None, "vqav2", f["vqav2"], shapes / "images", tmp_path / "vqa", progress=False,
                   answer_fn=lambda qs, ps: [gold[q.qid] if q.qid == first else "zebra" for q in qs])
    assert rep["metrics"]["accuracy"] == pytest.approx(1 / len(ann))
    # MME, the ground truth everywhere: acc = acc+ = 100 in every category
    rep = evaluate(None, "mme", f["mme"], shapes / "images", tmp_path / "mme", progress=False,
                   answer_fn=lambda qs, ps: [q.line.split("\t")[2] for q in qs])
    assert all(c["acc"] == 100.0 and c["acc_plus"] == 100.0 for c in rep["metrics"]["categories"].values())


def test_results_files_hold_the_replies_as_llava_uploads_them(shapes, tmp_path):
    """results.json held the raw replies, though metrics.json scored them after LLaVA-1.5's pre-pass (the EvalAI
    answer processor for VQAv2 / VizWiz, convert_gqa_for_eval's rstrip('.').lower() for GQA): an upload was
    scored on other strings than ours. Expected strings by hand from the processor's rules (lower-case; commas and
    '?' deleted; "'s" split off; number words to digits; articles dropped)."""
    f = _files(shapes)
    replies = ["Red,White.", "Two dogs", "The men's hat?", "YES"]
    pick = lambda qs, ps: [replies[i % 4] for i, _ in enumerate(qs)]  # noqa: E731
    evaluate(None, "vqav2", f["vqav2"], shapes / "images", tmp_path / "vqa", progress=False, answer_fn=pick)
    got = [r["answer"] for r in json.loads((tmp_path / "vqa" / "results.json").read_text())]
    want = ["redwhite", "2 dogs", "men 's hat", "yes"]
    assert got == [want[i % 4] for i in range(len(got))]
    raw = [json.loads(x)["text"] for x in (tmp_path / "vqa" / "answers.jsonl").read_text().splitlines()]
    assert raw == [replies[i % 4] for i in range(len(raw))]  # the answers file keeps what the model said
    evaluate(None, "gqa", f["gqa"], shapes / "images", tmp_path / "gqa", progress=False, answer_fn=pick)
    got = [r["prediction"] for r in json.loads((tmp_path / "gqa" / "results.json").read_text())]
    want = ["red,white", "two dogs", "the men's hat?", "yes"]
    assert got == [want[i % 4] for i in range(len(got))]


def test_prompts_follow_the_training_format(shapes, tmp_path):
    seen = {}

    def fn(qs, ps):
        for q, p in zip(qs, ps):
            seen[q.qid] = (q.text, p)
        return ["no"] * len(qs)

    f = _files(shapes)
    evaluate(None, "gqa", f["gqa"], shapes / "images", tmp_path / "gqa", progress=False, answer_fn=fn)
    assert seen and all(p == f"{t}\n{SHORT_ANSWER_PROMPT}" for t, p in seen.values())
    seen.clear()
    evaluate(None, "mme", f["mme"], shapes / "images", tmp_path / "mme", progress=False, answer_fn=fn)
    # LLaVA-1.5's llava_mme.jsonl (its convert_answer_to_mme.py undoes exactly this; lmms-eval's mme task too)
    assert seen and all(t.endswith(" Please answer yes or no.") and
                        p == t.removesuffix(" Please answer yes or no.") + f"\n{SHORT_ANSWER_PROMPT}"
                        for t, p in seen.values())


def test_resume_after_a_crash_answers_only_the_rest(shapes, tmp_path):
    f = _files(shapes)
    out = tmp_path / "pope"
    calls = []

    def crash_after_two_batches(qs, ps):
        calls.append(len(calls))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ["yes"] * len(qs)

    with pytest.raises(KeyboardInterrupt):
        evaluate(None, "pope", f["pope"], shapes / "images", out, batch_size=4, progress=False,
                 answer_fn=crash_after_two_batches)
    lines = (out / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 8  # two finished batches were kept
    with (out / "answers.jsonl").open("a") as g:
        g.write('{"question_id": 99, "te')  # a line torn by the crash
    asked = []

    def fn(qs, ps):
        asked.extend(q.qid for q in qs)
        return ["yes"] * len(qs)

    rep = evaluate(None, "pope", f["pope"], shapes / "images", out, batch_size=4, progress=False, answer_fn=fn)
    all_ids = [json.loads(x)["question_id"] for x in f["pope"].read_text().splitlines()]
    assert asked == all_ids[8:]
    assert rep["metrics"]["n"] == len(all_ids) and rep["metrics"]["n_missing"] == 0


def test_limit_scores_the_answered_subset(shapes, tmp_path):
    f = _files(shapes)
    rep = evaluate(None, "pope", f["pope"], shapes / "images", tmp_path / "p", limit=5, progress=False,
                   answer_fn=lambda qs, ps: ["no"] * len(qs))
    labels = [json.loads(x)["label"] for x in f["pope"].read_text().splitlines()][:5]
    assert rep["metrics"]["n"] == 5
    assert rep["metrics"]["accuracy"] == pytest.approx(labels.count("no") / 5)


def test_mme_limit_cutting_categories_gives_no_totals(shapes, checkpoint, tmp_path, capsys):
    """`eval --task mme --limit N` scores the categories as answered, but when N cuts a category short or leaves
    some out there are no perception / cognition / total (the scorer refuses those answers against the templates:
    the sums are not MME's totals), and the printed table says so; a limit that cuts nothing keeps them."""
    from emma_mamba.cli import main
    from emma_mamba.eval.scorers import summary

    q = _files(shapes)["mme"]
    qs = read_questions("mme", q, shapes / "images")
    per_cat = {c: sum(x.category == c for x in qs) for c in dict.fromkeys(x.category for x in qs)}
    first, *rest = per_cat  # questions in file order: the first category's come first
    assert per_cat[first] > 2 and rest  # a limit of 2 cuts the first category and leaves the rest out
    rep = evaluate(None, "mme", q, shapes / "images", tmp_path / "m2", limit=2, progress=False,
                   answer_fn=lambda qs, ps: ["Yes"] * len(qs))
    m = rep["metrics"]
    assert m["perception"] is None and m["cognition"] is None and m["total"] is None
    assert m["partial"] == {"n_answered": 2, "n_questions": len(qs), "categories_cut": {first: [2, per_cat[first]]},
                            "categories_not_answered": rest}
    assert list(m["categories"]) == [first] and m["categories"][first]["n_questions"] == 2
    assert json.loads((tmp_path / "m2" / "metrics.json").read_text())["metrics"] == m
    with pytest.raises(ScoreInputError):  # what `emma-mamba score --task mme` says of the same answers
        score("mme", tmp_path / "m2" / "mme", q)
    text = summary("mme", m)
    assert f"(partial: 2 of {per_cat[first]} questions)" in text
    assert f"perception, cognition, total: none (partial: 2 of {len(qs)} questions answered (--limit)" in text
    assert "perception 0" not in text and "total 0" not in text
    # a limit past the end cuts nothing: the totals, as without --limit
    kw = dict(progress=False, answer_fn=lambda qs, ps: ["Yes"] * len(qs))
    full = evaluate(None, "mme", q, shapes / "images", tmp_path / "all", limit=len(qs) + 10, **kw)["metrics"]
    assert "partial" not in full and full["perception"] is not None
    assert full == evaluate(None, "mme", q, shapes / "images", tmp_path / "nolimit", **kw)["metrics"]
    # the command prints the partial table
    assert main(["eval", "--task", "mme", "--questions", str(q), "--images", str(shapes / "images"), "--checkpoint",
                 str(checkpoint), "--out", str(tmp_path / "cli"), "--limit", "2", "--max-new-tokens", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "perception, cognition, total: none (partial: 2 of" in out and "perception 0" not in out


def test_bad_inputs_name_the_problem(shapes, tmp_path):
    f = _files(shapes)
    with pytest.raises(ScoreInputError, match="not a directory"):
        read_questions("pope", f["pope"], tmp_path / "nope")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "image": "missing.png", "text": "Is there a cat?", "label": "no"}\n')
    with pytest.raises(ScoreInputError, match="missing.png"):
        read_questions("pope", bad, shapes / "images")
    with pytest.raises(ScoreInputError, match="'questions' list"):
        read_questions("vqav2", f["gqa"], shapes / "images")
    with pytest.raises(ScoreInputError, match="unknown task"):
        read_questions("okvqa", f["pope"], shapes / "images")
    # an --out that is (or lies under) a file: named as --out, not a FileExistsError traceback
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ScoreInputError, match=rf"--out {out}: {tmp_path / 'afile'} is a file, not a folder"):
            evaluate(None, "pope", f["pope"], shapes / "images", out, progress=False,
                     answer_fn=lambda b, p: ["Yes."] * len(b))


def _heldout_images(shapes: Path, n: int) -> list[str]:
    return sorted(p.name for p in (shapes / "images" / "heldout").glob("*.png"))[:n]


def test_textvqa_and_vizwiz_official_files_end_to_end(shapes, tmp_path):
    """Official TextVQA/VizWiz files in, answers + official results + metrics out (hand-computed)."""
    imgs = _heldout_images(shapes, 3)
    tv = tmp_path / "TextVQA_0.5.1_val.json"
    tv.write_text(json.dumps({"data": [
        {"question_id": 10 + i, "image_id": f"heldout/{name[:-4]}", "question": f"what is written {i}?",
         "answers": ["stop"] * 4 + ["go"] * 6} for i, name in enumerate(imgs)]}))
    # image_id -> <image_id>.jpg by default; ShapesWorld's are .png, so give the LLaVA-style 'image' field instead
    recs = json.loads(tv.read_text())
    for r in recs["data"]:
        r["image"] = r["image_id"] + ".png"
    tv.write_text(json.dumps(recs))
    seen = {}

    def fn(qs, ps):
        for q, p in zip(qs, ps):
            seen[q.qid] = p
        return ["Stop." if q.qid == 10 else "go" for q in qs]

    rep = evaluate(None, "textvqa", tv, shapes / "images", tmp_path / "tv", progress=False, answer_fn=fn)
    # "stop": 4 of 10 humans -> 1.0; "go": 6 -> 1.0 as well; so every answer scores 1
    assert rep["metrics"]["n"] == 3 and rep["metrics"]["accuracy"] == pytest.approx(1.0)
    assert seen[11] == f"what is written 1?\n{SHORT_ANSWER_PROMPT}"
    res = json.loads((tmp_path / "tv" / "results.json").read_text())
    assert sorted(r["question_id"] for r in res) == [10, 11, 12] and all(set(r) == {"question_id", "answer"}
                                                                      for r in res)

    vz = tmp_path / "val.json"
    ans = lambda text, n: [{"answer": text, "answer_confidence": "yes"}] * n  # noqa: E731
    vz.write_text(json.dumps([
        {"image": f"heldout/{imgs[0]}", "question": "What is this?", "answers": ans("circle", 2) + ans("ball", 8),
         "answer_type": "other", "answerable": 1},
        {"image": f"heldout/{imgs[1]}", "question": "What does the label say?", "answers": ans("unanswerable", 10),
         "answer_type": "unanswerable", "answerable": 0}]))
    seen.clear()
    rep = evaluate(None, "vizwiz", vz, shapes / "images", tmp_path / "vz", progress=False,
                   answer_fn=lambda qs, ps: [seen.setdefault(q.qid, p) and ("circle" if q.text.startswith("What is")
                                                                            else "Unanswerable") for q, p in zip(qs, ps)])
    # "circle": 2 of 10 -> 0.6; "Unanswerable" -> 1.0
    assert rep["metrics"]["accuracy"] == pytest.approx((0.6 + 1.0) / 2)
    assert rep["metrics"]["per_answerability"] == pytest.approx({"answerable": 0.6, "unanswerable": 1.0})
    assert seen[f"heldout/{imgs[1]}"] == ("What does the label say?\nWhen the provided information is insufficient, "
                                         f"respond with 'Unanswerable'.\n{SHORT_ANSWER_PROMPT}")
    res = json.loads((tmp_path / "vz" / "results.json").read_text())
    assert {r["image"] for r in res} == {f"heldout/{imgs[0]}", f"heldout/{imgs[1]}"}  # the submission format
    assert sorted(r["answer"] for r in res) == ["circle", "unanswerable"]  # as LLaVA-1.5 uploads them
    # the test split has no answers: answers are written, nothing is scored
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"image": f"heldout/{imgs[2]}", "question": "What colour?"}]))
    rep = evaluate(None, "vizwiz", test, shapes / "images", tmp_path / "vzt", progress=False,
                   answer_fn=lambda qs, ps: ["red"] * len(qs))
    assert rep["metrics"] is None and rep["annotations"] is None
    assert json.loads((tmp_path / "vzt" / "results.json").read_text()) == [
        {"image": f"heldout/{imgs[2]}", "answer": "red"}]


def _textvqa_with_ocr_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The official layout: TextVQA_0.5.1_val.json (no OCR, images <image_id>.jpg under train_images/) and the
    Rosetta OCR file TextVQA_Rosetta_OCR_v0.2_val.json ({"data": [{image_id, ocr_tokens, ocr_info}]})."""
    from PIL import Image

    images = tmp_path / "train_images"
    images.mkdir()
    for image_id in ("0054c91397f2fe05", "00685bc495504d61", "006d10667d17b924"):
        Image.new("RGB", (32, 24), "white").save(images / f"{image_id}.jpg")
    questions = tmp_path / "TextVQA_0.5.1_val.json"
    questions.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "0054c91397f2fe05", "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 10},
        {"question_id": 34603, "image_id": "00685bc495504d61", "question": "what is on the sign?",
         "answers": ["stop"] * 10},
        {"question_id": 34604, "image_id": "006d10667d17b924", "question": "what number is this?",
         "answers": ["3"] * 10}]}))
    ocr = tmp_path / "TextVQA_Rosetta_OCR_v0.2_val.json"
    ocr.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"image_id": "0054c91397f2fe05", "ocr_tokens": ["DAKOTA", "DIGITAL", "Single-Use"],
         "ocr_info": [{"word": "DAKOTA", "bounding_box": {}}]},
        {"image_id": "00685bc495504d61", "ocr_tokens": []},
        {"image_id": "006d10667d17b924", "ocr_info": [{"word": "3", "bounding_box": {}},
                                                      {"word": "TIMES", "bounding_box": {}}]}]}))
    return questions, images, ocr


def test_textvqa_official_json_with_the_rosetta_ocr_file(tmp_path):
    """--ocr: each question of the official JSON gets its image's OCR tokens on the next line, as LLaVA-1.5's
    llava_textvqa_val_v051_ocr.jsonl has them ("<question>\\nReference OCR token: a, b\\n<instruction>": the three
    lines LLaVA's eval_textvqa.py splits; no tokens: no line, its two-line case); a record with ocr_info only gives
    its words; the OCR file is in eval_run.json (a continuation without it is refused)."""
    questions, images, ocr = _textvqa_with_ocr_files(tmp_path)
    seen = {}

    def fn(qs, ps):
        seen.update((q.qid, p) for q, p in zip(qs, ps))
        return [{34602: "Dakota", 34603: "stop", 34604: "3"}[q.qid] for q in qs]

    rep = evaluate(None, "textvqa", questions, images, tmp_path / "tv", ocr=ocr, progress=False, answer_fn=fn)
    assert seen == {
        # LLaVA's file upper-cases the first letter ("What is the brand of this camera?\nReference OCR token: DAKOTA,
        # DIGITAL, Single-Use, ...": its line for question 34602)
        34602: "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use\n"
               "Answer the question using a single word or phrase.",
        34603: "What is on the sign?\nAnswer the question using a single word or phrase.",
        34604: "What number is this?\nReference OCR token: 3, TIMES\nAnswer the question using a single word or phrase."}
    assert [len(p.split("\n")) for p in seen.values()] == [3, 2, 3]
    assert rep["metrics"]["accuracy"] == pytest.approx(1.0)  # the answers are scored as without OCR
    assert json.loads((tmp_path / "tv" / "eval_run.json").read_text())["ocr"] == str(ocr.resolve())
    with pytest.raises(ScoreInputError, match=r"ocr = .*TextVQA_Rosetta_OCR_v0.2_val.json\", but this run has "
                                              r"ocr = null"):
        evaluate(None, "textvqa", questions, images, tmp_path / "tv", progress=False, answer_fn=fn)
    # without --ocr: the question alone, as before
    seen.clear()
    evaluate(None, "textvqa", questions, images, tmp_path / "plain", progress=False, answer_fn=fn)
    assert seen[34602] == "what is the brand of this camera?\nAnswer the question using a single word or phrase."


def test_textvqa_ocr_file_errors_name_the_file_and_the_record(tmp_path, capsys):
    from emma_mamba.cli import main

    questions, images, ocr = _textvqa_with_ocr_files(tmp_path)
    good = json.loads(ocr.read_text())

    def bad(doc, match):
        ocr.write_text(json.dumps(doc))
        with pytest.raises(ScoreInputError, match=match):
            read_questions("textvqa", questions, images, ocr=ocr)

    bad([], r"TextVQA_Rosetta_OCR_v0.2_val.json: expected a JSON object with a 'data' list")
    bad({"data": [good["data"][0], {"ocr_tokens": ["a"]}]}, r"_val.json: data\[1\]: TextVQA OCR record has no "
                                                            r"'image_id' field")
    bad({"data": [{"image_id": "0054c91397f2fe05", "ocr_tokens": ["a", 7]}]},
        r"_val.json: data\[0\]: ocr_tokens must be a list of strings")
    bad({"data": [{"image_id": "0054c91397f2fe05"}]}, r"data\[0\]: TextVQA OCR record has no 'ocr_tokens' or "
                                                      r"'ocr_info' field")
    bad({"data": [{"image_id": "0054c91397f2fe05", "ocr_info": [{"text": "a"}]}]},
        r"data\[0\]: ocr_info must be a list of objects with a 'word'")
    bad({"data": [good["data"][0], {"image_id": "0054c91397f2fe05", "ocr_tokens": ["other"]}]},
        r"data\[1\]: image_id '0054c91397f2fe05' is given again with other tokens \(first in data\[0\]\)")
    bad({"data": good["data"][:2]}, r"TextVQA_0.5.1_val.json: data\[2\]: image_id '006d10667d17b924' is not in the "
                                    r"OCR file .*TextVQA_Rosetta_OCR_v0.2_val.json")
    ocr.write_text(json.dumps(good))
    # LLaVA's JSONL already holds the tokens: --ocr would add them twice
    llava = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    llava.write_text(json.dumps({"question_id": 34602, "image": "0054c91397f2fe05.jpg", "text":
                                 "What is the brand of this camera?\nReference OCR token: DAKOTA\nAnswer the question "
                                 "using a single word or phrase."}) + "\n")
    with pytest.raises(ScoreInputError, match=r"llava_textvqa_val_v051_ocr.jsonl: line 1: the question already holds "
                                              r"its OCR tokens .* drop --ocr"):
        read_questions("textvqa", llava, images, ocr=ocr)
    # the option: textvqa's only
    rc = main(["eval", "--task", "vqav2", "--questions", str(questions), "--images", str(images), "--ocr", str(ocr),
               "--api", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--ocr applies to textvqa only, not --task vqav2" in capsys.readouterr().err
    rc = main(["eval", "--task", "textvqa", "--questions", str(questions), "--images", str(images), "--ocr",
               str(tmp_path / "missing.json"), "--api", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "x")])
    assert rc == 2 and "TextVQA OCR file" in capsys.readouterr().err


def test_llava_question_files_are_read_and_asked_verbatim(shapes, tmp_path):
    """LLaVA-1.5's question JSONLs (playground/data/eval: llava_vqav2_mscoco_test-dev2015.jsonl,
    llava_gqa_testdev_balanced.jsonl, vizwiz/llava_test.jsonl, pope/llava_pope_test.jsonl): ``{question_id, image,
    text, category}`` with the instruction already in ``text``; asked verbatim; POPE's has no labels and GQA's no
    answers, so they are answered, not scored (LLaVA scores them with eval_pope.py / the GQA questions JSON)."""
    imgs = [f"heldout/{n}" for n in _heldout_images(shapes, 2)]
    short = f"\n{SHORT_ANSWER_PROMPT}"
    unans = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    files = {
        "vqav2": [{"question_id": 262144000 + i, "image": im, "text": f"Is the ball flying {i}?{short}",
                   "category": "default"} for i, im in enumerate(imgs)],
        "gqa": [{"question_id": str(201307251 + i), "image": im, "text": f"Is it overcast {i}?{short}",
                 "category": "default"} for i, im in enumerate(imgs)],
        "vizwiz": [{"question_id": i, "image": im, "text": f"What is this {i}?{unans}{short}",
                    "category": "default"} for i, im in enumerate(imgs)],
        "pope": [{"question_id": 1 + i, "image": im, "text": f"Is there a star in the image {i}?{short}",
                  "category": "adversarial"} for i, im in enumerate(imgs)],
    }
    for task, recs in files.items():
        q = tmp_path / f"llava_{task}.{'JSONL' if task == 'gqa' else 'jsonl'}"  # the suffix in any case
        q.write_text("".join(json.dumps(r) + "\n" for r in recs))
        seen = {}

        def fn(qs, ps):
            seen.update({q.qid: p for q, p in zip(qs, ps)})
            return ["no"] * len(qs)

        rep = evaluate(None, task, q, shapes / "images", tmp_path / task, progress=False, answer_fn=fn)
        want_ids = {"vqav2": [262144000, 262144001], "gqa": ["201307251", "201307252"], "vizwiz": imgs,
                    "pope": [1, 2]}[task]
        assert list(seen) == want_ids, task
        assert list(seen.values()) == [r["text"] for r in recs], task  # no second instruction
        assert rep["metrics"] is None and rep["annotations"] is None, task


def test_textvqa_from_llavas_question_file_is_scored_against_the_official_one(tmp_path):
    """LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl keys a question by its image's id, so an image's two questions
    share it: one answer replaced the other (on resume, and under torchrun's merge), and the shipped suite's
    scoring against TextVQA_0.5.1_val.json failed on every id. Repeats are "<id>#k" now, and the scorer matches
    LLaVA's answers as its eval_textvqa.py does, by the image and the question read off the prompt. Oracle: each
    question answered with its own human answer scores 1."""
    from PIL import Image

    images = tmp_path / "train_images"
    images.mkdir()
    for name in ("831bcec304a17054", "94ad4aad01e27a32"):
        Image.new("RGB", (8, 8)).save(images / f"{name}.jpg")
    s = "\nAnswer the question using a single word or phrase."
    asked = [("831bcec304a17054", "What brand liquor is on the right?", "MORANGIE", "glenmorangie", 34602),
             ("831bcec304a17054", "How long has the drink on the right been aged?", "MORANGIE", "10 years", 34603),
             ("94ad4aad01e27a32", "What number is on the player's jersey?", "22", "22", 34604)]
    q = tmp_path / "llava_textvqa_val_v051_ocr.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "text": f"{t}\nReference OCR token: {o}{s}",
                                     "category": "default"}) + "\n" for i, t, o, _, _ in asked))
    ann = tmp_path / "TextVQA_0.5.1_val.json"  # the official file: questions lower-cased, their own ids
    ann.write_text(json.dumps({"data": [{"question_id": n, "image_id": i, "question": t.lower(), "answers": [a] * 10}
                                        for i, t, _, a, n in asked]}))
    truth = {t: a for _, t, _, a, _ in asked}
    rep = evaluate(None, "textvqa", q, images, tmp_path / "out", annotations=ann, progress=False,
                   answer_fn=lambda qs, ps: [truth[p.split("\n")[0]] for p in ps])
    assert rep["metrics"]["n"] == 3 and rep["metrics"]["accuracy"] == pytest.approx(1.0)
    ids = [json.loads(x)["question_id"] for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert ids == ["831bcec304a17054", "831bcec304a17054#2", "94ad4aad01e27a32"]


@pytest.mark.parametrize("task, name, content, says", [
    ("pope", "q.jsonl", [{"question_id": i, "image": "a.png", "text": None if i == 3 else "Is there a cat?",
                          "label": "yes"} for i in range(1, 6)], "question 3: the question must be non-empty text"),
    ("pope", "q.jsonl", [{"question_id": 1, "image": 5, "text": "Is there a cat?", "label": "yes"}],
     "line 1: the image must be a file name, got 5"),
    ("seed", "SEED-Bench.json", {"questions": [{"question_id": "1", "question": None, "choice_a": "a", "choice_b": "b",
                                                "choice_c": "c", "choice_d": "d", "data_id": "a.png",
                                                "data_type": "image"}]},
     "questions[0]: 'question' must be text, got None"),
    ("scienceqa", "problems.json", {"p1": {"question": "q", "choices": ["a", "b"], "answer": 0, "image": 7,
                                           "split": "test"}}, "problem 'p1': 'image' must be a file name, got 7"),
])
def test_malformed_question_records_are_named_before_any_answer(tmp_path, task, name, content, says):
    """A question record with a null or numeric text or image failed with a Python traceback naming neither file
    nor record (a null POPE text only when its batch came up, mid-run)."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    q = tmp_path / name
    q.write_text("".join(json.dumps(r) + "\n" for r in content) if name.endswith(".jsonl") else json.dumps(content))
    asked = []
    with pytest.raises(ScoreInputError, match=re.escape(says)):
        evaluate(None, task, q, tmp_path, tmp_path / "out", progress=False,
                 answer_fn=lambda qs, ps: asked.extend(ps) or ["yes"] * len(qs))
    assert asked == []


def test_questions_with_words_a_word_level_tokenizer_lacks_are_warned_about(tmp_path, caplog):
    """The quickstart's word-level tokenizer knows only its training text's words: MME's count and arithmetic
    questions ("Is the number of circles plus ...") reached the model as [UNK]s and were scored without a word
    said. The words are found by the tokenizer itself (its [UNK] id) and named; a byte-level BPE (GPT-NeoX) has no
    unknown word, so nothing is said."""
    from types import SimpleNamespace

    from emma_mamba.config import get_preset
    from emma_mamba.data.shapes import ShapesConfig, generate
    from emma_mamba.eval.runner import prepare_run
    from emma_mamba.models.tokenizer import load_tokenizer
    from emma_mamba.quickstart import build_word_tokenizer

    generate(ShapesConfig(seed=0, n_train=30, n_heldout=12, image_size=96), tmp_path / "sw")
    words = load_tokenizer(build_word_tokenizer(tmp_path / "sw", tmp_path / "tok"))
    mme = tmp_path / "sw" / "heldout" / "mme"
    for tok, said in ((words, True), (load_tokenizer(), False)):
        caplog.clear()
        model = SimpleNamespace(tokenizer=tok, config=get_preset("tiny"))
        with caplog.at_level("WARNING", logger="emma_mamba.eval.runner"):
            prep = prepare_run(model, "mme", mme, tmp_path / "sw" / "images")
        by_hand = [q for q in prep.questions if any(w not in tok.backend.get_vocab() for w in
                                                     re.findall(r"\w+|[^\w\s]+", q.text))]
        if said:
            assert by_hand and f"{len(by_hand)} of {len(prep.questions)} questions hold words this model's " \
                "tokenizer does not know (they reach the model as [UNK])" in caplog.text
            assert "'number'" in caplog.text
        else:
            assert "does not know" not in caplog.text
