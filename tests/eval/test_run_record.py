"""A resumable eval folder continues only the run that began it (``eval_run.json``): another checkpoint, the same
checkpoint retrained, another endpoint or model name, other questions, images or generation settings are refused
before anything is answered, naming the folder, the field and both values, and the answers there are kept; a folder
of the older format continues with a warning; shards and suites are checked the same way."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from emma_mamba.eval.runner import ScoreInputError, evaluate, merge_shards, model_identity
from tests.eval.test_runner import checkpoint, shapes  # noqa: F401 - fixtures


class _Model:
    """An answerer standing for a model with an identity (as ``--api``'s is): its replies depend on its name, so
    a stale answer is visible in the metrics."""

    def __init__(self, name: str, reply: str = "yes"):
        self.identity = {"api": f"http://{name}/v1", "api_model": name}
        self.reply, self.asked = reply, []

    def __call__(self, qs, ps):
        self.asked.extend(q.qid for q in qs)
        return [self.reply] * len(qs)


def _pope(shapes: Path, which: str = "random") -> Path:
    return shapes / "heldout" / f"pope_{which}.jsonl"


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_cli_another_checkpoint_into_the_same_out_is_refused(shapes, checkpoint, tmp_path, capsys):
    import torch

    from emma_mamba.cli import main
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(1)
    other = tmp_path / "ckpt_b"
    EmmaMamba(get_preset("tiny"), for_training=False).save(other)
    out = tmp_path / "ev"
    args = ["eval", "--task", "pope", "--questions", str(_pope(shapes)), "--images", str(shapes / "images"),
            "--out", str(out), "--limit", "4", "--max-new-tokens", "2", "--no-progress"]
    assert main(args + ["--checkpoint", str(checkpoint)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(args + ["--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "model.checkpoint" in err
    assert str(checkpoint.resolve()) in err and str(other.resolve()) in err
    assert "another --out" in err and f"delete {out}" in err
    assert _snapshot(out) == before  # nothing lost, nothing overwritten
    # the same checkpoint again continues (nothing left to answer)
    assert main(args + ["--checkpoint", str(checkpoint)]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_answered_this_run"] == 0


def test_a_retrained_checkpoint_at_the_same_path_is_refused(shapes, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    for name in ("config.yaml", "tokenizer.json", "model.safetensors"):  # stat'ed only, never loaded
        (ck / name).write_text(name)
    q, out = _pope(shapes), tmp_path / "ev"
    kw = dict(limit=4, progress=False, checkpoint=str(ck), answer_fn=lambda qs, ps: ["no"] * len(qs))
    evaluate(None, "pope", q, shapes / "images", out, **kw)
    assert json.loads((out / "eval_run.json").read_text())["model"] == model_identity(ck)
    assert evaluate(None, "pope", q, shapes / "images", out, **kw)["n_answered_this_run"] == 0  # unchanged: on
    st = (ck / "model.safetensors").stat()  # touched, or restored from a copy: the same contents continue
    os.utime(ck / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert evaluate(None, "pope", q, shapes / "images", out, **kw)["n_answered_this_run"] == 0
    (ck / "model.safetensors").write_text("model.safetensor!")  # retrained in place: the same size, other bytes
    with pytest.raises(ScoreInputError, match=r"model\.files\['model\.safetensors'\]\.sha256_ends = \"[0-9a-f]{16}\", "
                                              r"but this run has .*\(the checkpoint's"):
        evaluate(None, "pope", q, shapes / "images", out, **kw)
    (ck / "model.safetensors").write_text("new weights")  # another size
    with pytest.raises(ScoreInputError, match=r"model\.files\['model\.safetensors'\]\.size = 17, but this run has "
                                              r"model\.files\['model\.safetensors'\]\.size = 11 \(the checkpoint's"):
        evaluate(None, "pope", q, shapes / "images", out, **kw)


@pytest.mark.parametrize("change, field", [
    ({"answer_fn": "B"}, "model.api"),
    ({"max_new_tokens": 5}, "max_new_tokens"),
    ({"questions": "adversarial"}, "questions"),  # the same question ids, other questions: the stale case
    ({"images": "copy"}, "images"),
    ({"task": "prompts"}, "task"),
])
def test_a_change_that_changes_the_answers_is_refused(shapes, tmp_path, change, field):
    out = tmp_path / "ev"
    first = _Model("A")
    evaluate(None, "pope", _pope(shapes), shapes / "images", out, limit=6, max_new_tokens=3, progress=False,
             answer_fn=first)
    before = _snapshot(out)
    images = shapes / "images"
    if change.get("images"):
        images = tmp_path / "images_copy"
        shutil.copytree(shapes / "images", images)
    task = change.get("task", "pope")
    q = _pope(shapes, change.get("questions", "random")) if task == "pope" else tmp_path / "prompts.jsonl"
    if task == "prompts":  # the POPE file's questions as free prompts: the same ids
        q.write_text(_pope(shapes).read_text())
    second = _Model(change.get("answer_fn", "A"), reply="no")
    with pytest.raises(ScoreInputError) as e:
        evaluate(None, task, q, images, out, limit=6, max_new_tokens=change.get("max_new_tokens", 3),
                 progress=False, answer_fn=second)
    msg = str(e.value)
    assert msg.startswith(f"{out}: its answers so far were given with {field} = ")
    assert "another --out" in msg and f"delete {out}" in msg
    old_value, new_value = {
        "model.api": ('"http://A/v1"', '"http://B/v1"'), "max_new_tokens": ("3", "5"),
        "questions": (json.dumps(str(_pope(shapes).resolve())), json.dumps(str(q.resolve()))),
        "images": (json.dumps(str((shapes / "images").resolve())), json.dumps(str(images.resolve()))),
        "task": ('"pope"', '"prompts"')}[field]
    assert f"{field} = {old_value}, but this run has {field} = {new_value}" in msg
    assert second.asked == [] and _snapshot(out) == before


def test_likelihood_and_generation_still_do_not_mix(shapes, tmp_path):
    out = tmp_path / "ev"
    evaluate(None, "pope", _pope(shapes), shapes / "images", out, limit=4, progress=False, answer_fn=_Model("A"))
    with pytest.raises(ScoreInputError, match=r"its answers so far were generation-based; continue without "
                                              r"--likelihood, or answer into another --out"):
        evaluate(None, "pope", _pope(shapes), shapes / "images", out, limit=4, likelihood=True, progress=False,
                 answer_fn=_Model("A"))


def test_a_folder_of_the_older_format_continues_with_a_warning(shapes, tmp_path, caplog):
    q, out = _pope(shapes), tmp_path / "ev"
    ids = [json.loads(x)["question_id"] for x in q.read_text().splitlines()]
    evaluate(None, "pope", q, shapes / "images", out, limit=2, progress=False, answer_fn=_Model("A"))
    (out / "eval_run.json").write_text(json.dumps({"task": "pope", "answered_by": "generation"}) + "\n")
    m = _Model("B")
    with caplog.at_level(logging.WARNING, logger="emma_mamba.eval.runner"):
        evaluate(None, "pope", q, shapes / "images", out, limit=5, progress=False, answer_fn=m)
    assert m.asked == ids[2:5]  # continued
    assert any("cannot be verified" in r.getMessage() and str(out) in r.getMessage() for r in caplog.records)
    assert json.loads((out / "eval_run.json").read_text())["model"] == m.identity  # recorded from now on
    # what the old format did record is still enforced
    (out / "eval_run.json").write_text(json.dumps({"task": "pope", "answered_by": "likelihood"}) + "\n")
    with pytest.raises(ScoreInputError, match="likelihood-based; continue with --likelihood"):
        evaluate(None, "pope", q, shapes / "images", out, limit=5, progress=False, answer_fn=m)
    # answers without any eval_run.json (older still): a warning too
    (out / "eval_run.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emma_mamba.eval.runner"):
        evaluate(None, "pope", q, shapes / "images", out, limit=6, progress=False, answer_fn=m)
    assert m.asked[-1] == ids[5] and any("cannot be verified" in r.getMessage() for r in caplog.records)


def test_an_unreadable_record_is_a_clear_error(shapes, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval_run.json").write_text('{"task": "po')
    with pytest.raises(ScoreInputError, match=r"eval_run.json: not valid JSON .*delete .* to start over"):
        evaluate(None, "pope", _pope(shapes), shapes / "images", out, limit=2, progress=False, answer_fn=_Model("A"))


def test_shards_refuse_a_folder_of_another_model(shapes, tmp_path):
    q, out = _pope(shapes), tmp_path / "ev"
    kw = dict(limit=6, batch_size=2, progress=False)
    for r in (0, 1):  # rank 0 first, as under torchrun it writes the record before answering
        evaluate(None, "pope", q, shapes / "images", out, shard=(r, 2), answer_fn=_Model("A"), **kw)
    before = _snapshot(out)
    assert sorted(p for p in before if p.startswith("answers.shard")) == ["answers.shard0.jsonl",
                                                                            "answers.shard1.jsonl"]
    for r in (0, 1):  # every rank refuses (none answers while another waits)
        b = _Model("B")
        with pytest.raises(ScoreInputError, match=r"model\.api = \"http://A/v1\", but this run has model\.api = "
                                                  r"\"http://B/v1\""):
            evaluate(None, "pope", q, shapes / "images", out, shard=(r, 2), answer_fn=b, **kw)
        assert b.asked == []
    assert _snapshot(out) == before
    merge_shards(out, 2)  # and the merged folder too
    with pytest.raises(ScoreInputError, match=r"model\.api"):
        evaluate(None, "pope", q, shapes / "images", out, answer_fn=_Model("B"), **kw)
    assert evaluate(None, "pope", q, shapes / "images", out, answer_fn=_Model("A"), **kw)["n_answered_this_run"] == 0


def test_a_suite_refuses_a_stale_benchmark_folder_before_the_first_answer(shapes, tmp_path):
    from emma_mamba.eval.suite import read_suite, run_suite
    from tests.eval.test_suite import _suite

    entries = read_suite(_suite(tmp_path, shapes))
    out = tmp_path / "out"
    run_suite(None, entries, out, progress=False, limit=2, answer_fn=_Model("A"), only=["mme"])
    b = _Model("B")
    with pytest.raises(ScoreInputError, match=r"benchmark 'mme': .*out/mme: its answers so far were given with "
                                              r"model\.api = \"http://A/v1\""):
        run_suite(None, entries, out, progress=False, limit=2, answer_fn=b)
    assert b.asked == []  # not even pope_adv, the first benchmark, was answered
    # each benchmark's folder records the suite's own settings: a rerun with A continues
    a = _Model("A")
    summary = run_suite(None, entries, out, progress=False, limit=2, answer_fn=a)
    assert [r["benchmark"] for r in summary["benchmarks"]] == ["pope_adv", "vqav2", "mme"]
    assert json.loads((out / "vqav2" / "eval_run.json").read_text())["max_new_tokens"] == 4  # its entry's


def test_api_answerer_carries_its_identity():
    from emma_mamba.eval.api import api_answer_fn

    fn = api_answer_fn("http://host:8000/v1", model="llava-7b")
    assert fn.identity == {"api": "http://host:8000/v1", "api_model": "llava-7b"}
    assert fn.for_max_new_tokens(5).identity == fn.identity  # the answerer evaluate actually uses
