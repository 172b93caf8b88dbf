"""A run's work survives what schedulers and machines do to it: a second run into the same folder is refused while
the first holds it, SIGTERM checkpoints the step in progress before stopping, a failed validation or checkpoint
write leaves the last checkpoint named, the final model is written whole or not at all, and a resume that would
reshuffle the rest of the epoch is refused."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

import emma_mamba
from emma_mamba.config import ConfigError
from emma_mamba.data.llava import DataError
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training import TrainingError, TrainingInterrupted
from emma_mamba.training import trainer as trainer_mod
from emma_mamba.training.config import run_config_to_dict
from emma_mamba.training.trainer import LOCK_FILE, Trainer
from tests.training.conftest import make_cfg, subset


def _cli_run(cfg, tmp_path, name="run.yaml"):
    """`emma-mamba finetune --config` with ``cfg`` in a new process: (returncode, stderr)."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "emma_mamba.cli", "finetune", "--config", str(path)],
                       capture_output=True, text=True, timeout=600, env=env)
    return r.returncode, r.stderr


def test_a_second_run_into_a_folder_in_use_is_refused(shapes, tmp_path):
    """Two runs in one folder interleaved their metrics.jsonl and replaced each other's checkpoints and final model
    (the 'already holds a run' check sees only finished checkpoints). While a trainer holds the folder, a second
    process's run is refused before it builds anything, naming the holder; once the first is done, a run with
    --resume auto may continue it."""
    data = subset(shapes, tmp_path, 4)
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 2})
    t = Trainer(cfg)  # holds the folder from here (its checks are done, the model is built)
    rc, err = _cli_run(cfg, tmp_path)
    assert rc == 2, err
    assert f"is in use by a training run that is still going (pid {os.getpid()} on " in err, err
    assert str(tmp_path / "r" / LOCK_FILE) in err and "Traceback" not in err
    t.fit()
    assert not (tmp_path / "r" / "checkpoints").exists() and (tmp_path / "r" / "model.safetensors").is_file()
    code = ("import sys; from pathlib import Path; from emma_mamba.training.trainer import _lock_output_dir; "
            f"_lock_output_dir(Path({str(tmp_path / 'r')!r})); print('locked')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "locked" in r.stdout, r.stderr  # released when the run ended


def _send_signal_during(monkeypatch, step: int, sig=signal.SIGTERM, times: int = 1):
    """A real signal to this process while optimizer step ``step`` runs (as a scheduler or a terminal sends it)."""
    orig = Trainer.train_step

    def train_step(self, mbs):
        if self.global_step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return orig(self, mbs)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.fixture
def terminal_signals():
    """The main thread (where signal handlers are installed) with SIGINT as a terminal's process has it: a pytest
    started as a background job has SIGINT ignored, which the trainer then leaves ignored (as Python does)."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # the signal would end this test process
        pytest.skip("signal handlers are installed from the main thread only")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig,code,said", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
@pytest.mark.parametrize("every", [0, 3])
def test_a_stop_signal_checkpoints_the_step_in_progress_then_stops(shapes, tmp_path, monkeypatch, every, sig, code,
                                                                   said, terminal_signals):
    """SIGTERM killed the run at once, losing every step since the last checkpoint, and so did Ctrl-C (with
    the default ``checkpoint.every_steps: 0``, the whole run). Now the step in progress finishes, is checkpointed
    (also with checkpoints off, or between two), and the run stops with exit code 143 / 130; --resume auto then
    continues exactly as the uninterrupted run (the oracle: the same run without the signal)."""
    data = subset(shapes, tmp_path, 6)
    kw = dict(train={"max_steps": 5}, checkpoint={"every_steps": every})
    whole = Trainer(make_cfg(shapes, tmp_path / "whole", data, **kw)).fit()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _send_signal_during(monkeypatch, 2, sig)
    with pytest.raises(TrainingInterrupted) as e:
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit()
    monkeypatch.undo()
    assert e.value.exit_code == code
    assert str(e.value).startswith(f"stopped by {said} after step 2 of 5. The last checkpoint is ")
    assert (tmp_path / "r" / "checkpoints" / "step_00000002" / "trainer_state.pt").is_file()
    # the handlers are the trainer's only while it runs
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before
    rest = Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto").fit()
    assert [m["step"] for m in rest] == [3, 4, 5]
    assert [m["loss"] for m in rest] == [m["loss"] for m in whole[2:]]


def test_a_second_ctrl_c_stops_at_once(shapes, tmp_path, monkeypatch, terminal_signals):
    """The first Ctrl-C asks for a stop after the step; a second one (a user who cannot wait) stops at once,
    without finishing the step or writing a checkpoint of it."""
    data = subset(shapes, tmp_path, 6)
    _send_signal_during(monkeypatch, 2, signal.SIGINT, times=2)
    with pytest.raises(TrainingInterrupted) as e:
        Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 5})).fit()
    assert e.value.exit_code == 130
    assert str(e.value) == "interrupted at step 1 of 5. No checkpoint was written (checkpoint.every_steps sets how often)."
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("torchrun,window,signals,at_once", [
    (True, 5.0, (signal.SIGTERM, signal.SIGTERM), False),  # the scheduler's SIGTERM, then torchrun's
    (True, 0.0, (signal.SIGTERM, signal.SIGTERM), True),  # one after the window: a second stop
    (True, 5.0, (signal.SIGTERM, signal.SIGINT), True),  # another signal: a second stop
    (False, 5.0, (signal.SIGTERM, signal.SIGTERM), True)])  # one process: the second stops at once
def test_a_repeated_sigterm_under_torchrun_is_one_stop(shapes, tmp_path, monkeypatch, caplog, torchrun, window,
                                                       signals, at_once, terminal_signals):
    """A scheduler (Slurm's cgroup proctrack, a systemd control group) sends SIGTERM to every process of the job,
    and torchrun passes its own SIGTERM on to its workers a moment later: the second one stopped the run at once,
    losing the checkpoint of the step in progress, depending on timing. Under torchrun (TORCHELASTIC_RUN_ID set)
    the same signal again within SAME_STOP_S of the first is that stop passed on twice (logged at debug level);
    a later one, or another signal, stops at once, as the second signal always does in one process."""
    import logging

    data = subset(shapes, tmp_path, 6)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(trainer_mod, "SAME_STOP_S", window, raising=False)
    orig = Trainer.train_step

    def train_step(self, mbs):
        if self.global_step + 1 == 2:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return orig(self, mbs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with caplog.at_level(logging.DEBUG, logger="emma_mamba.training.trainer"), \
            pytest.raises(TrainingInterrupted) as e:
        Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 5})).fit()
    if at_once:
        assert str(e.value).startswith("interrupted at step 1 of 5. No checkpoint was written")
        assert not (tmp_path / "r" / "checkpoints").exists()
    else:
        assert e.value.exit_code == 143 and str(e.value).startswith("stopped by SIGTERM after step 2 of 5. ")
        assert (tmp_path / "r" / "checkpoints" / "step_00000002" / "trainer_state.pt").is_file()
        assert re.search(r"SIGTERM again \d+\.\d\d s after the first: the same stop, passed on by torchrun",
                         caplog.text), caplog.text


def test_a_stop_during_a_validation_cuts_it_short_and_the_resume_validates_that_step(shapes, tmp_path, monkeypatch,
                                                                                     terminal_signals):
    """In one process a Ctrl-C during a (long) validation stops at once, with a checkpoint of the step it was
    validating, instead of finishing it first (a scheduler's grace period can run out before the checkpoint); the
    resumed run validates that step first, so its metrics.jsonl holds every validation record of the uninterrupted
    run (the oracle), with the same values, and the same losses. Also a stop landing between a step's checkpoint
    and its validation (a kill there) gets its validation back on resume."""
    import json

    data = subset(shapes, tmp_path, 6)
    val = subset(shapes, tmp_path, 3, name="val.json")
    kw = dict(train={"max_steps": 4}, val={"json": str(val), "image_folder": str(shapes / "images"),
                                           "every_steps": 2, "micro_batch_size": 1})
    whole = Trainer(make_cfg(shapes, tmp_path / "whole", data, **kw)).fit()
    batches = []
    real = Trainer._usable

    def usable(self, b, ds, skipped=None):
        if ds is self.val_dataset and self.global_step == 2:
            batches.append(b)
            if len(batches) == 1:
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, b, ds, skipped)

    monkeypatch.setattr(Trainer, "_usable", usable)
    t = Trainer(make_cfg(shapes, tmp_path / "r", data, **kw))
    with pytest.raises(TrainingInterrupted) as e:
        t.fit()
    monkeypatch.undo()
    assert str(e.value).startswith("stopped by Ctrl-C after step 2 of 4. ") and e.value.exit_code == 130
    assert len(batches) == 1 and t.val_history == []  # cut short after its first batch of 3
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_00000002"]
    rest = Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto").fit()
    assert [m["loss"] for m in rest] == [m["loss"] for m in whole[2:]]

    def records(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def vals(run):
        return [(r["step"], r["epoch"], r["val_lm_loss"], r["val_align_loss"], r["val_token_acc"])
                for r in records(run) if "val_loss" in r]

    assert [v[0] for v in vals("whole")] == [2, 4] and vals("r") == vals("whole")
    # a stop after step 2's checkpoint, before its validation ran (as a kill there leaves it), and again a
    # completed validation of that step: the resume validates step 2 once, never twice
    for drop in (True, False):
        lines = [r for r in records("whole") if r["step"] <= 2 and not (drop and "val_loss" in r)]
        (tmp_path / "r" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume=str(tmp_path / "r" / "checkpoints" /
                                                                        "step_00000002")).fit()
        assert vals("r") == vals("whole")


_CTRL_C_CHILD = """
import multiprocessing, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background pytest ignores it)
multiprocessing.set_start_method("spawn")  # workers that do not inherit the trainer's handler (Python 3.14's
from emma_mamba.cli import main            # default, forkserver, neither)
sys.exit(main(["finetune", "--config", sys.argv[1]]))
"""

# imported by every Python process of the child's tree (the loader's spawned workers too): slow image decoding,
# so that the training process is waiting for its next micro-batch when the Ctrl-C comes, as a data-bound run is
_SLOW_IMAGES = """
import time
from emma_mamba.data.llava import LlavaDataset
_real = LlavaDataset.load_images
def _slow(self, s):
    time.sleep(0.2)
    return _real(self, s)
LlavaDataset.load_images = _slow
"""


def test_ctrl_c_at_a_terminal_also_reaching_the_loader_workers_checkpoints_and_stops(shapes, tmp_path):
    """A terminal's Ctrl-C goes to every process of its foreground group: the data-loader workers too, where it
    ended the worker and the training process then failed the step it was finishing ("DataLoader worker exited
    unexpectedly") when it was waiting for the worker's next micro-batch, as a data-bound run mostly is. The
    workers leave it to the training process: SIGINT to the whole process group (a new session, as a terminal's
    job) after the first logged step ends the run with a checkpoint and exit 130."""
    import time

    data = subset(shapes, tmp_path, 24)
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 12}, data={"num_workers": 1},
                   log={"every_steps": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_IMAGES)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-c", _CTRL_C_CHILD, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Ctrl-C: stopping after the step in progress" in err and "Traceback" not in err, err
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"stopped by Ctrl-C after step {step} of 12" in err, err
    assert step < 12 and (tmp_path / "r" / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt").is_file()


def test_a_failing_validation_keeps_the_checkpoint_of_its_step(shapes, tmp_path):
    """The validation of a step ran before its checkpoint: a held-out image that cannot be read (first decoded at
    the first validation) stopped the run with no checkpoint of the steps done. The checkpoint comes first."""
    data = subset(shapes, tmp_path, 4)
    records = json.loads((shapes / "train" / "stage2_instruct.json").read_text())[10:12]
    images = tmp_path / "val_images"
    images.mkdir()
    for r in records:
        src = shapes / "images" / r["image"]
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (images / r["image"]).write_bytes(src.read_bytes()[:100])  # a truncated PNG
    val = tmp_path / "val.json"
    val.write_text(json.dumps(records))
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 4}, checkpoint={"every_steps": 2},
                   val={"json": str(val), "image_folder": str(images), "every_steps": 2})
    with pytest.raises(DataError):
        Trainer(cfg).fit()
    assert (tmp_path / "r" / "checkpoints" / "step_00000002" / "trainer_state.pt").is_file()


def test_a_data_error_checkpoints_the_steps_done_and_the_resume_loses_none(shapes, tmp_path, caplog):
    """An unreadable training image met at step 3 (checkpoint.every_steps 0, the default) threw away the two
    steps done: "No checkpoint was written". The state at a data error is a finished step's, so it is
    checkpointed before the error is raised; the image fixed, --resume auto continues from step 2 and ends as the
    run without the error (the oracle: the same run, uninterrupted). The image error is raised where the loader
    reads step 3's images."""
    import logging

    data = subset(shapes, tmp_path, 6)
    kw = dict(train={"max_steps": 3})
    want = Trainer(make_cfg(shapes, tmp_path / "ref", data, **kw)).fit()
    t = Trainer(make_cfg(shapes, tmp_path / "r", data, **kw))
    real = t.dataset.load_images

    def load_images(sample):
        if t.global_step == 2:
            raise DataError("image x.png: cannot read image file", "corrupt_image")
        return real(sample)

    t.dataset.load_images = load_images
    with caplog.at_level(logging.INFO, logger="emma_mamba.training.trainer"), pytest.raises(DataError):
        t.fit()
    assert (tmp_path / "r" / "checkpoints" / "step_00000002" / "trainer_state.pt").is_file()
    assert "checkpointed step 2 before stopping" in caplog.text
    assert f"The last checkpoint is {tmp_path / 'r' / 'checkpoints' / 'step_00000002'}" in caplog.text
    rest = Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto").fit()
    assert [m["loss"] for m in rest] == pytest.approx([m["loss"] for m in want[2:]], rel=1e-6)


def test_a_new_run_does_not_silently_replace_an_earlier_runs_metrics(shapes, tmp_path, caplog):
    """A run stopped before its first checkpoint left only its metrics.jsonl; a new run into the folder wiped it
    without a word. Refused now, naming the file; --resume auto starts over and keeps it as metrics.jsonl.prev."""
    import logging

    data = subset(shapes, tmp_path, 4)
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 4}, log={"every_steps": 1})
    Trainer(cfg).fit(stop_after=2)
    old = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert [json.loads(x)["step"] for x in old.splitlines()] == [1, 2]
    with pytest.raises(FileExistsError, match="holds the metrics.jsonl of an earlier run that wrote no checkpoint"):
        Trainer(cfg)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == old
    with caplog.at_level(logging.WARNING, logger="emma_mamba.training.trainer"):
        Trainer(cfg, resume="auto").fit()
    assert "kept as metrics.jsonl.prev" in caplog.text
    assert (tmp_path / "r" / "metrics.jsonl.prev").read_text() == old
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_failed_checkpoint_write_names_the_last_checkpoint(shapes, tmp_path, monkeypatch):
    """A full disk during a checkpoint ended in an OSError traceback; now one TrainingError naming the step, the
    reason and the last complete checkpoint to resume from."""
    data = subset(shapes, tmp_path, 4)
    real = trainer_mod.save_checkpoint

    def save(output_dir, step, *a, **kw):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(output_dir, step, *a, **kw)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", save)
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    with pytest.raises(TrainingError) as e:
        Trainer(cfg).fit()
    msg = str(e.value)
    assert msg.startswith(f"writing the checkpoint of step 4 into {tmp_path / 'r'} failed (No space left on device)")
    assert f"The last checkpoint is {tmp_path / 'r' / 'checkpoints' / 'step_00000002'}" in msg


@pytest.mark.parametrize("writer,what", [("safetensors", "checkpoint"), ("torch.save", "checkpoint"),
                                         ("safetensors", "final model")])
def test_a_full_disk_is_one_error_naming_the_last_checkpoint(shapes, tmp_path, monkeypatch, writer, what):
    """A real full disk is no OSError: safetensors raises its SafetensorError and torch.save a RuntimeError, which
    escaped the one-line message (a traceback instead). Both are now the TrainingError naming the step, the reason
    and the last checkpoint, for a step checkpoint and the final model (the writers made to fail as they do on a
    full tmpfs)."""
    import safetensors
    import safetensors.torch
    import torch

    data = subset(shapes, tmp_path, 4)
    real_model, real_save = safetensors.torch.save_model, torch.save
    full = "step_00000004" if what == "checkpoint" else f"{tmp_path / 'r'}{os.sep}."  # the final model's temp file

    def save_model(model, filename, metadata=None):
        if writer == "safetensors" and full in str(filename):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error "
                                              "28)")
        return real_model(model, filename, metadata=metadata)

    def save(obj, f, *a, **kw):
        if writer == "torch.save" and full in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_model", save_model)
    monkeypatch.setattr(torch, "save", save)
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    with pytest.raises(TrainingError) as e:
        Trainer(cfg).fit()
    msg = str(e.value)
    said = {"checkpoint": f"writing the checkpoint of step 4 into {tmp_path / 'r'} failed (",
            "final model": f"writing the final model into {tmp_path / 'r'} failed after step 4 of 4 ("}[what]
    why = ("I/O error: No space left on device (os error 28))" if writer == "safetensors" else
           "writing trainer_state.pt failed ([enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0; ")
    assert msg.startswith(said + why), msg
    last = tmp_path / "r" / "checkpoints" / ("step_00000004" if what == "final model" else "step_00000002")
    assert "\n" not in msg and msg.endswith(f"The last checkpoint is {last} (--resume auto continues from it).")


def test_an_interrupted_final_write_leaves_no_half_model(shapes, tmp_path, monkeypatch):
    """Ctrl-C while the final model was written said 'interrupted before the first step' and left a half-size
    model.safetensors. The weights are now written whole or not at all, and the message says what happened;
    --resume auto writes the final model again."""
    import safetensors.torch

    data = subset(shapes, tmp_path, 4)
    kw = dict(train={"max_steps": 2}, checkpoint={"every_steps": 2})
    real = safetensors.torch.save_model

    def half_then_interrupt(model, filename, metadata=None):
        real(model, filename, metadata=metadata)
        if "checkpoints" in str(filename):  # the step checkpoint is written as usual; the final model is not
            return
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", half_then_interrupt)
    with pytest.raises(TrainingInterrupted, match=r"^interrupted while writing the final model after step 2 of 2"):
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit()
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if "safetensors" in p.name) == []
    Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto").fit()
    assert isinstance(emma_mamba.load(tmp_path / "r"), EmmaMamba)


@pytest.mark.parametrize("change", [{"train": {"seed": 1}}, {"data": {"packing": True}},
                                    {"data": {"max_length": 120}}])
def test_a_resume_that_would_reshuffle_the_epoch_is_refused(shapes, tmp_path, change):
    """The rest of the epoch's order depends on the seed, packing and max_length (plan_rows): resuming with another
    value trained some records twice and others never, silently. Now refused, naming both values."""
    data = subset(shapes, tmp_path, 6)
    base = dict(train={"max_steps": 4}, checkpoint={"every_steps": 2})
    Trainer(make_cfg(shapes, tmp_path / "r", data, **base)).fit(stop_after=2)
    kw = {k: {**base.get(k, {}), **v} for k, v in change.items()}
    (section, values), = change.items()
    (key, value), = values.items()
    with pytest.raises(ConfigError, match=rf"{section}\.{key} .* there, {value!r} here: the data order"):
        Trainer(make_cfg(shapes, tmp_path / "r", data, **{**base, **kw}), resume="auto")


def test_resuming_a_finished_run_says_nothing_is_left(shapes, tmp_path, caplog):
    data = subset(shapes, tmp_path, 4)
    kw = dict(train={"max_steps": 2}, checkpoint={"every_steps": 2})
    Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit()
    caplog.clear()  # the first run's lines (captured too where an earlier test set emma_mamba's level to INFO)
    with caplog.at_level("INFO", logger="emma_mamba.training.trainer"):
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto").fit()
    assert "resumed at step 2 of 2: no step is left to train" in caplog.text
    assert "no step this session" in caplog.text and "tokens/s" not in caplog.text
    assert isinstance(emma_mamba.load(tmp_path / "r"), EmmaMamba)


def test_a_folder_whose_filesystem_has_no_locks_is_not_refused(tmp_path, monkeypatch, caplog):
    """Some network mounts refuse flock (ENOLCK): that is no other run holding the folder; the run goes on with
    a warning that a second run would not be refused."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="emma_mamba.training.trainer"):
        trainer_mod._lock_output_dir(tmp_path)
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text
    assert str(tmp_path.resolve()) not in trainer_mod._held_locks
