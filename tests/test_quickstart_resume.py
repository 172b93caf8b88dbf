"""`emma-mamba quickstart --resume`: an interrupted quickstart continued, against an uninterrupted run of the same
recipe and seed (the oracle: the stages are deterministic on one machine, so a resumed run must give the same
training curves, answers and table); what it reuses is checked by the files it leaves untouched and the trainers
it builds, and every refusal by its message."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from emma_mamba.cli import main

FAST = ["quickstart", "--fast", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; started with --resume into a folder that does not exist (a new run)."""
    out = tmp_path_factory.mktemp("qs_ref") / "run"
    assert main([*FAST, "--out", str(out), "--resume"]) == 0
    return json.loads((out / "summary.json").read_text())


def _same_results(a: dict, b: dict) -> None:
    """The same numbers and answers (the files they name are in each run's own folder)."""
    def rel(doc, root):
        return json.loads(json.dumps(doc).replace(json.dumps(root)[1:-1], "<out>"))

    root_a, root_b = (str(Path(d["demo"]["image"]).parents[3]) for d in (a, b))
    assert a["rows"] == b["rows"]
    assert rel(a["training"], root_a) == rel(b["training"], root_b)
    assert rel(a["demo"], root_a) == rel(b["demo"], root_b)


class _Trainers:
    """Records the stage and resume point of every Trainer built (and optionally stops one)."""

    def __init__(self, monkeypatch, stop=None):
        from emma_mamba.training.trainer import Trainer

        self.built: list[tuple[str, str | None]] = []
        real_init, real_step = Trainer.__init__, Trainer.train_step
        rec = self

        def init(self, cfg, resume=None, device=None):
            real_init(self, cfg, resume=resume, device=device)
            rec.built.append((cfg.stage, None if self.resume_from is None else self.resume_from.name))

        def step(self, mbs):
            if rec.stop is not None and rec.stop[0] == self.cfg.stage and self.global_step == rec.stop[1]:
                if rec.stop[2] == "int":
                    raise KeyboardInterrupt
                # the trainer's handler: finish the step, checkpoint it, stop
                os.kill(os.getpid(), signal.SIGINT if rec.stop[2] == "sigint" else signal.SIGTERM)
            return real_step(self, mbs)

        self.stop = stop
        monkeypatch.setattr(Trainer, "__init__", init)
        monkeypatch.setattr(Trainer, "train_step", step)


def _bytes(out: Path) -> dict[str, bytes]:
    names = ["data/meta.json", "data/tokenizer/tokenizer.json", "clip/open_clip.pt", "stage1/model.safetensors"]
    return {n: (out / n).read_bytes() for n in names}


def test_ctrl_c_in_stage_2_then_resume_reuses_the_finished_steps(tmp_path, capsys, monkeypatch, reference):
    import emma_mamba.data.shapes as shapes
    import emma_mamba.training.clip_pretrain as cp

    out = tmp_path / "qs"
    t = _Trainers(monkeypatch, stop=("finetune", 1, "int"))
    assert main([*FAST, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 1 of 2 during stage 2 (finetune)" in err
    assert ("rerun with --resume to continue it (reusing ShapesWorld, stage 0 (CLIP), stage 1 (pretrain)), or with "
            "--overwrite to start it again") in err
    before = _bytes(out)
    # the plain command refuses the folder and names both ways on
    assert main([*FAST, "--out", str(out)]) == 2
    assert "pass --resume to continue it, or --overwrite to replace it" in capsys.readouterr().err

    def never(*a, **k):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(shapes, "generate", never)
    monkeypatch.setattr(cp, "pretrain_clip", never)
    t.stop, t.built = None, []
    assert main([*FAST, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert t.built == [("finetune", None)]  # stage 2 alone, from its start (Ctrl-C writes no checkpoint)
    assert "reusing ShapesWorld, stage 0 (CLIP), stage 1 (pretrain)" in printed and "(done earlier)" in printed
    assert _bytes(out) == before
    s = json.loads((out / "summary.json").read_text())
    _same_results(s, reference)
    assert s["resumed"] == {"stopped_during": "stage 2 (finetune)",
                            "reused": ["ShapesWorld", "stage 0 (CLIP)", "stage 1 (pretrain)"]}
    assert "resumed" not in reference
    state = json.loads((out / "quickstart_run.json").read_text())
    assert state["finished"] is True and list(state["done"]) == ["data", "clip", "pretrain", "finetune"]
    # finished: a further --resume trains nothing and gives the same summary
    t.built = []
    assert main([*FAST, "--out", str(out), "--resume"]) == 0
    assert t.built == [] and "finished: nothing to resume" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text()) == s


@pytest.mark.parametrize("how,code,said", [("term", 143, "SIGTERM"), ("sigint", 130, "Ctrl-C")])
def test_sigterm_or_a_first_ctrl_c_in_stage_1_then_resume_continues_from_its_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                        reference, how, code, said):
    """A real SIGTERM, or a real first Ctrl-C, during stage 1's first step: the trainer checkpoints that step and
    stops; --resume continues stage 1 from that checkpoint and ends as the uninterrupted quickstart."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    # SIGINT as at a terminal (a pytest started as a background job has it ignored, which the trainer keeps)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "qs"
    t = _Trainers(monkeypatch, stop=("pretrain", 0, how))
    try:
        assert main([*FAST, "--out", str(out)]) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert f"stopped by {said} after step 1 of 2 during stage 1 (pretrain)" in err
    assert "--resume to continue it (reusing ShapesWorld, stage 0 (CLIP); stage 1 (pretrain) from its checkpoint" in err
    t.stop, t.built = None, []
    assert main([*FAST, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert t.built[0][0] == "pretrain" and t.built[0][1] is not None and t.built[0][1].endswith("1")
    assert t.built[1] == ("finetune", None)
    assert "pretrain: 2 steps (continued from " in printed
    # stage 1's summary read back from its metrics.jsonl equals the uninterrupted run's, kept in memory
    _same_results(json.loads((out / "summary.json").read_text()), reference)


def test_a_step_whose_files_are_gone_is_done_again_with_every_step_after_it(tmp_path, capsys, monkeypatch, reference):
    out = tmp_path / "qs"
    assert main([*FAST, "--out", str(out)]) == 0
    (out / "clip" / "open_clip.pt").unlink()
    (out / "eval" / "vqav2" / "answers.jsonl").write_text("")  # stale answers must not be scored
    t = _Trainers(monkeypatch)
    assert main([*FAST, "--out", str(out), "--resume"]) == 0
    assert "finished, but files of it are gone" in capsys.readouterr().out
    assert t.built == [("pretrain", None), ("finetune", None)]
    s = json.loads((out / "summary.json").read_text())
    _same_results(s, reference)
    assert s["resumed"]["reused"] == ["ShapesWorld"]


def test_resume_refuses_another_seed_recipe_or_folder(tmp_path, capsys):
    from dataclasses import asdict

    import emma_mamba.quickstart as q

    out = tmp_path / "qs"
    out.mkdir()
    fast = q.load_quickstart_config(q.recipe_path(None, fast=True))
    q._write_state(out, {"what": "emma-mamba quickstart", "seed": 0, "config": "x", "stage": "stage 1 (pretrain)",
                         "finished": False, "recipe": asdict(fast), "done": {}})
    assert main([*FAST, "--out", str(out), "--resume", "--seed", "3"]) == 2
    assert "holds the quickstart of seed 0, and this command's --seed is 3; give --seed 0" in capsys.readouterr().err
    assert main(["quickstart", "--no-progress", "--out", str(out), "--resume"]) == 2  # the full recipe, not --fast
    err = capsys.readouterr().err
    assert "holds a quickstart of another recipe (x; it differs in: data, model, clip, stage1, stage2, eval)" in err
    with pytest.raises(SystemExit):
        main([*FAST, "--out", str(out), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*FAST, "--out", str(other), "--resume"]) == 2
    assert "does not look like a quickstart output; there is nothing to resume" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]
