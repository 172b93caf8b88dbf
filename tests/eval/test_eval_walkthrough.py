"""`emma-mamba eval` fixes from a user walkthrough: the command line wins over a suite file, --allow-missing,
no empty output folder after a failed run, JSON error positions, --ocr with LLaVA's JSONL, UTF-8 metrics.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from emma_mamba.data.shapes import ShapesConfig, generate
from emma_mamba.eval._io import ScoreInputError, load_json, load_records
from emma_mamba.eval.cli_eval import add_arguments
from emma_mamba.eval.runner import evaluate
from emma_mamba.eval.suite import format_summary, read_suite, run_suite


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    generate(ShapesConfig(seed=5, n_train=4, n_heldout=3, image_size=96), d)
    return d


def always_yes(qs, ps):
    return ["Yes"] * len(qs)


def _n_pope(shapes) -> int:
    return len((shapes / "heldout" / "pope_random.jsonl").read_text().splitlines())


# 1. the command line wins over the suite file; a limited run says "N of M"

def test_cli_defaults_are_none_and_help_says_the_command_line_wins():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--task", "pope", "--checkpoint", "x"])
    assert (args.batch_size, args.max_new_tokens, args.limit) == (None, None, None)
    assert "win over the suite file" in " ".join(p.format_help().split())


def test_command_line_values_win_over_the_suite_file(tmp_path, shapes):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""root: {shapes}
batch_size: 2
limit: 3
benchmarks:
  pope: {{questions: heldout/pope_random.jsonl, images: images, limit: 4, batch_size: 3}}
  vqav2: {{questions: heldout/vqav2_questions.json, images: images}}
""")
    entries = read_suite(suite)
    out = tmp_path / "out"
    summary = run_suite(None, entries, out, progress=False, answer_fn=always_yes, limit=1, batch_size=5)
    for name in ("pope", "vqav2"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert (m["n_questions"], m["limit"], m["batch_size"]) == (1, 1, 5), name
    rows = {r["benchmark"]: r for r in summary["benchmarks"]}
    assert rows["pope"]["n"] == 1 and rows["pope"]["of"] == _n_pope(shapes)
    assert f"| pope | pope | 1 of {_n_pope(shapes)} |" in (out / "summary.md").read_text()
    # no command-line value: the entry's over the suite-wide one, over the built-in default
    out2 = tmp_path / "out2"
    run_suite(None, entries, out2, progress=False, answer_fn=always_yes)
    m = json.loads((out2 / "pope" / "metrics.json").read_text())
    assert (m["n_questions"], m["batch_size"]) == (4, 3)
    m = json.loads((out2 / "vqav2" / "metrics.json").read_text())
    assert (m["n_questions"], m["batch_size"]) == (3, 2)


def test_format_summary_marks_a_limited_row():
    rows = [{"benchmark": "pope", "task": "pope", "n": 4, "of": 842, "accuracy": 50.0, "f1": 40.0},
            {"benchmark": "gqa", "task": "gqa", "n": 12, "accuracy": 10.0}]
    md = format_summary(rows)
    assert "| pope | pope | 4 of 842 | accuracy 50.00, f1 40.00 |" in md and "| gqa | gqa | 12 |" in md


# 2. --allow-missing: a question subset scored against the full annotations

def _vqav2_subset(tmp_path, shapes) -> Path:
    doc = json.loads((shapes / "heldout" / "vqav2_questions.json").read_text())
    doc["questions"] = doc["questions"][:2]
    p = tmp_path / "subset_questions.json"
    p.write_text(json.dumps(doc))
    return p


def test_allow_missing_scores_a_subset_against_full_annotations(tmp_path, shapes):
    q, ann = _vqav2_subset(tmp_path, shapes), shapes / "heldout" / "vqav2_annotations.json"
    with pytest.raises(ScoreInputError) as e:
        evaluate(None, "vqav2", q, shapes / "images", tmp_path / "a", annotations=ann, progress=False,
                 answer_fn=always_yes)
    msg = str(e.value)
    assert "--allow-missing" in msg and "emma-mamba score" in msg and "allow_missing=True (--allow-missing)" not in msg
    # the rerun with the same folder scores the answers already written
    rep = evaluate(None, "vqav2", q, shapes / "images", tmp_path / "a", annotations=ann, progress=False,
                   answer_fn=always_yes, allow_missing=True)
    assert rep["n_answered_this_run"] == 0 and rep["metrics"] is not None


def test_cli_eval_has_allow_missing_and_suite_entries_take_it(tmp_path, shapes):
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--task", "vqav2", "--checkpoint", "x", "--allow-missing"]).allow_missing
    q, ann = _vqav2_subset(tmp_path, shapes), shapes / "heldout" / "vqav2_annotations.json"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"benchmarks:\n  v: {{task: vqav2, questions: {q}, images: {shapes / 'images'}, "
                     f"annotations: {ann}, allow_missing: true}}\n")
    summary = run_suite(None, read_suite(suite), tmp_path / "out", progress=False, answer_fn=always_yes)
    assert summary["benchmarks"][0]["n"] == 2 and "accuracy" in summary["benchmarks"][0]
    suite.write_text(f"benchmarks:\n  v: {{task: vqav2, questions: {q}, images: {shapes / 'images'}, "
                     f"annotations: {ann}}}\n")
    summary = run_suite(None, read_suite(suite), tmp_path / "out2", progress=False, answer_fn=always_yes,
                        allow_missing=True)
    assert "accuracy" in summary["benchmarks"][0]
    suite.write_text("benchmarks:\n  v: {task: vqav2, questions: q, allow_missing: 1}\n")
    with pytest.raises(ScoreInputError, match="benchmarks.v: allow_missing must be true or false"):
        read_suite(suite)


# 3. a failed eval leaves no empty output folder

def test_failed_eval_leaves_no_output_folder(tmp_path, shapes):
    out = tmp_path / "ckpt" / "eval_pope"
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ScoreInputError, match="does not exist"):
        evaluate(None, "pope", tmp_path / "missing.jsonl", shapes / "images", out, progress=False,
                 answer_fn=always_yes)
    assert not out.exists()
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("index\tquestion\n0\n")
    with pytest.raises(ScoreInputError):
        evaluate(None, "mmbench", tsv, None, out, progress=False, answer_fn=always_yes)
    assert not out.exists()
    # failed after creating it (an unreadable image), before any answer: removed, with the parents it made
    bad = tmp_path / "imgs"
    (bad / "heldout").mkdir(parents=True)
    (bad / "heldout" / "000000.png").write_bytes(b"not a png")
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "image": "heldout/000000.png", "text": "Is it?", "label": "yes"}\n')
    deep = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(ScoreInputError):
        evaluate(None, "pope", q, bad, deep, progress=False, answer_fn=always_yes)
    assert not (tmp_path / "new").exists()
    # a folder that existed before the run is left as it was
    (tmp_path / "mine").mkdir()
    with pytest.raises(ScoreInputError):
        evaluate(None, "pope", q, bad, tmp_path / "mine", progress=False, answer_fn=always_yes)
    assert (tmp_path / "mine").is_dir()


def test_the_cleanup_of_a_failed_eval_keeps_what_others_wrote(tmp_path, shapes, monkeypatch):
    """The folders a failed run made are removed only while empty: a file another process wrote meanwhile beside
    the run's folder (in a parent the run created) stays, with its folder."""
    from emma_mamba.eval import runner

    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "image": "heldout/000000.png", "text": "Is it?", "label": "yes"}\n')
    out = tmp_path / "new" / "eval" / "pope"

    def fails_after_a_neighbour_wrote(*a, **k):
        (tmp_path / "new" / "eval" / "gqa").mkdir()
        (tmp_path / "new" / "eval" / "gqa" / "answers.jsonl").write_text("{}\n")
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "_evaluate", fails_after_a_neighbour_wrote)
    with pytest.raises(RuntimeError, match="boom"):
        runner.evaluate(None, "pope", q, shapes / "images", out, progress=False, answer_fn=always_yes)
    assert not out.exists() and (tmp_path / "new" / "eval" / "gqa" / "answers.jsonl").is_file()


# 4. JSON errors give line, column and character offset

def test_json_errors_give_the_position(tmp_path):
    p = tmp_path / "big.json"
    p.write_text('{"a": [' + "1, " * 1000 + '"unterminated]}')
    with pytest.raises(ScoreInputError) as e:
        load_json(p, "VQAv2 annotations")
    msg = str(e.value)
    assert f"{p}: line 1, column 3008 (character 3007): not valid JSON (Unterminated string" in msg
    j = tmp_path / "a.jsonl"
    j.write_text('{"question_id": 1}\n{"question_id": 2, "text": oops}\n')
    with pytest.raises(ScoreInputError, match=r"a.jsonl: line 2, column 28 \(character 27 of the line\): not valid"):
        load_records(j, "answers")


# 5. --ocr with LLaVA's JSONL

def test_ocr_with_llava_jsonl_names_the_official_file(tmp_path, shapes):
    q = tmp_path / "llava_textvqa.jsonl"
    q.write_text('{"question_id": 1, "image": "heldout/000000.png", "text": "What does it say?"}\n')
    ocr = tmp_path / "ocr.json"
    ocr.write_text('{"data": [{"image_id": "a", "ocr_tokens": ["x"]}]}')
    with pytest.raises(ScoreInputError) as e:
        evaluate(None, "textvqa", q, shapes / "images", tmp_path / "out", ocr=ocr, progress=False,
                 answer_fn=always_yes)
    msg = str(e.value)
    assert "TextVQA_0.5.1_val.json" in msg and "line 1" in msg and "--ocr" in msg and "drop --ocr" in msg


# 6. metrics.json in UTF-8, not \u escapes

def test_metrics_json_keeps_non_ascii(tmp_path, shapes):
    out = tmp_path / "out"
    evaluate(None, "pope", shapes / "heldout" / "pope_random.jsonl", shapes / "images", out, progress=False,
             answer_fn=always_yes, checkpoint="模型/存在", limit=2)
    text = (out / "metrics.json").read_text(encoding="utf-8")
    assert '"模型/存在"' in text and "\\u" not in text
