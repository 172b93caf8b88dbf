"""An operator's walkthrough of `emma-mamba quickstart` and `emma-mamba ablate` (--fast recipe): interruptions and
reruns, --out / --config / --seed mistakes, and every printed number against the files it came from, computed
here by hand (tests/test_quickstart.py covers the plain end-to-end run)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emma_mamba.cli import main
from emma_mamba.config import shipped_configs

FAST = ["quickstart", "--fast", "--no-progress"]


def _fast_recipe() -> dict:
    return yaml.safe_load(shipped_configs()["quickstart_fast"].read_text())


def _recipe(tmp_path, name="r.yaml", **edit) -> Path:
    r = _fast_recipe()
    for dotted, v in edit.items():
        *path, key = dotted.split("__")
        d = r
        for k in path:
            d = d.setdefault(k, {})
        d[key] = v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(r))
    return p


# ------------------------------------------------------------------------------- the numbers, by hand

def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _pope_yes(text: str) -> bool:
    """LLaVA's eval_pope.py: the first sentence; "No" / "not" / the word "no" -> no, anything else -> yes."""
    t = text.split(".")[0].replace(",", "")
    words = t.split()
    return not ("No" in words or "not" in words or "no" in words)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main([*FAST, "--out", str(out)]) == 0
    return out, buf.getvalue()


def test_summary_numbers_are_the_answer_files_scored_by_hand(fast_run):
    out, printed = fast_run
    s = json.loads((out / "summary.json").read_text())
    ho, blind = out / "data" / "heldout", out / "blind"
    rows = {r["task"]: r for r in s["rows"]}
    for v in ("random", "popular", "adversarial"):
        t = f"pope_{v}"
        labels = {r["question_id"]: r["label"] == "yes" for r in _jsonl(ho / f"{t}.jsonl")}
        answers = _jsonl(out / "eval" / t / "answers.jsonl")
        ids = [a["question_id"] for a in answers]
        assert len(ids) == len(set(ids)) == rows[t]["n"] == 8  # eval.limit of the fast recipe
        pred = {a["question_id"]: _pope_yes(a["text"]) for a in answers}
        tp = sum(pred[i] and labels[i] for i in ids)
        fp = sum(pred[i] and not labels[i] for i in ids)
        fn = sum(not pred[i] and labels[i] for i in ids)
        acc = sum(pred[i] == labels[i] for i in ids) / len(ids)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        assert rows[t]["accuracy"] == pytest.approx(acc) and rows[t]["f1"] == pytest.approx(f1)
        assert rows[t]["yes_ratio"] == pytest.approx(sum(pred.values()) / len(ids))
        # chance: the blind baseline's answers on the same questions
        bl = {r["question_id"]: _pope_yes(r["text"]) for r in _jsonl(blind / f"{t}.jsonl")}
        btp = sum(bl[i] and labels[i] for i in ids)
        bfp = sum(bl[i] and not labels[i] for i in ids)
        bfn = sum(not bl[i] and labels[i] for i in ids)
        assert rows[t]["chance_accuracy"] == pytest.approx(sum(bl[i] == labels[i] for i in ids) / len(ids))
        assert rows[t]["chance_f1"] == pytest.approx(2 * btp / (2 * btp + bfp + bfn) if btp else 0.0)
    # VQAv2 soft accuracy: min(1, matching humans / 3) averaged over the 10 leave-one-out subsets
    ann = {a["question_id"]: [x["answer"] for x in a["answers"]]
           for a in json.loads((ho / "vqav2_annotations.json").read_text())["annotations"]}

    def norm(a: str) -> str:
        return re.sub(r"[^\w\s]", "", a.strip().lower()).strip()

    def vqa(ans: str, gold: list[str]) -> float:
        return sum(min(1.0, sum(norm(g) == norm(ans) for g in gold[:k] + gold[k + 1:]) / 3)
                   for k in range(len(gold))) / len(gold)

    for name in ("model", "chance"):
        got = {a["question_id"]: a["text"] for a in _jsonl(out / "eval" / "vqav2" / "answers.jsonl")}
        if name == "chance":
            blind_ans = {r["question_id"]: r["answer"] for r in json.loads((blind / "vqav2.json").read_text())}
            got = {i: blind_ans[i] for i in got}
        acc = sum(vqa(a, ann[i]) for i, a in got.items()) / len(got)
        assert rows["vqav2"]["accuracy" if name == "model" else "chance_accuracy"] == pytest.approx(acc)
    # GQA: exact match of the normalised answer
    gold = {qid: q["answer"] for qid, q in json.loads((ho / "gqa_questions.json").read_text()).items()}
    got = {str(a["question_id"]): a["text"] for a in _jsonl(out / "eval" / "gqa" / "answers.jsonl")}
    assert rows["gqa"]["accuracy"] == pytest.approx(sum(norm(got[i]) == norm(gold[i]) for i in got) / len(got))
    blind_gqa = {str(r["questionId"]): r["prediction"] for r in json.loads((blind / "gqa.json").read_text())}
    assert rows["gqa"]["chance_accuracy"] == pytest.approx(
        sum(norm(blind_gqa[i]) == norm(gold[i]) for i in got) / len(got))
    # the printed table is the summary's rows in percent
    for r in s["rows"]:
        line = next(x for x in printed.splitlines() if x.startswith(r["task"] + " "))
        nums = line.split()[1:]
        assert int(nums[0]) == r["n"]
        assert [float(x) for x in nums[1:3]] == [round(100 * r["chance_accuracy"], 1), round(100 * r["accuracy"], 1)]
        if "f1" in r:
            assert [float(x) for x in nums[3:5]] == [round(100 * r["chance_f1"], 1), round(100 * r["f1"], 1)]
    # the training summary is the stages' metrics.jsonl: first loss, mean of the last 5 steps, held-out loss
    for stage, d in (("pretrain", "stage1"), ("finetune", "stage2")):
        lines = _jsonl(out / d / "metrics.jsonl")
        steps = [x for x in lines if "lm_loss" in x]
        h = s["training"][stage]
        assert h["steps"] == len(steps) == 2 and h["first_loss"] == steps[0]["lm_loss"]
        assert h["last_loss"] == pytest.approx(sum(x["lm_loss"] for x in steps[-5:]) / len(steps[-5:]))
        assert h["val_lm_loss"] == {str(x["step"]): round(x["val_lm_loss"], 4) for x in lines if "val_lm_loss" in x}
    state = json.loads((out / "quickstart_run.json").read_text())
    assert state["finished"] is True and state["seed"] == 0


# ------------------------------------------------------------------------------- --out, --config, --seed

def test_out_that_cannot_hold_a_quickstart_is_one_line_not_a_traceback(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert main([*FAST, "--out", str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*FAST, "--out", str(f / "sub")]) == 2
    assert "cannot write into --out" in capsys.readouterr().err
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK) or os.geteuid() == 0:  # read-only even for root
        assert main([*FAST, "--out", "/sys/emma_quickstart_test"]) == 2
        assert "cannot write into --out /sys/emma_quickstart_test" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_overwrite_never_deletes_an_ablation_folder_or_another_commands_summary(tmp_path, capsys):
    abl = tmp_path / "abl"  # what `emma-mamba ablate` leaves: data/meta.json, per-seed CLIPs, runs
    for p in ("data/meta.json", "clip/seed0/open_clip.pt", "cobra-like/seed0/result.json"):
        (abl / p).parent.mkdir(parents=True, exist_ok=True)
        (abl / p).write_text("{}")
    assert main([*FAST, "--out", str(abl), "--overwrite"]) == 2
    assert "does not look like a quickstart output" in capsys.readouterr().err
    assert (abl / "clip" / "seed0" / "open_clip.pt").is_file() and (abl / "data" / "meta.json").is_file()
    suite = tmp_path / "suite"  # `eval --suite` writes a summary.json too
    (suite / "eval").mkdir(parents=True)
    (suite / "summary.json").write_text(json.dumps({"rows": []}))
    assert main([*FAST, "--out", str(suite), "--overwrite"]) == 2
    assert (suite / "eval").is_dir() and (suite / "summary.json").is_file()


@pytest.mark.parametrize("edit, message", [
    ({"eval__batch_size": "eight"}, "eval.batch_size must be an integer >= 1, got 'eight'"),
    ({"eval__limit": 0}, "eval.limit must be an integer >= 1 or null"),
    ({"stage2__train__bogus": 1}, "'train.bogus'"),
    ({"stage1__train__max_steps": 0, "stage1__train__epochs": 0}, "set max_steps > 0 or epochs > 0"),
])
def test_a_bad_recipe_is_refused_before_anything_is_made(tmp_path, capsys, edit, message):
    """Before: a stage-2 or eval mistake surfaced after the data, stage 0 and (eval) both training stages, the
    eval ones as a TypeError traceback; and --overwrite had already deleted the previous run."""
    out = tmp_path / "qs"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"rows": [], "demo": {}, "training": {}}))  # a previous run
    assert main([*FAST, "--config", str(_recipe(tmp_path, **edit)), "--out", str(out), "--overwrite"]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("seed", [2 ** 64, -(2 ** 63) - 1])
def test_a_seed_out_of_range_is_refused_up_front(tmp_path, capsys, seed):
    """Before: the data were made, then stage 0 / 1 ended in "Overflow when unpacking long long"."""
    assert main([*FAST, "--out", str(tmp_path / "qs"), "--seed", str(seed)]) == 2
    assert "--seed must be between -2**43 and 2**43" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


def test_a_recipe_of_another_command_is_named(tmp_path, capsys):
    assert main([*FAST, "--config", "train_tiny_stage1", "--out", str(tmp_path / "q")]) == 2
    assert "unknown key 'stage'" in capsys.readouterr().err and not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------- interruptions

def test_interrupted_while_generating_data_then_overwrite_starts_again(tmp_path, capsys, monkeypatch):
    """Before: Ctrl-C before ShapesWorld's meta.json left a folder that `--overwrite` refused as "not a
    quickstart output": the user had to delete it by hand."""
    import emma_mamba.data.shapes as shapes

    real = shapes.generate

    def stopped(cfg, out_dir, **kw):
        (Path(out_dir) / "images" / "train").mkdir(parents=True)
        (Path(out_dir) / "images" / "train" / "000000.png").write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    out = tmp_path / "qs"
    monkeypatch.setattr(shapes, "generate", stopped)
    assert main([*FAST, "--out", str(out)]) == 130
    assert "interrupted during data" in capsys.readouterr().err
    monkeypatch.setattr(shapes, "generate", real)
    assert main([*FAST, "--out", str(out)]) == 2  # the same command says what is there and what to do
    err = capsys.readouterr().err
    assert "holds an unfinished quickstart (seed 0" in err and "stopped during data" in err and "--overwrite" in err
    assert main([*FAST, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "quickstart_run.json").read_text())["finished"] is True


def test_ctrl_c_and_sigterm_inside_a_training_stage_end_with_one_line(tmp_path, capsys, monkeypatch):
    """Before: the trainer's TrainingInterrupted went up as a traceback (exit 1), advising `--resume auto`,
    the trainer's flag, which quickstart does not take. SIGTERM is delivered for real, in this process, during
    stage 2's first step (the trainer's handler checkpoints after the step and stops)."""
    from emma_mamba.training.trainer import Trainer

    real = Trainer.train_step
    how = {}

    def step(self, mbs):
        if self.cfg.stage == "finetune":
            if how["sig"] == "int":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, mbs)

    monkeypatch.setattr(Trainer, "train_step", step)
    out = tmp_path / "qs"
    for sig, code, said in (("int", 130, "interrupted at step 0 of 2"),
                            ("term", 143, "stopped by SIGTERM after step 1 of 2")):
        how["sig"] = sig
        assert main([*FAST, "--out", str(out), "--overwrite"]) == code
        err = capsys.readouterr().err
        assert f"{said} during stage 2 (finetune)" in err and "--overwrite" in err
        assert "rerun with --resume to continue it" in err  # quickstart's own flag, not the trainer's
        assert "--resume auto" not in err and "Traceback" not in err
        assert not (out / "summary.json").exists()
    monkeypatch.setattr(Trainer, "train_step", real)
    assert main([*FAST, "--out", str(out)]) == 2
    assert "stopped during stage 2 (finetune)" in capsys.readouterr().err


def test_sigterm_outside_training_ends_the_command_with_143(tmp_path):
    """Before: SIGTERM during data, stage 0 or the eval killed the process silently (exit -15). In a child
    process (the signal is sent by the code it runs, at a chosen point: during the held-out evaluation)."""
    out = tmp_path / "qs"
    code = f"""
import os, signal, sys
import emma_mamba.quickstart as q
def ev(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("not stopped")
q.evaluate_heldout = ev
from emma_mamba.cli import main
sys.exit(main({[*FAST, "--out", str(out)]!r}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 143, p.stderr[-2000:]
    assert "stopped by SIGTERM during held-out evaluation" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------- ablate

def _ablate(tmp_path, *extra, out="runs", results="abl.json"):
    return main(["ablate", "--config", "quickstart_fast", "--out", str(tmp_path / out), "--results",
                 str(tmp_path / results), "--plot", "", *extra])


def test_ablate_a_failing_run_is_named_and_the_others_finish(tmp_path, capsys, monkeypatch):
    """Before: the first run that raised ended the ablation (a traceback, not naming the run); the runs after
    it never ran and the results JSON held only the earlier ones."""
    import emma_mamba.quickstart as q

    real = q.train_stages

    def train(qc, out, *a, **k):
        if Path(out).parent.name == "MFF":  # the +MFF run's folder
            raise RuntimeError("boom in the +MFF run")
        return real(qc, out, *a, **k)

    monkeypatch.setattr(q, "train_stages", train)
    assert _ablate(tmp_path, "--seeds", "0", "--variants", "+MFF", "cobra-like") == 1
    err = capsys.readouterr().err
    assert "+MFF seed 0 failed: RuntimeError: boom in the +MFF run" in err
    doc = json.loads((tmp_path / "abl.json").read_text())
    assert list(doc["summary"]) == ["cobra-like"] and doc["runs"]["+MFF"] == []
    monkeypatch.setattr(q, "train_stages", real)


def test_ablate_typo_and_rerun_with_another_recipe(tmp_path, capsys):
    assert _ablate(tmp_path, "--variants", "cobra") == 2
    assert "unknown variant 'cobra'" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    # two seeds, --jobs larger than the runs; then the table against the per-run files, by hand
    assert _ablate(tmp_path, "--seeds", "0", "1", "--variants", "cobra-like", "--jobs", "1") == 0
    doc = json.loads((tmp_path / "abl.json").read_text())
    per_run = [json.loads((tmp_path / "runs" / "cobra-like" / f"seed{s}" / "result.json").read_text())
               for s in (0, 1)]
    for task, metric, label in (("pope_random", "accuracy", "POPE-rand acc"), ("pope_adversarial", "f1", "POPE-adv F1"),
                                ("vqav2", "accuracy", "VQAv2 acc")):
        vals = []
        for s in (0, 1):  # each run's eval metrics file, not the result.json copy
            m = json.loads((tmp_path / "runs" / "cobra-like" / f"seed{s}" / "eval" / task / "metrics.json")
                           .read_text())["metrics"]
            assert m[metric] == per_run[s]["metrics"][task][metric]
            vals.append(m[metric])
        mean, sd = (vals[0] + vals[1]) / 2, abs(vals[0] - vals[1]) / math.sqrt(2)  # ddof = 1 for two values
        st = doc["summary"]["cobra-like"]["stats"][label]
        assert st["mean"] == pytest.approx(mean) and st["std"] == pytest.approx(sd)
        assert f"{100 * mean:.1f} ± {100 * sd:.1f}" in doc["table_markdown"]
    # the same --out with another stage-2 recipe: refused by name (before: "done earlier", the old runs reused)
    changed = _recipe(tmp_path, stage2__train__lr=5.0e-4)
    assert main(["ablate", "--config", str(changed), "--out", str(tmp_path / "runs"), "--results",
                 str(tmp_path / "abl2.json"), "--plot", "", "--seeds", "0", "--variants", "cobra-like"]) == 2
    err = capsys.readouterr().err
    assert "is a run of another recipe (it differs in: stage2)" in err and not (tmp_path / "abl2.json").exists()


def test_ablate_interrupted_data_or_clip_is_not_trusted_by_the_rerun(tmp_path, capsys, monkeypatch):
    """Before: Ctrl-C after ShapesWorld's meta.json but before the word tokenizer, or inside stage 0's checkpoint
    write, left files the rerun took as finished (its stage 1 then failed on the missing / truncated file)."""
    import torch

    import emma_mamba.quickstart as q
    import emma_mamba.training.clip_pretrain as cp

    real_tok, real_save = q.build_word_tokenizer, torch.save
    monkeypatch.setattr(q, "build_word_tokenizer", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    args = ("--seeds", "0", "--variants", "cobra-like")
    assert _ablate(tmp_path, *args) == 130
    assert (tmp_path / "runs" / "data" / "meta.json").is_file()
    monkeypatch.setattr(q, "build_word_tokenizer", real_tok)

    def half_save(obj, f, *a, **k):
        Path(f).write_bytes(b"PK half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(cp.torch, "save", half_save)
    assert _ablate(tmp_path, *args) == 130
    monkeypatch.setattr(cp.torch, "save", real_save)
    capsys.readouterr()
    assert _ablate(tmp_path, *args) == 0
    assert "interrupted" not in capsys.readouterr().err
    assert torch.load(tmp_path / "runs" / "clip" / "seed0" / "open_clip.pt", weights_only=True)


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ablate_sigterm_stops_its_worker_processes(tmp_path):
    """Before: SIGTERM to `ablate --jobs 2` killed the parent alone; its two workers trained on, orphaned. The
    signal is sent once a worker's stage 1 has written its first metrics line."""
    recipe = _recipe(tmp_path, stage1__train__max_steps=400)
    out = tmp_path / "runs"
    p = subprocess.Popen([sys.executable, "-m", "emma_mamba.cli", "ablate", "--config", str(recipe), "--out", str(out),
                          "--results", str(tmp_path / "a.json"), "--plot", "", "--seeds", "0", "1", "--variants",
                          "cobra-like", "--jobs", "2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not list(out.glob("cobra-like/seed*/stage1/metrics.jsonl")):
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.1)  # polling for the file, not timing anything
        workers = [k for k in _children(p.pid) if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]
        assert workers
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
        assert "stopped by SIGTERM" in p.stderr.read()
        for k in workers:
            assert not Path(f"/proc/{k}").exists() or "Z" in Path(f"/proc/{k}/stat").read_text().split()[2]
    finally:
        if p.poll() is None:
            p.kill()
