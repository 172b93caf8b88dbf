"""Evaluation suites (emma_mamba.eval.suite, `emma-mamba eval --suite`): files checked before any answering,
per-benchmark outputs identical to single runs, one summary of the headline numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emma_mamba.data.shapes import ShapesConfig, generate
from emma_mamba.eval.runner import evaluate
from emma_mamba.eval.suite import read_suite, run_suite
from emma_mamba.eval.scorers import ScoreInputError


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    generate(ShapesConfig(seed=5, n_train=4, n_heldout=3, image_size=96), d)
    return d


def _suite(tmp_path, shapes, extra="") -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(f"""root: {shapes}
batch_size: 2
benchmarks:
  pope_adv: {{task: pope, questions: heldout/pope_adversarial.jsonl, images: images}}
  vqav2: {{questions: heldout/vqav2_questions.json, images: images, max_new_tokens: 4}}
  mme: {{task: mme, questions: heldout/mme, images: images}}
{extra}""")
    return p


def always_yes(qs, ps):
    return ["Yes"] * len(qs)


def test_suite_equals_single_runs_and_summarises(tmp_path, shapes):
    entries = read_suite(_suite(tmp_path, shapes))
    assert [(e.name, e.task, e.options) for e in entries] == [
        ("pope_adv", "pope", {"batch_size": 2}), ("vqav2", "vqav2", {"batch_size": 2, "max_new_tokens": 4}),
        ("mme", "mme", {"batch_size": 2})]
    out = tmp_path / "suite_out"
    summary = summary_all = run_suite(None, entries, out, progress=False, answer_fn=always_yes)
    single = {e.name: evaluate(None, e.task, e.questions, e.images, tmp_path / "single" / e.name,
                               progress=False, answer_fn=always_yes)["metrics"] for e in entries}
    rows = {r["benchmark"]: r for r in summary["benchmarks"]}
    assert rows["pope_adv"]["accuracy"] == pytest.approx(100 * single["pope_adv"]["accuracy"])
    assert rows["pope_adv"]["f1"] == pytest.approx(100 * single["pope_adv"]["f1"])
    assert rows["vqav2"]["accuracy"] == pytest.approx(100 * single["vqav2"]["accuracy"])
    assert rows["mme"]["perception"] == pytest.approx(single["mme"]["perception"])
    for name in rows:
        assert json.loads((out / name / "metrics.json").read_text())["metrics"] == single[name]
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "summary.md").read_text()
    assert md.startswith("| benchmark | task | questions | result |") and "| pope_adv | pope |" in md
    # --only
    summary = run_suite(None, entries, tmp_path / "only", progress=False, answer_fn=always_yes, only=["vqav2"])
    assert [r["benchmark"] for r in summary["benchmarks"]] == ["vqav2"]
    # --only into a folder with the whole suite's summary: that one benchmark rerun, the others' rows kept in order
    (out / "vqav2" / "answers.jsonl").unlink()  # answered again
    again = run_suite(None, entries, out, progress=False, answer_fn=always_yes, only=["vqav2"])
    assert again["benchmarks"] == summary_all["benchmarks"] and set(again["metrics_files"]) == set(rows)
    assert (out / "summary.md").read_text() == md
    # another checkpoint's summary is not mixed in
    (out / "summary.json").write_text(json.dumps({**summary_all, "checkpoint": "elsewhere"}))
    assert [r["benchmark"] for r in run_suite(None, entries, out, progress=False, answer_fn=always_yes,
                                              only=["vqav2"])["benchmarks"]] == ["vqav2"]
    with pytest.raises(ScoreInputError, match=r"--only \['gqa'\]: not in the suite"):
        run_suite(None, entries, tmp_path / "x", progress=False, answer_fn=always_yes, only=["gqa"])


def test_a_bad_last_entry_fails_before_any_answering(tmp_path, shapes):
    p = _suite(tmp_path, shapes, "  gqa: {task: gqa, questions: heldout/gqa_questions.json, images: nowhere}\n")
    asked = []

    def fn(qs, ps):
        asked.extend(qs)
        return ["yes"] * len(qs)

    with pytest.raises(ScoreInputError, match=r"benchmark 'gqa': --images .*nowhere is not a directory"):
        run_suite(None, read_suite(p), tmp_path / "out", progress=False, answer_fn=fn)
    assert asked == []
    # two bad entries: both named in one error (a user fixes every path in one go)
    p = _suite(tmp_path, shapes, "  gqa: {task: gqa, questions: heldout/gqa_questions.json, images: nowhere}\n"
                                 "  gqa2: {task: gqa, questions: heldout/missing.json, images: images}\n")
    with pytest.raises(ScoreInputError, match=r"2 of the \d+ benchmarks cannot run:\n  benchmark 'gqa': .*nowhere"
                                              r"[\s\S]*\n  benchmark 'gqa2': .*missing\.json"):
        run_suite(None, read_suite(p), tmp_path / "out", progress=False, answer_fn=fn)
    assert asked == []


@pytest.mark.parametrize("text, match", [
    ("benchmarks: {}\n", "non-empty 'benchmarks' mapping"),
    ("roots: x\nbenchmarks: {a: {task: pope, questions: q}}\n", r"unknown key\(s\) \['roots'\]"),
    ("benchmarks: {a: {task: pope, questions: q, image: x}}\n", r"benchmarks.a: unknown key\(s\) \['image'\]"),
    ("benchmarks: {okvqa: {questions: q}}\n", "task 'okvqa' is not one of"),
    ("benchmarks: {pope: {images: x}}\n", "benchmarks.pope: no 'questions'"),
    ("benchmarks: {pope: {questions: q, batch_size: 0}}\n", "batch_size must be an integer >= 1"),
    ("benchmarks: {pope: {questions: q, likelihood: 1}}\n", "benchmarks.pope: likelihood must be true or false"),
    ("benchmarks: {gqa: {questions: q, likelihood: true}}\n", "likelihood applies to the closed-set tasks"),
    # a benchmark given twice: plain YAML would keep the second silently and never run the first
    ("benchmarks:\n  pope: {questions: a.jsonl}\n  pope: {questions: b.jsonl}\n", "the key 'pope' is given twice"),
    ("benchmarks: {pope: {questions: q, questions: r}}\n", "the key 'questions' is given twice"),
    # wrong types: named, not an AttributeError deep in the reader (or a folder named "None")
    ("benchmarks: {vqav2: {questions: q, image_template: 5}}\n", "benchmarks.vqav2: image_template must be a string"),
    ("benchmarks: {scienceqa: {questions: q, split: [test]}}\n", "benchmarks.scienceqa: split must be a string"),
    ("benchmarks: {pope: {questions: [a, b]}}\n", "benchmarks.pope: questions must be a string"),
    ("root:\nbenchmarks: {pope: {questions: q}}\n", "root must be a path"),
    # a task's own settings on another task (which would ignore them): named with the file, the entry and the key
    ("benchmarks: {pope: {questions: q, split: test}}\n",
     r"s\.yaml: benchmarks\.pope: split applies to scienceqa, ai2d, refcoco only, not pope"),
    ("benchmarks: {gqa: {questions: q, image_template: 'x{image_id}.jpg'}}\n",
     r"s\.yaml: benchmarks\.gqa: image_template applies to vqav2 only, not gqa"),
    ("benchmarks: {pope: {questions: q, box_frame: square}}\n",
     r"s\.yaml: benchmarks\.pope: box_frame applies to refcoco, ocidref only, not pope"),
    ("benchmarks: {refcoco: {questions: q, box_frame: letterbox}}\n",
     r"s\.yaml: benchmarks\.refcoco: box_frame must be one of \['auto', 'image', 'square'\], got 'letterbox'"),
    ("benchmarks: {gqa: {questions: q, lang: cn}}\n", r"s\.yaml: benchmarks\.gqa: lang applies to mmbench only"),
    ("benchmarks: {mmbench: {questions: q, lang: zh}}\n", r"s\.yaml: benchmarks\.mmbench: lang must be one of"),
    ("benchmarks: {vqav2: {questions: q, ocr: o.json}}\n", r"s\.yaml: benchmarks\.vqav2: ocr applies to textvqa only"),
    ("benchmarks: {textvqa: {questions: q, ocr: [a]}}\n", r"s\.yaml: benchmarks\.textvqa: ocr must be a string"),
])
def test_suite_file_errors(tmp_path, text, match):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(ScoreInputError, match=match):
        read_suite(p)


def test_example_suite_parses():
    entries = read_suite(Path(__file__).resolve().parents[2] / "configs" / "eval_suite_example.yaml")
    assert {e.task for e in entries} == {"vqav2", "gqa", "vizwiz", "textvqa", "pope", "mme", "mmbench", "seed",
                                         "scienceqa", "vsr", "tallyqa", "ai2d", "refcoco", "ocidref"}


def test_cli_suite_with_a_random_checkpoint(tmp_path, shapes, capsys):
    import torch

    from emma_mamba.cli import main
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    EmmaMamba(get_preset("tiny"), for_training=False).save(ckpt)
    rc = main(["eval", "--suite", str(_suite(tmp_path, shapes)), "--checkpoint", str(ckpt), "--limit", "2",
               "--max-new-tokens", "2", "--no-progress", "--only", "pope_adv", "vqav2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| pope_adv | pope | 2 of " in out and "| vqav2 | vqav2 | 2 of " in out  # a --limit run: said
    assert (ckpt / "eval_suite" / "summary.json").is_file()
    assert main(["eval", "--suite", "x.yaml", "--checkpoint", str(ckpt), "--questions", "q"]) == 2
    assert "--questions goes with --task" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["configs/eval_suite_example.yaml", "eval_suite_example.yaml", "eval_suite_example"])
def test_a_shipped_suite_by_name_has_its_root_relative_to_configs_here(name, tmp_path, monkeypatch, caplog):
    """Outside the repository `--suite configs/eval_suite_example.yaml` (no such file there) reads the shipped suite
    as `--config` reads a shipped recipe; its root (../playground/eval, relative to the suite file) is taken
    relative to ./configs, the files it would be relative to in a checkout, not to the installed package."""
    import logging

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="emma_mamba.eval.suite"):
        entries = read_suite(name)
    byname = {e.name: e for e in entries}
    root = tmp_path.resolve() / "playground" / "eval"
    assert byname["pope_random"].questions == root / "pope" / "coco_pope_random.json"
    assert byname["gqa"].images == root / "gqa" / "images"
    assert all(str(e.questions).startswith(str(root)) for e in entries)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "shipped suite" in said and str(root) in said
    assert "emma-mamba configs --copy configs eval_suite_example" in said


def test_a_suite_that_is_neither_a_file_nor_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("configs/nope.yaml", "train_tiny_stage1", str(tmp_path / "eval_suite_example.yaml"),
                 "other/eval_suite_example.yaml"):
        with pytest.raises(ScoreInputError, match=r"does not exist \(shipped suites, usable by name: "
                                                  r"eval_suite_example;"):
            read_suite(name)


def test_cli_shipped_suite_outside_the_repository(tmp_path, shapes, monkeypatch, capsys):
    """The README's command run in a folder without configs/: the shipped example suite, its benchmark files under
    ./playground/eval; without them the error says which suite was read and how to copy it to set root:."""
    import torch

    from emma_mamba.cli import main
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    EmmaMamba(get_preset("tiny"), for_training=False).save(ckpt)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["eval", "--suite", "configs/eval_suite_example.yaml", "--checkpoint", str(ckpt), "--limit", "2",
            "--max-new-tokens", "2", "--no-progress", "--only", "pope_random", "--out", "ev"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{work / 'playground' / 'eval' / 'pope'}" in err  # where it looked
    assert "the shipped suite eval_suite_example was read" in err
    assert "`emma-mamba configs --copy configs eval_suite_example`" in err
    pope = work / "playground" / "eval" / "pope"
    pope.mkdir(parents=True)
    (pope / "coco_pope_random.json").write_text((shapes / "heldout" / "pope_random.jsonl").read_text())
    (pope / "val2014").symlink_to(shapes / "images")
    assert main(argv) == 0
    assert "| pope_random | pope | 2 of " in capsys.readouterr().out
    assert (work / "ev" / "pope_random" / "answers.jsonl").is_file()


def test_suite_mme_cut_by_limit_has_no_totals(tmp_path, shapes):
    """A suite's --limit that cuts MME's categories: its row says partial, with no perception / cognition."""
    summary = run_suite(None, read_suite(_suite(tmp_path, shapes)), tmp_path / "out", progress=False, limit=2,
                        answer_fn=always_yes, only=["mme"])
    assert summary["benchmarks"] == [{"benchmark": "mme", "task": "mme", "n": 2, "partial": True, "of": 6}]
    assert "| mme | mme | 2 of 6 | partial answers (--limit): no totals |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("flag, value, key", [
    ("--split", "test", "split"), ("--image-template", "{image_id}.jpg", "image_template"),
    ("--box-frame", "square", "box_frame"), ("--lang", "cn", "lang"), ("--ocr", "ocr.json", "ocr")])
def test_cli_suite_refuses_single_benchmark_settings(tmp_path, shapes, capsys, flag, value, key):
    """--split / --image-template / --box-frame / --lang / --ocr set one benchmark's layout; a suite's benchmarks
    differ, so with --suite they are refused (not silently ignored), pointing to the suite file's per-entry key;
    with --task, on a task that does not read them, refused too."""
    from emma_mamba.cli import main

    suite = _suite(tmp_path, shapes)
    assert main(["eval", "--suite", str(suite), "--checkpoint", str(tmp_path / "no_ckpt"), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} goes with --task, not --suite" in err and str(suite) in err and f"`{key}: ...`" in err
    assert main(["eval", "--task", "gqa", "--questions", str(shapes / "heldout" / "gqa_questions.json"), "--images",
                 str(shapes / "images"), "--checkpoint", str(tmp_path / "no_ckpt"), flag, value]) == 2
    assert f"{flag} applies to " in capsys.readouterr().err


def test_suite_entries_give_their_own_settings(tmp_path):
    """The per-benchmark keys do what the options do for one benchmark: ocr (relative to root) adds the OCR tokens
    to TextVQA's questions, lang asks MMBench-CN in English."""
    from tests.eval.test_multiple_choice import CN_ROWS, write_tsv
    from tests.eval.test_runner import _textvqa_with_ocr_files

    _textvqa_with_ocr_files(tmp_path)
    write_tsv(tmp_path / "MMBench_DEV_CN.tsv", CN_ROWS)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""root: {tmp_path}
benchmarks:
  textvqa: {{questions: TextVQA_0.5.1_val.json, images: train_images, ocr: TextVQA_Rosetta_OCR_v0.2_val.json}}
  mmbench_cn: {{task: mmbench, questions: MMBench_DEV_CN.tsv, lang: en}}
""")
    entries = read_suite(suite)
    assert entries[0].options["ocr"] == tmp_path.resolve() / "TextVQA_Rosetta_OCR_v0.2_val.json"
    assert entries[1].options["lang"] == "en"
    seen = {}

    def fn(qs, ps):
        seen.update((q.qid, p) for q, p in zip(qs, ps))
        return ["A"] * len(qs)

    run_suite(None, entries, tmp_path / "out", progress=False, answer_fn=fn)
    assert seen[34602] == ("What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use\n"
                           "Answer the question using a single word or phrase.")
    assert seen["5/0"].endswith("\nAnswer with the option's letter from the given choices directly.")
