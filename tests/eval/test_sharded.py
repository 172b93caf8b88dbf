"""Evaluation in several processes (`emma-mamba eval` under torchrun): each rank answers its share into a shard
file, rank 0 merges and scores. Against the one-process run: the same answers, files and metrics (shards simulated
in one process for generation, likelihood and MME; and a real 2-process gloo run of the command)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emma_mamba.eval.runner import evaluate, merge_shards
from tests.conftest import tree_env
from tests.eval.test_closed import _vsr_file
from tests.eval.test_runner import checkpoint, shapes  # noqa: F401 - fixtures


def _answers(d: Path) -> dict:
    return {json.loads(x)["question_id"]: json.loads(x) for x in (d / "answers.jsonl").read_text().splitlines()}


class _Known:
    """Replies and option probabilities that depend on the question only (as a model's do)."""

    def __call__(self, qs, ps):
        return ["yes" if len(p) % 2 else "no" for p in ps]

    def option_probabilities(self, qs, ps, options):
        return [[0.7, 0.3] if len(p) % 3 else [0.2, 0.8] for p in ps]


@pytest.mark.parametrize("task", ["pope", "vsr", "mme"])
def test_shards_merged_equal_one_process(task, shapes, tmp_path):
    ho = shapes / "heldout"
    q = {"pope": ho / "pope_random.jsonl", "mme": ho / "mme", "vsr": None}[task]
    if task == "vsr":
        q = _vsr_file(shapes, tmp_path / "vsr.jsonl")
    kw = dict(limit=10, batch_size=3, progress=False, answer_fn=_Known())
    one = evaluate(None, task, q, shapes / "images", tmp_path / "one", **kw)
    parts = [evaluate(None, task, q, shapes / "images", tmp_path / "many", shard=(r, 3), **kw) for r in range(3)]
    assert all(p["metrics"] is None and p["shard"] == [r, 3] for r, p in enumerate(parts))
    if task == "mme":  # rank 0 answers MME's files alone
        assert [p["n_answered_this_run"] for p in parts] == [one["n_answered_this_run"], 0, 0]
    else:
        n = one["n_answered_this_run"]  # question i goes to rank i mod 3
        assert [p["n_answered_this_run"] for p in parts] == [len(range(r, n, 3)) for r in range(3)]
    merge_shards(tmp_path / "many", 3)
    assert not list((tmp_path / "many").glob("answers.shard*.jsonl"))
    many = evaluate(None, task, q, shapes / "images", tmp_path / "many", **kw)
    assert many["n_answered_this_run"] == 0 and many["metrics"] == one["metrics"]
    if task == "mme":
        for f in (tmp_path / "one" / "mme").glob("*.txt"):
            assert (tmp_path / "many" / "mme" / f.name).read_text() == f.read_text()
    else:
        assert _answers(tmp_path / "many") == _answers(tmp_path / "one")
        # and in the same order: the shards are interleaved back into the questions' order
        lines = [(d / "answers.jsonl").read_text().splitlines() for d in (tmp_path / "many", tmp_path / "one")]
        assert lines[0] == lines[1]


def test_a_shard_resumes_its_own_answers(shapes, tmp_path):
    """A rank that crashed continues from its shard file; answers merged earlier are not asked again."""
    q = shapes / "heldout" / "pope_random.jsonl"
    asked = []

    def fn(qs, ps):
        asked.extend(x.qid for x in qs)
        return ["yes"] * len(qs)

    evaluate(None, "pope", q, shapes / "images", tmp_path / "o", limit=8, batch_size=2, progress=False,
             shard=(1, 2), answer_fn=fn)
    first = list(asked)
    assert len(first) == 4
    asked.clear()
    evaluate(None, "pope", q, shapes / "images", tmp_path / "o", limit=8, batch_size=2, progress=False,
             shard=(1, 2), answer_fn=fn)
    assert asked == []  # all in its shard file already
    merge_shards(tmp_path / "o", 2)
    evaluate(None, "pope", q, shapes / "images", tmp_path / "o", limit=8, batch_size=2, progress=False,
             shard=(1, 2), answer_fn=fn)
    assert asked == []  # merged: not asked again
    with pytest.raises(ValueError, match=r"shard must be \(rank, world\)"):
        evaluate(None, "pope", q, shapes / "images", tmp_path / "o", progress=False, shard=(2, 2), answer_fn=fn)


def test_torchrun_two_processes_give_the_one_process_answers(shapes, checkpoint, tmp_path):
    """`emma-mamba eval` under torchrun (2 CPU processes, gloo) with a random tiny checkpoint: the merged answers
    and the metrics equal the 1-process command's."""
    from emma_mamba.cli import main

    q = shapes / "heldout" / "pope_adversarial.jsonl"
    args = ["eval", "--task", "pope", "--questions", str(q), "--images", str(shapes / "images"), "--checkpoint",
            str(checkpoint), "--batch-size", "2", "--max-new-tokens", "3", "--limit", "6", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = tree_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "emma_mamba.cli", *args, "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stdout.count("POPE  n=6") == 1  # rank 0 reports
    assert _answers(tmp_path / "two") == _answers(tmp_path / "one")
    r1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    r2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert r1["metrics"] == r2["metrics"]
    # what the run did, over both processes (it said 0 answered, 0 decode steps: the scoring call's own counts)
    assert r2["n_answered_this_run"] == r1["n_answered_this_run"] == 6 and r2["processes"] == 2
    assert r2["decode_steps"] > 0


def test_torchrun_a_rank_that_fails_says_so_and_the_other_in_one_line(shapes, checkpoint, tmp_path):
    """Only rank 1 reads a corrupt image (question 3 of 6: i mod 2): its error line carries no rank, and rank 0
    printed gloo's whole traceback ("Connection closed by peer"). Now each line names its rank, rank 0's says
    another process stopped first, as training's do; no traceback."""
    import shutil

    src = shapes / "heldout" / "pope_adversarial.jsonl"
    qs = [json.loads(x) for x in src.read_text().splitlines()][:6]
    images = tmp_path / "images"
    for q in qs:
        (images / q["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shapes / "images" / q["image"], images / q["image"])
    qs[3]["image"] = "broken.png"
    (images / "broken.png").write_text("not a picture")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "emma_mamba.cli", "eval", "--task", "pope", "--questions", str(tmp_path / "q.jsonl"), "--images",
           str(images), "--checkpoint", str(checkpoint), "--batch-size", "2", "--max-new-tokens", "2",
           "--no-progress", "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, env=tree_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "[rank 1] emma-mamba eval: " in r.stderr and "broken.png" in r.stderr, r.stderr[-4000:]
    assert "[rank 0] emma-mamba eval: another process stopped first" in r.stderr, r.stderr[-4000:]
    # no traceback of ours (torchrun's launcher prints its own ChildFailedError one)
    assert not re.search(r'File "[^"]*emma_mamba/', r.stderr) and "GLHF" not in r.stderr, r.stderr[-4000:]


def test_suite_shards_then_rank_0_merges_and_summarises(shapes, tmp_path):
    """run_suite with shard and a barrier: rank 1 answers its share of every benchmark and returns None; rank 0
    (run after it here, its barrier a no-op) answers its own, merges and gives the one-process summary."""
    from emma_mamba.eval.suite import read_suite, run_suite
    from tests.eval.test_suite import _suite

    entries = read_suite(_suite(tmp_path, shapes))
    fn = _Known()
    one = run_suite(None, entries, tmp_path / "one", progress=False, limit=6, answer_fn=fn)
    assert run_suite(None, entries, tmp_path / "two", progress=False, limit=6, answer_fn=fn, shard=(1, 2),
                     sync=lambda: None) is None
    two = run_suite(None, entries, tmp_path / "two", progress=False, limit=6, answer_fn=fn, shard=(0, 2),
                    sync=lambda: None)
    assert two["benchmarks"] == one["benchmarks"]
    for e in entries:
        if e.task != "mme":
            assert _answers(tmp_path / "two" / e.name) == _answers(tmp_path / "one" / e.name)


def test_suite_ranks_answer_only_after_rank_0_checked_the_folders(shapes, tmp_path, caplog):
    """Two ranks as threads with a real barrier, in the order that raced: rank 0 is held before its first look at
    the output folders until rank 1 reaches its first barrier. Rank 1 must not have answered by then, so rank 0
    finds fresh folders (no "holds answers but no eval_run.json" warning, which the old order gave: rank 1's shard
    answers were written before rank 0 checked), and the result is the one-process run's."""
    import logging
    import threading

    import emma_mamba.eval.suite as suite_mod
    from emma_mamba.eval.suite import read_suite, run_suite
    from tests.eval.test_suite import _suite

    entries = read_suite(_suite(tmp_path, shapes))
    fn = _Known()
    one = run_suite(None, entries, tmp_path / "one", progress=False, limit=6, answer_fn=fn)
    barrier = threading.Barrier(2, timeout=60)
    rank1_waits = threading.Event()
    real_check = suite_mod.check_run_record

    def check(*a, **kw):  # rank 0's checks wait for rank 1 to be at a barrier (or to have answered: old order)
        if threading.current_thread().name == "rank0":
            assert rank1_waits.wait(60)
        return real_check(*a, **kw)

    def sync1():
        rank1_waits.set()
        barrier.wait()

    results, errors = {}, []

    def rank(r):
        try:
            results[r] = run_suite(None, entries, tmp_path / "two", progress=False, limit=6, answer_fn=fn,
                                   shard=(r, 2), sync=barrier.wait if r == 0 else sync1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    suite_mod.check_run_record = check
    try:
        with caplog.at_level(logging.WARNING, logger="emma_mamba.eval.runner"):
            threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
    finally:
        suite_mod.check_run_record = real_check
    assert not errors, errors
    assert not [r.getMessage() for r in caplog.records if "no eval_run.json" in r.getMessage()]
    assert results[1] is None and results[0]["benchmarks"] == one["benchmarks"]


def test_torchrun_rank_0_late_to_a_fresh_folder(shapes, checkpoint, tmp_path):
    """`eval` under torchrun (2 gloo processes) with rank 0 held before it checks the fresh --out until rank 1 is
    at its first barrier: no warning about an older emma-mamba's answers (rank 1 used to answer before that check),
    and the scoring after the merge does not log "N of N questions already answered"."""
    driver = tmp_path / "late_rank0.py"
    marker = tmp_path / "rank1_at_barrier"
    driver.write_text(f"""
import os, sys, time
from pathlib import Path
import emma_mamba.eval.runner as runner
import emma_mamba.training.parallel as parallel

marker = Path({str(marker)!r})
real_check, real_barrier, held = runner.check_run_record, parallel.barrier, []

def check(*a, **kw):
    if os.environ["RANK"] == "0" and not held:  # wait until rank 1 is at a barrier (or has answered: old order)
        held.append(1)
        t = time.time()
        while not marker.exists() and time.time() - t < 120:
            time.sleep(0.05)
    return real_check(*a, **kw)

def barrier():
    if os.environ["RANK"] == "1":
        marker.touch()
    real_barrier()

runner.check_run_record, parallel.barrier = check, barrier
from emma_mamba.cli import main
sys.exit(main(sys.argv[1:]))
""")
    q = shapes / "heldout" / "pope_random.jsonl"
    args = ["eval", "--task", "pope", "--questions", str(q), "--images", str(shapes / "images"), "--checkpoint",
            str(checkpoint), "--batch-size", "2", "--max-new-tokens", "2", "--limit", "4", "--no-progress",
            "--out", str(tmp_path / "tr")]
    env = tree_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert marker.exists() and r.stdout.count("POPE  n=4") == 1
    assert "no eval_run.json" not in r.stderr, r.stderr[-3000:]
    assert "already answered" not in r.stderr, r.stderr[-3000:]
    assert len(_answers(tmp_path / "tr")) == 4
