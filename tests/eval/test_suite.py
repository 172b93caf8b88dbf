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
    summary = run_suite(None, entries, out, progress=False, answer_fn=always_yes)
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
    assert "| pope_adv | pope | 2 |" in out and "| vqav2 | vqav2 | 2 |" in out
    assert (ckpt / "eval_suite" / "summary.json").is_file()
    assert main(["eval", "--suite", "x.yaml", "--checkpoint", str(ckpt), "--questions", "q"]) == 2
    assert "--questions goes with --task" in capsys.readouterr().err
