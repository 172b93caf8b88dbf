"""The same command under torchrun (2 CPU processes, gloo) gives the losses of a 1-process run with the same
global batch: DDP in the default run, FSDP2 (with a checkpoint, a resume and a single-process load) under slow.

Tolerance: rtol 1e-5 on losses and grad norms. The processes sum gradients in a different order than one
process accumulating micro-batches, so the updated weights differ in the last bits (observed ~1e-7 relative)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import emma_mamba
from emma_mamba.training.config import run_config_from_dict, run_config_to_dict
from emma_mamba.training.trainer import Trainer
from tests.conftest import tree_env
from tests.training.conftest import make_cfg, subset

KEYS = ("loss", "lm_loss", "align_loss", "grad_norm", "lr", "tokens", "samples")


def torchrun(args, nproc=2, timeout=240):
    env = tree_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "emma_mamba.cli", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def metrics(d, val=False):
    """The training records of a run's metrics.jsonl (val=True: its validation records)."""
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if ("val_loss" in r) == val]


def compare(got, want):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        for k in KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-5), (g["step"], k)


def _val_section(shapes, tmp_path):
    """5 held-out records, validated every 2 steps: with one row per forward one process runs 3 forwards, the
    other 2 and a zero-weight one."""
    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads((shapes / "train" / "stage2_instruct.json").read_text())[12:17]))
    return {"json": str(val), "image_folder": str(shapes / "images"), "every_steps": 2, "micro_batch_size": 1}


def compare_val(run_dir, tmp_path):
    """The validation records of a torchrun run against the 1-process run's (setup_run saved them)."""
    got, want = metrics(run_dir, val=True), json.loads((tmp_path / "ref_val.json").read_text())
    assert [v["step"] for v in got] == [v["step"] for v in want] == [2, 3]
    for g, w in zip(got, want):
        assert g["val_samples"] == 5 and g["val_label_tokens"] == w["val_label_tokens"]
        for k in ("val_lm_loss", "val_align_loss", "val_loss", "val_token_acc"):
            assert g[k] == pytest.approx(w[k], rel=1e-5), (g["step"], k)


def setup_run(shapes, tmp_path, **sections):
    """12 records (10 with an image, 2 text-only), 3 steps of 4 rows: every record is seen once, and the
    text-only ones form micro-batches that do not touch the vision bridge (DDP's unused parameters)."""
    data = subset(shapes, tmp_path, 10)
    records = json.loads(data.read_text())
    records += [{"id": f"text-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                for i, (q, a) in enumerate([("Name a colour.", "Red."), ("How many sides has a square?", "4")])]
    data.write_text(json.dumps(records))
    train = {"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 3, **sections.pop("train", {})}
    cfg = make_cfg(shapes, tmp_path / "ref", data, train=train, **sections)
    t = Trainer(cfg)
    ref = t.fit()  # one process: 4 micro-batches of 1 row per step
    (tmp_path / "ref_val.json").write_text(json.dumps(t.val_history))
    y = tmp_path / "run.yaml"
    d = run_config_to_dict(cfg)
    d["output_dir"] = str(tmp_path / "ddp")
    y.write_text(yaml.safe_dump(d))
    return y, ref


def test_torchrun_ddp_two_processes_match_one_process(shapes, tmp_path):
    """Also the validation loss (val.json) equals the 1-process run's, and with step 2 profiled (a trace per
    rank) the losses are the same."""
    y, ref = setup_run(shapes, tmp_path, val=_val_section(shapes, tmp_path))
    assert sum(m["samples"] for m in ref) == 12  # padding: one record per row, each seen once
    # two processes: 2 micro-batches of 1 row each per step
    r = torchrun(["finetune", "--config", str(y), "--profile.steps", "1", "--profile.start_step", "2"])
    assert "2 procs), ddp" in r.stderr
    compare(metrics(tmp_path / "ddp"), ref)
    assert sorted(p.name for p in (tmp_path / "ddp" / "profile").glob("*.json")) == ["rank0_steps2-2.json",
                                                                                      "rank1_steps2-2.json"]
    compare_val(tmp_path / "ddp", tmp_path)
    assert emma_mamba.load(tmp_path / "ddp").config.name == "tiny"


def test_resume_with_another_number_of_processes(shapes, tmp_path):
    """A job moved to another allocation: a 1-process run's checkpoint resumed by 2 DDP processes, and that run's
    checkpoint (written sharded: checkpoint.format) resumed by 1 process, continue the uninterrupted 1-process run
    (same data order and objective; the gradients are summed in another order, hence the tolerance of this
    file). The 2-process run writes its checkpoints in the background (checkpoint.async_save)."""
    y, ref = setup_run(shapes, tmp_path, checkpoint={"every_steps": 1})
    one = tmp_path / "ref" / "checkpoints" / "step_00000001"
    assert not (one / "rng_rank1.pt").exists()  # rank 1 takes rank 0's RNG state, re-seeded
    r = torchrun(["finetune", "--config", str(y), "--output_dir", str(tmp_path / "grown"), "--resume", str(one),
                  "--checkpoint.format", "sharded", "--checkpoint.async_save", "true"])  # written in the background
    assert "written by 1 process(es), with 2" in r.stderr
    compare(metrics(tmp_path / "grown"), ref[1:])
    two = tmp_path / "grown" / "checkpoints" / "step_00000002"
    assert (two / "rng_rank1.pt").exists() and (two / "state" / ".metadata").is_file()
    cfg = run_config_from_dict(yaml.safe_load(y.read_text()), source="test",
                               overrides={"output_dir": str(tmp_path / "shrunk")})
    rest = Trainer(cfg, resume=str(two)).fit()
    compare(rest, ref[2:])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["full", "sharded", "sharded-async"])
def test_torchrun_fsdp_matches_and_resumes(shapes, tmp_path, fmt):
    """checkpoint.format sharded: each rank writes its shards (nothing gathered); it resumes and loads as the
    gathered full layout does; also written in the background (checkpoint.async_save)."""
    ck = {"format": "sharded", "async_save": True} if fmt == "sharded-async" else {"format": fmt}
    fmt = fmt.split("-")[0]
    y, ref = setup_run(shapes, tmp_path, data={"packing": True}, val=_val_section(shapes, tmp_path),
                       checkpoint=ck)
    torchrun(["finetune", "--config", str(y), "--parallel.strategy", "fsdp", "--checkpoint.every_steps", "2"])
    compare(metrics(tmp_path / "ddp"), ref)
    compare_val(tmp_path / "ddp", tmp_path)  # validation under FSDP (packed rows)
    ckpt = tmp_path / "ddp" / "checkpoints" / "step_00000002"
    weights = {"model.safetensors"} if fmt == "full" else {"state"}
    assert {p.name for p in ckpt.iterdir()} >= {"config.yaml", "trainer_state.pt", "rng_rank0.pt", "rng_rank1.pt",
                                                 "train_config.yaml", *weights}
    if fmt == "sharded":  # one shard file per rank
        assert sorted(p.name for p in (ckpt / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    emma_mamba.load(ckpt)  # the whole state loads in one process
    resume_fsdp_checkpoint(y, ckpt, tmp_path, ref)


def resume_fsdp_checkpoint(y, ckpt, tmp_path, ref):
    """The step-2 FSDP checkpoint resumed by 2 FSDP processes, and by one process without FSDP (optimizer state
    keyed by parameter name): both continue the 1-process run."""
    torchrun(["finetune", "--config", str(y), "--parallel.strategy", "fsdp", "--output_dir",
              str(tmp_path / "res"), "--resume", str(ckpt)])
    compare(metrics(tmp_path / "res"), ref[2:])
    cfg = run_config_from_dict(yaml.safe_load(y.read_text()), source="test",
                               overrides={"output_dir": str(tmp_path / "one"), "parallel": {"strategy": "none"}})
    compare(Trainer(cfg, resume=str(ckpt)).fit(), ref[2:])


@pytest.mark.slow
@pytest.mark.parametrize("strategy,compiled", [("fsdp", False), ("fsdp", True), ("ddp", True)])
def test_torchrun_with_text_only_micro_batches_and_compiled_blocks(shapes, tmp_path, strategy, compiled):
    """Padding, one row per micro-batch: at step 2 one process has a text-only micro-batch while the other has
    an image (under FSDP this used to fail with a collective mismatch: the vision and alignment-head shard
    units ran on one process only). train.compile: compiled blocks inside DDP, compiled mixers under FSDP2.
    The losses of the eager 1-process run."""
    y, ref = setup_run(shapes, tmp_path)
    extra = ["--train.compile", "true", "--train.compile_backend", "aot_eager"] if compiled else []
    torchrun(["finetune", "--config", str(y), "--parallel.strategy", strategy, *extra], timeout=480)
    compare(metrics(tmp_path / "ddp"), ref)


LORA = {"lora": {"r": 4, "alpha": 8}}


def test_torchrun_ddp_with_lora_matches_one_process(shapes, tmp_path):
    """train.lora under DDP: the frozen LM weights are outside the reducer, the adapters are reduced."""
    y, ref = setup_run(shapes, tmp_path, train=LORA)
    torchrun(["finetune", "--config", str(y)])
    compare(metrics(tmp_path / "ddp"), ref)
    assert (tmp_path / "ddp" / "lora.safetensors").is_file()
    emma_mamba.load(tmp_path / "ddp")  # merged: a plain model


@pytest.mark.slow  # as the other FSDP runs (their length)
@pytest.mark.parametrize("base_dtype,fmt", [("fp32", "full"), ("bf16", "full"), ("bf16", "sharded")])
def test_torchrun_fsdp_with_lora_matches_and_resumes(shapes, tmp_path, base_dtype, fmt):
    """train.lora under FSDP2 (frozen and trained parameters in the same shard units; with a bf16 base, of two
    dtypes): the 1-process losses, a checkpoint gathered and merged on rank 0 (or written sharded, adapters
    apart), and its resume (the frozen weights gathered to be checked against the merged file) under FSDP and in
    one process."""
    y, ref = setup_run(shapes, tmp_path, train={"lora": {**LORA["lora"], "base_dtype": base_dtype}},
                       checkpoint={"format": fmt})
    torchrun(["finetune", "--config", str(y), "--parallel.strategy", "fsdp", "--checkpoint.every_steps", "2"])
    compare(metrics(tmp_path / "ddp"), ref)
    ckpt = tmp_path / "ddp" / "checkpoints" / "step_00000002"
    assert (ckpt / ("lora.safetensors" if fmt == "full" else "state")).exists()
    emma_mamba.load(ckpt)
    resume_fsdp_checkpoint(y, ckpt, tmp_path, ref)



FSDP_BF16_PROBE = r'''
import copy, json, sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from emma_mamba.config import get_preset
from emma_mamba.models import mamba as M
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training.parallel import (clip_grad_norm, destroy_distributed, init_distributed, sync_replicated_grads,
                                         wrap_model)

info = init_distributed("cpu")
torch.manual_seed(0)
model = EmmaMamba(get_preset("tiny"), for_training=True)
seen = {}
forward = M.MambaMixer.forward
def spy(self, *a, **k):  # the dtypes the mixer computes with
    seen.update(A_log=str(self.A_log.dtype), D=str(self.D.dtype), dt_bias=str(self.dt_proj.bias.dtype),
                in_proj=str(self.in_proj.weight.dtype))
    return forward(self, *a, **k)
M.MambaMixer.forward = spy
blocks_in, pixels_in = [], []
block_forward, vlm_forward = M.MambaBlock.forward, EmmaMamba.forward
def block_spy(self, x, *a, **k):  # the residual stream each block receives
    blocks_in.append(str(x.dtype))
    return block_forward(self, x, *a, **k)
def vlm_spy(self, *a, pixel_values=None, **k):  # the images the model (and its alignment targets) receive
    if pixel_values is not None:
        pixels_in.append(str(pixel_values.dtype))
    return vlm_forward(self, *a, pixel_values=pixel_values, **k)
M.MambaBlock.forward, EmmaMamba.forward = block_spy, vlm_spy
# a nearly flat image (a flat patch's targets are its pixels' small deviations, divided by their small spread):
# the one-process bf16 run's alignment loss, autocast, is the oracle for FSDP's
img = torch.tensor([model.tokenizer.encode("<image>\nWhat is it? A red square.")])
px = 0.3 + 0.01 * torch.rand(1, 3, *model.vision.image_size, generator=torch.Generator().manual_seed(7))
inst = model.tokenize_instructions(["What is it?"]) if model.instruction is not None else None
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    ref_align = float(copy.deepcopy(model)(input_ids=img, pixel_values=px, labels=img,
                                           instruction_ids=inst).loss["align"])
pixels_in.clear()
blocks_in.clear()
wrap_model(model, "fsdp", info, bf16=True)
torch.manual_seed(1 + info.rank)  # each process its own batch
ids = torch.randint(0, 100, (1, 12))
model(input_ids=ids, labels=ids).loss["lm"].backward()
n_layer = len(model.lm.layers)
text_blocks_in = blocks_in[:]
blocks_in.clear()
out = model(input_ids=img, pixel_values=px, labels=img, instruction_ids=inst)
(out.loss["lm"] + out.loss["align"]).backward()
sync_replicated_grads(model)
params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
def full(g):
    return g.full_tensor() if isinstance(g, DTensor) else g
def norm_by_hand():
    return float(sum(full(p.grad).double().pow(2).sum() for p in params) ** 0.5)
before = norm_by_hand()
got = float(clip_grad_norm(params, 0.5 * before))
A = model.lm.layers[0].mixer.A_log
grads = [torch.zeros_like(A.grad) for _ in range(2)]
dist.all_gather(grads, A.grad)
sys.stdout.write("PROBE " + json.dumps({"seen": seen, "norm": got, "by_hand": before, "after": norm_by_hand(),
                                        "A_log_grad_same_on_both": bool(torch.equal(*grads)),
                                        "A_log_sharded": isinstance(A, DTensor), "n_layer": n_layer,
                                        "blocks_in": blocks_in, "text_blocks_in": text_blocks_in,
                                        "pixels_in": pixels_in, "align": float(out.loss["align"]),
                                        "ref_align": ref_align}) + "\n")
sys.stdout.flush()  # one write per rank: print's two (text, end) interleave under PYTHONUNBUFFERED
# the commands' own teardown: dist.destroy_process_group() alone let a gloo worker thread release a Python
# tensor at interpreter exit, which aborted one run under load ("terminate called without an active exception")
destroy_distributed()
'''


def test_fsdp_bf16_keeps_the_ssm_parameters_fp32_and_whole(tmp_path):
    """Under FSDP with bf16 the SSM's A_log, D and dt bias reach the mixer in fp32 (the other weights in bf16),
    whole on every process; their gradients are averaged over the processes (the same on both) and the clipped
    norm is the global one over shards and whole tensors together (against the norm of every gathered gradient,
    by hand)."""
    script = tmp_path / "probe.py"
    script.write_text(FSDP_BF16_PROBE)
    env = tree_env()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = [json.loads(x.split("PROBE ", 1)[1]) for x in r.stdout.splitlines() if "PROBE " in x]
    assert len(rows) == 2
    for row in rows:
        assert row["seen"] == {"A_log": "torch.float32", "D": "torch.float32", "dt_bias": "torch.float32",
                               "in_proj": "torch.bfloat16"}
        assert not row["A_log_sharded"] and row["A_log_grad_same_on_both"]
        # the images reach the model (and the alignment targets) in fp32, and the residual stream every block after
        # the first in fp32 (residual_in_fp32): FSDP's default input cast rounded both to bf16
        assert row["pixels_in"] == ["torch.float32"]
        n = row["n_layer"]
        assert row["blocks_in"] == ["torch.bfloat16"] + ["torch.float32"] * (n - 1), row["blocks_in"]
        assert row["text_blocks_in"] == row["blocks_in"]
        assert row["align"] == pytest.approx(row["ref_align"], rel=1e-2)
        assert row["norm"] == pytest.approx(row["by_hand"], rel=1e-5)
        assert row["after"] == pytest.approx(0.5 * row["by_hand"], rel=1e-4)  # clipped to half
    assert rows[0]["norm"] == rows[1]["norm"]


def test_torchrun_counts_every_processs_truncated_instructions(shapes, tmp_path):
    """The end-of-run warning counted rank 0's truncated instructions only (2 under two processes where one
    process truncates 4): the count is the sum over the processes now. Oracle: the one-process run's count."""
    records = json.loads((shapes / "train" / "stage2_instruct.json").read_text())[:4]
    for r in records:  # every question too long for the text tower: each process truncates its share
        r["conversations"][0]["value"] += " Describe it in the words " + "and then some more " * 20
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    cfg = make_cfg(shapes, tmp_path / "one", data, data={"max_length": 400},
                   train={"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 1})
    t = Trainer(cfg)
    t.fit()
    assert t.model.instruction.num_truncated == 4  # the one-process count (what its end-of-run line says)
    d = run_config_to_dict(cfg)
    d["output_dir"] = str(tmp_path / "two")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(d))
    r = torchrun(["finetune", "--config", str(tmp_path / "run.yaml")])
    assert r.stderr.count("instruction fusion truncated 4 instructions to the text tower's context") == 1, \
        r.stderr[-3000:]
