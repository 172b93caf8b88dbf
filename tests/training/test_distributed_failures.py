"""What goes wrong on one process of a torchrun run (2 CPU processes, gloo) is met by all of them, in one line each
and without a hang: an output_dir that a rank cannot see (a node-local disk) is refused before training; a record
skipped by rank 1 (data.on_error: skip) is said by rank 1 and counted in the run's metrics, summary and
checkpoints; a data error on rank 1 (data.on_error: raise) stops every rank after a checkpoint of the steps done;
a process whose peer died says so in one line. Each process's error line names its rank."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from emma_mamba.data.llava import plan_rows
from emma_mamba.training import trainer as trainer_mod
from emma_mamba.training.config import run_config_from_dict, run_config_to_dict
from emma_mamba.training.parallel import DistInfo
from emma_mamba.training.trainer import Trainer
from tests.conftest import tree_env
from tests.training.conftest import make_cfg, subset


def torchrun_once(args, cwd, timeout=150, script=None):
    """torchrun with 2 processes in a session of its own, killed whole (SIGKILL) after ``timeout`` s: (returncode,
    stdout + stderr); returncode None when it hung."""
    entry = [str(script)] if script is not None else ["-m", "emma_mamba.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, *args]
    proc = subprocess.Popen(cmd, env=tree_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out + f"\n[HUNG: killed after {timeout} s]"


def write_yaml(cfg, path):
    path.write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    return path


def no_traceback(out: str) -> bool:
    """No rank printed a traceback: the only one is torchrun's own report of a failed process (the launcher's
    ChildFailedError; the workers' output is not prefixed by rank, so a worker's traceback is told by count)."""
    n = out.count("Traceback (most recent call last)")
    return n == 0 or (n == 1 and "ChildFailedError" in out.split("Traceback (most recent call last)")[1])


def cli_errors(out: str) -> dict:
    """rank -> the one-line error the command printed on it ("[rank N] emma-mamba finetune: ..."), one per rank."""
    errors = {}
    for line in out.splitlines():
        m = re.match(r"\[rank (\d)\] emma-mamba finetune: (.*)", line)
        if m:
            assert int(m.group(1)) not in errors, out[-6000:]
            errors[int(m.group(1))] = m.group(2)
    assert sorted(errors) == [0, 1], out[-6000:]
    return errors


def summary_errors(out: str) -> dict:
    """rank -> (error_file, traceback) of each failed process in torchrun's closing summary."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: [^\n]*\n\s*error_file: ([^\n]*)\n"
                       r"\s*traceback : ([^\n]*)", out)
    return {int(rank): (error_file.strip(), traceback.strip()) for rank, error_file, traceback in found}


# rank 1 runs in another folder: a relative output_dir is then another folder, as on another node's local disk
NODE_LOCAL = """
import os, sys
other = sys.argv.pop(1)
if os.environ["RANK"] == "1":
    os.chdir(other)
from emma_mamba.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_output_dir_a_rank_cannot_see_is_refused_on_every_rank(shapes, tmp_path):
    """With output_dir on a node-local disk, --resume auto resumed rank 0 at step 2 while rank 1, seeing an empty
    folder, started afresh: it trained its share of every step wrong, then hung at the next checkpoint. Rank 0
    resolves the resume point alone, every rank checks it sees the folder rank 0 prepared (a fresh run's too) and
    the checkpoint (--resume DIR on a node-local disk), and all refuse the run in one line naming rank 1 and the
    path, within seconds."""
    data = subset(shapes, tmp_path, 8)
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node1.mkdir()
    kw = dict(train={"global_batch_size": 4, "max_steps": 4}, checkpoint={"every_steps": 2})
    Trainer(make_cfg(shapes, node0 / "runs" / "r", data, **kw)).fit(stop_after=2)
    y = write_yaml(make_cfg(shapes, node0 / "runs" / "r", data, **kw), tmp_path / "run.yaml")
    script = tmp_path / "node_local.py"
    script.write_text(NODE_LOCAL)
    for args, said in [(["--output_dir", "runs/r", "--resume", "auto"],
                        f"rank 1 does not see the output_dir rank 0 prepared: runs/r (from {node1}) has no "
                        f".write_test_"),
                       (["--output_dir", str(node0 / "runs" / "r2"), "--resume", "runs/r/checkpoints/step_00000002"],
                        "rank 1 does not see the checkpoint rank 0 resumes from: no runs/r/checkpoints/step_00000002/"
                        f"trainer_state.pt (from {node1})")]:
        rc, out = torchrun_once([str(node1), "finetune", "--config", str(y), *args], cwd=node0, script=script)
        assert rc not in (0, None), out[-6000:]
        errors = cli_errors(out)  # each rank says it, in one line
        assert errors[0] == errors[1] and errors[0].startswith(said), out[-6000:]
        assert ": output_dir must be on a filesystem every process can read" in errors[0]
        assert no_traceback(out), out[-6000:]
    assert not (node0 / "runs" / "r" / "checkpoints" / "step_00000004").exists()
    assert not list((node0 / "runs" / "r").glob(".write_test_*"))  # the probe is removed


def image_read_by_rank1(tmp_path, cfg, step):
    """(the image file, its record's index) that rank 1 of 2 reads at ``step`` of ``cfg``'s run (epoch 0) and no
    rank reads at another step of it (``step`` 'val': in a validation); the run's plan, computed as the trainer
    does, in a trainer of its own folder."""
    t = Trainer(run_config_from_dict(run_config_to_dict(cfg), source="test",
                                     overrides={"output_dir": str(tmp_path / "plan")}))
    trainer_mod._unlock_output_dir(tmp_path / "plan")  # (never fit: the lock is given back here)
    if step == "val":  # Trainer.validate's order: fixed rows in chunks, chunk j to rank j % 2
        ds = t.val_dataset
        rows = plan_rows(ds.lengths, 0, 0, cfg.data.packing, cfg.data.max_length)
        s = ds.samples[rows[1][0]]  # rank 1's first chunk (val.micro_batch_size 1: one row each)
        return s.images[0], s.index
    t.accum = cfg.grad_accum(2)
    reads = {}  # (step, rank) -> samples

    for st in range(1, cfg.train.max_steps + 1):
        for rank in range(2):
            t.info = DistInfo(rank=rank, world_size=2)
            reads[st, rank] = [t.dataset.samples[i] for mb in t._step_micro_batches(t.epoch_rows(0), st - 1)
                               for row in mb for i in row]
    elsewhere = {p for k, v in reads.items() if k != (step, 1) for s in v for p in s.images}
    s = next(s for s in reads[step, 1] if len(s.images) == 1 and s.images[0] not in elsewhere)
    return s.images[0], s.index


def with_truncated_image(shapes, tmp_path, image):
    """A copy of the ShapesWorld images with ``image`` truncated (a corrupt PNG); returns the copy's folder."""
    folder = tmp_path / "images"
    shutil.copytree(shapes / "images", folder)
    bad = folder / image.relative_to(shapes / "images")
    bad.write_bytes(bad.read_bytes()[:100])
    return folder


def test_records_skipped_by_another_rank_are_said_and_counted(shapes, tmp_path):
    """data.on_error: skip with an image only rank 1 reads (truncated): rank 1 said nothing (its data warnings are
    quieted as repeats of rank 0's), metrics.jsonl's skipped_records and the end summary were rank 0's (none), and
    so were the checkpoint's skip counts. Rank 1 now says it (prefixed by its rank), each step's new skips ride
    on the step's all-reduce and every rank counts every rank's: the metric, the summary and the checkpoint
    (skipped, failed_records: what a resume counts once) hold it."""
    data = subset(shapes, tmp_path, 12)
    cfg = make_cfg(shapes, tmp_path / "ddp", data, train={"global_batch_size": 4, "max_steps": 3},
                   data={"on_error": "skip"}, checkpoint={"every_steps": 3}, log={"every_steps": 1})
    image, index = image_read_by_rank1(tmp_path, cfg, step=2)
    cfg.data.image_folder = str(with_truncated_image(shapes, tmp_path, image))
    rc, out = torchrun_once(["finetune", "--config", str(write_yaml(cfg, tmp_path / "run.yaml"))], cwd=tmp_path)
    assert rc == 0, out[-6000:]
    said = [line for line in out.splitlines() if "skipping" in line and image.name in line]
    assert len(said) == 1 and "[rank 1] WARNING" in said[0] and "[corrupt_image]" in said[0], out[-6000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_records"] for m in rows] == [0, 1, 1]
    assert "done: 3 steps; " in out and ": 11 of 12 records used; skipped 1 (corrupt_image: 1)" in out, out[-6000:]
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000003" / "trainer_state.pt", weights_only=True)
    assert state["skipped"] == {"corrupt_image": 1} and state["failed_records"] == [[0, index]]


def losses(run_dir):
    return [(m["step"], m["loss"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in m]


def test_a_data_error_on_one_rank_stops_every_rank_after_a_checkpoint(shapes, tmp_path):
    """An unreadable image of step 3 met by rank 1 (data.on_error: raise, no checkpoints asked for): rank 1 stopped,
    rank 0 waited in the step's collective until torchrun killed it, and the two steps done were lost (one process
    checkpoints them first). The error now rides on the step's first all-reduce, before any forward: every rank
    checkpoints step 2 together and stops, rank 1 with its error, rank 0 naming rank 1, one line each; the image
    fixed, --resume auto ends as the uninterrupted 1-process run (the oracle)."""
    data = subset(shapes, tmp_path, 12)
    kw = dict(train={"global_batch_size": 4, "max_steps": 3}, log={"every_steps": 1})
    ref = Trainer(make_cfg(shapes, tmp_path / "ref", data, **kw)).fit()
    cfg = make_cfg(shapes, tmp_path / "ddp", data, **kw)
    image, _ = image_read_by_rank1(tmp_path, cfg, step=3)
    cfg.data.image_folder = str(with_truncated_image(shapes, tmp_path, image))
    y = write_yaml(cfg, tmp_path / "run.yaml")
    rc, out = torchrun_once(["finetune", "--config", str(y)], cwd=tmp_path)
    assert rc not in (0, None), out[-6000:]
    errors = cli_errors(out)
    assert image.name in errors[1] and "cannot read image file" in errors[1], out[-6000:]
    assert errors[0] == "rank 1 met a data error in step 3 (its message above)", out[-6000:]
    assert no_traceback(out), out[-6000:]
    # torchrun's closing summary shows each process's error line (its error file), not "<N/A>" and a docs link
    summary = summary_errors(out)
    assert sorted(summary) == [0, 1], out[-6000:]
    for rank in (0, 1):
        error_file, said = summary[rank]
        assert error_file != "<N/A>" and said == f"[rank {rank}] emma-mamba finetune: {errors[rank]}", out[-6000:]
    ckpts = tmp_path / "ddp" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"], out[-6000:]
    assert (ckpts / "step_00000002" / "rng_rank1.pt").is_file()
    shutil.copy(image, Path(cfg.data.image_folder) / image.relative_to(shapes / "images"))  # the image fixed
    rc, out = torchrun_once(["finetune", "--config", str(y), "--resume", "auto"], cwd=tmp_path)
    assert rc == 0, out[-6000:]
    got, want = losses(tmp_path / "ddp"), [(m["step"], m["loss"]) for m in ref]
    assert [g[0] for g in got] == [w[0] for w in want] == [1, 2, 3]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-5)


def test_a_validation_data_error_on_one_rank_stops_every_rank_after_a_checkpoint(shapes, tmp_path):
    """The same for a held-out image only rank 1 validates: the error rides on the validation's all-reduce (rank 1
    runs as many forwards as the others until then), every rank checkpoints the step validated and stops."""
    data = subset(shapes, tmp_path, 8)
    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads((shapes / "train" / "stage2_instruct.json").read_text())[12:16]))
    cfg = make_cfg(shapes, tmp_path / "ddp", data, train={"global_batch_size": 4, "max_steps": 3},
                   val={"json": str(val), "image_folder": str(shapes / "images"), "every_steps": 2,
                        "micro_batch_size": 1})
    image, _ = image_read_by_rank1(tmp_path, cfg, step="val")
    cfg.data.image_folder = cfg.val.image_folder = str(with_truncated_image(shapes, tmp_path, image))
    rc, out = torchrun_once(["finetune", "--config", str(write_yaml(cfg, tmp_path / "run.yaml"))], cwd=tmp_path)
    assert rc not in (0, None), out[-6000:]
    errors = cli_errors(out)
    assert image.name in errors[1], out[-6000:]
    assert errors[0] == "rank 1 met a data error in the validation after step 2 (its message above)", out[-6000:]
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step_00000002"]


# rank 1 crashes at the start of step 2: no message, no goodbye to the process group
CRASH = """
import os, sys
from emma_mamba.training.trainer import Trainer
real = Trainer.train_step
def train_step(self, mbs):
    if self.info.rank == 1 and self.global_step == 1:
        os._exit(3)
    return real(self, mbs)
Trainer.train_step = train_step
from emma_mamba.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_process_that_lost_its_peer_says_so_in_one_line(shapes, tmp_path):
    """Rank 1 dies during step 2: rank 0's all-reduce failed with gloo's traceback ("Connection closed by peer"),
    burying the error of the process that stopped first. Now one line, prefixed by the rank as every error of the
    command under torchrun: another process stopped first, where this one stopped and the last checkpoint."""
    data = subset(shapes, tmp_path, 8)
    cfg = make_cfg(shapes, tmp_path / "ddp", data, train={"global_batch_size": 4, "max_steps": 3})
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    rc, out = torchrun_once(["finetune", "--config", str(write_yaml(cfg, tmp_path / "run.yaml"))], cwd=tmp_path,
                            script=script)
    assert rc not in (0, None), out[-6000:]
    said = [line for line in out.splitlines() if line.startswith("[rank 0] emma-mamba finetune: ")]
    assert len(said) == 1 and re.fullmatch(
        r"\[rank 0\] emma-mamba finetune: another process stopped first \(its error is above; here: [^;]*"
        r"Connection (closed|reset) by peer[^;]*\); stopped at step 1 of 3\. No checkpoint was written "
        r"\(checkpoint\.every_steps sets how often\)\.", said[0]), out[-6000:]
    assert no_traceback(out), out[-6000:]
    summary = summary_errors(out)  # rank 1 died without a word (os._exit): nothing recorded for it
    assert summary[0][1] == said[0] and summary[1][0] == "<N/A>", out[-6000:]
