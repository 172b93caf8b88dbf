"""What a resume says and counts: skipped records counted once across a resume (as the uninterrupted run counts
them), a finished run without checkpoints, a run folder or another stage's checkpoint given to --resume, and
incomplete checkpoints (named, with the run's other checkpoints)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from emma_mamba.config import ConfigError
from emma_mamba.training.checkpoint import resolve_resume
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg, subset


def _corrupt_image_data(shapes, tmp_path, n=4, bad=1):
    """The first n stage-2 records, record ``bad``'s image file not decodable (a copy of the image folder)."""
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    records = json.loads((shapes / "train" / "stage2_instruct.json").read_text())[:n]
    (images / records[bad]["image"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    return data, images


def _skipped_per_step(run):
    return [(m["step"], m["skipped_records"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "skipped_records" in m]


def test_a_resumed_run_counts_a_corrupt_image_once_as_the_uninterrupted_run_does(shapes, tmp_path):
    data, images = _corrupt_image_data(shapes, tmp_path)
    kw = dict(data={"image_folder": str(images), "on_error": "skip"}, train={"max_steps": 4},
              checkpoint={"every_steps": 2})
    a = Trainer(make_cfg(shapes, tmp_path / "a", data, **kw))
    a.fit()
    assert dict(a.dataset.report.skipped) == {"corrupt_image": 1} and a.dataset.report.samples == 3
    b = Trainer(make_cfg(shapes, tmp_path / "b", data, **kw))
    b.fit(stop_after=2)  # every epoch meets every record: the corrupt one is counted before the checkpoint
    assert b.dataset.report.samples == 3
    r = Trainer(make_cfg(shapes, tmp_path / "b", data, **kw), resume="auto")
    assert r.global_step == 2
    # at the resumed step the report is the one the run had there: counted once, and not as a used record
    # (was: samples 4, the record not known as counted)
    assert dict(r.dataset.report.skipped) == {"corrupt_image": 1} and r.dataset.report.samples == 3
    r.fit()  # meets the record again (was: counted again, corrupt_image 2)
    assert dict(r.dataset.report.skipped) == {"corrupt_image": 1}
    assert r.dataset.report.summary() == a.dataset.report.summary()
    assert _skipped_per_step(tmp_path / "b") == _skipped_per_step(tmp_path / "a") == [(s, 1) for s in (1, 2, 3, 4)]


def test_a_checkpoint_without_the_counted_records_still_resumes(shapes, tmp_path):
    # checkpoints of earlier versions have no failed_records entry: resumed with their counts, as before
    data, images = _corrupt_image_data(shapes, tmp_path)
    kw = dict(data={"image_folder": str(images), "on_error": "skip"}, train={"max_steps": 3},
              checkpoint={"every_steps": 2})
    Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit(stop_after=2)
    state_file = tmp_path / "r" / "checkpoints" / "step_00000002" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["failed_records"] == [[0, 1]]
    del state["failed_records"]
    torch.save(state, state_file)
    r = Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto")
    assert dict(r.dataset.report.skipped) == {"corrupt_image": 1}
    r.fit()


def test_resume_auto_on_a_finished_run_without_checkpoints_says_there_is_nothing_to_resume(shapes, tmp_path,
                                                                                            caplog):
    data = subset(shapes, tmp_path, 4)
    kw = dict(train={"max_steps": 1}, checkpoint={"every_steps": 0})
    Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit()
    assert (tmp_path / "r" / "model.safetensors").is_file() and not (tmp_path / "r" / "checkpoints").exists()
    with caplog.at_level(logging.INFO, logger="emma_mamba.training.checkpoint"):
        with pytest.raises(FileExistsError) as e:
            Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto")
    msg = str(e.value)
    # one message (was: "starting a fresh run", then "already holds a run ...; pass --resume auto to continue it")
    assert "holds a finished run" in msg and "nothing to resume" in msg and "another output_dir" in msg, msg
    assert "pass --resume auto" not in msg and "starting a fresh run" not in caplog.text
    with pytest.raises(FileExistsError) as e:  # without --resume: not told to pass --resume auto either
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw))
    assert "finished run" in str(e.value) and "--resume auto" not in str(e.value)


def test_resume_argument_names_what_it_was_given_instead_of_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (run / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt").write_bytes(b"")
    newest = run / "checkpoints" / "step_00000004"
    # the run's own folder: its newest checkpoint, or --resume auto (was: only "not a checkpoint directory")
    with pytest.raises(FileNotFoundError) as e:
        resolve_resume(str(run), run)
    assert f"it is a run's output_dir; pass its newest checkpoint, --resume {newest}, or --resume auto" in str(e.value)
    with pytest.raises(FileNotFoundError, match=rf"a run's checkpoints folder; pass its newest checkpoint, "
                                                rf"--resume {newest}, or --resume auto with output_dir {run}"):
        resolve_resume(str(run / "checkpoints"), tmp_path / "elsewhere")
    (newest / "trainer_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step_00000004: not a checkpoint directory .*incomplete .*the "
                                                r"other checkpoints of this run: .*step_00000002"):
        resolve_resume(str(newest), run)
    # a file of a checkpoint: its folder (was: "expected .../model.safetensors/trainer_state.pt")
    (run / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is a file; give its directory: .*step_00000002$"):
        resolve_resume(str(run / "checkpoints" / "step_00000002" / "model.safetensors"), run)
    # an empty folder keeps the plain message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a checkpoint directory \(expected .*trainer_state\.pt\)$"):
        resolve_resume(str(tmp_path / "empty"), run)


def test_a_stage1_checkpoint_given_to_a_stage2_run_is_named_before_anything_else(shapes, tmp_path, caplog):
    cap = subset(shapes, tmp_path, 4, stage=1)
    s1 = tmp_path / "s1"
    Trainer(make_cfg(shapes, s1, cap, stage="pretrain", train={"max_steps": 1, "weight_decay": 0.0},
                     checkpoint={"every_steps": 1})).fit()
    ckpt = s1 / "checkpoints" / "step_00000001"
    cfg = make_cfg(shapes, tmp_path / "s2", stage="finetune", init_from=str(s1), model=None,
                   train={"max_steps": 2})
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ConfigError) as e:
            Trainer(cfg, resume=str(ckpt))
    msg = str(e.value)
    assert msg.startswith(f"--resume {ckpt} is a stage-1 (pretrain) checkpoint") and "stage-2 (finetune) run" in msg
    assert f"init_from: {s1}" in msg, msg
    # said first: no weight-decay warning before it (was: that warning, then "missing ['align_head...']")
    assert "weight_decay" not in caplog.text and "align_head" not in msg
    # the same through --resume auto in the stage-1 run's own folder, and the other way round
    with pytest.raises(ConfigError, match=r"--resume auto: its newest checkpoint .* is a stage-1 \(pretrain\)"):
        resolve_resume("auto", s1, "finetune")
    s2 = tmp_path / "s2ckpt"
    s2.mkdir()
    (s2 / "trainer_state.pt").write_bytes(b"")
    (s2 / "train_config.yaml").write_text("stage: finetune\n")
    with pytest.raises(ConfigError, match=r"is a stage-2 \(finetune\) checkpoint .* stage-1 \(pretrain\) run.*"
                                          r"use `emma-mamba finetune`"):
        resolve_resume(str(s2), tmp_path, "pretrain")
    assert resolve_resume(str(ckpt), s1, "pretrain") == ckpt  # the same stage: resumed


def test_incomplete_checkpoints_are_named(shapes, tmp_path, caplog):
    data = subset(shapes, tmp_path, 4)
    kw = dict(train={"max_steps": 3}, checkpoint={"every_steps": 1})
    Trainer(make_cfg(shapes, tmp_path / "r", data, **kw)).fit(stop_after=3)
    ck = tmp_path / "r" / "checkpoints"
    (ck / "step_00000003" / "trainer_state.pt").unlink()
    # auto passes over it: said, naming it and why (was: silently resumed from step 2)
    with caplog.at_level(logging.WARNING, logger="emma_mamba.training.checkpoint"):
        t = Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto")
    assert t.global_step == 2
    assert f"incomplete checkpoint(s) {ck / 'step_00000003'} (no trainer_state.pt" in caplog.text
    assert f"resuming from {ck / 'step_00000002'}" in caplog.text
    # a missing RNG file: named with the run's other checkpoints, as every other file of a checkpoint is
    (ck / "step_00000002" / "rng_rank0.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step_00000002 has no rng_rank0\.pt: the checkpoint is incomplete; "
                                                r"the other checkpoints of this run: .*step_00000001"):
        Trainer(make_cfg(shapes, tmp_path / "r", data, **kw), resume="auto")
