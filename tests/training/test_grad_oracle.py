"""The gradient of one optimizer step against an independent oracle, however the global batch is split.

Samples with very different numbers of answer (loss) tokens, and some without an image, make every wrong
normalisation visible: a mean of per-micro-batch or per-process mean losses weights tokens (and images)
unequally. The oracle runs each sample alone through a freshly built model with the trainer's init (batch of
one, no padding), takes the gradient of its summed token cross-entropy and of its pixel loss times its images
with plain autograd, and combines them with the weights of the documented objective (trainer module doc):
``sum CE / answer tokens of the global batch + align.loss_weight * sum pixel loss / images of the global batch``
(by linearity, the gradient of the full-batch loss). Checked against it, for one step of a global batch of 8:

* the gradient the trainer has after accumulation and all-reduce, before clipping, and after clipping (clipping
  is active: the norm is above ``train.grad_clip``; the oracle's gradient clipped as torch clips), for
  1 process x 8 rows, 1 x (1 row x 8 micro-batches), 1 x (4 x 2), and under torchrun (gloo, CPU) 2 processes x
  (4 x 1) and 2 x (1 x 4), plus 2 x (2 x 2) under FSDP (``slow``). The 2 x (1 x 4) split ends each process's step
  with a text-only micro-batch (the image branch unused in DDP's synchronising backward on every process);
* the logged ``lm_loss``, ``align_loss``, ``loss``, ``grad_norm`` and counts (global-batch values);
* the learning rate per optimizer step with accumulation (not per micro-batch);
* each process's micro-batches hold the global batch's samples, each once.

Tolerance: 1e-5 x the largest gradient entry (observed differences ~9e-8 of 0.18, fp32 summation order); after
clipping, plus 5e-5 of the clipped gradient for the clipping coefficient, which comes from the trainer's fp32 norm
(3.3M entries: ~1e-5 relative rounding, hence also rel 5e-5 on ``grad_norm``; the oracle's norm is taken in
fp64). Each test also checks that the usual mistakes (per-micro-batch or per-process means, clipping per
micro-batch) move the gradient far more than that, so the comparison can tell them apart.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

import emma_mamba.training.trainer as trainer_mod
from emma_mamba.data.llava import LlavaDataset, collate, plan_rows, steps_per_epoch
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training.config import run_config_to_dict
from emma_mamba.training.optim import lr_lambda
from emma_mamba.training.parallel import DistInfo
from emma_mamba.training.trainer import Trainer
from tests.conftest import tree_env
from tests.training.conftest import make_cfg

G = 8  # rows (= samples, padding) per optimizer step

TEXT_ONLY = [("Name a colour.", "Red."),
             ("Describe a square.", "A square has four equal sides and four right angles; its diagonals are equal."),
             ("How many sides has a triangle?", "Three sides."),
             ("Which shape has no corners?", "A circle: it has one curved side and no corners at all.")]


@pytest.fixture(scope="module")
def batch_data(shapes, tmp_path_factory):
    """A data file of 8 records (4 with an image, 4 text-only) laid out so that the step's global batch (the
    trainer's seeded plan) is, in order: image x 3, text | image, text x 3. So with 2 processes rank 0 has 3
    images and rank 1 one, and with one row per micro-batch both end on a text-only micro-batch."""
    recs = json.loads((shapes / "train" / "stage2_instruct.json").read_text())
    images = [recs[i] for i in (1, 0, 2, 4)]  # 25, 2, 4, 4 answer tokens (tiny tokenizer)
    texts = [{"id": f"text-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
             for i, (q, a) in enumerate(TEXT_ONLY)]
    wanted = images[:3] + texts[:1] + images[3:] + texts[1:]  # in global-batch order
    plan = plan_rows([1] * G, 0, 0, False, 96)  # padding: a permutation of the records (train.seed 0, epoch 0)
    records = [None] * G
    for j, (i,) in enumerate(plan):
        records[i] = wanted[j]
    path = tmp_path_factory.mktemp("grad_oracle") / "data.json"
    path.write_text(json.dumps(records))
    return path


def _cfg(shapes, out, data, mb, **train):
    return make_cfg(shapes, out, data, train={"global_batch_size": G, "micro_batch_size": mb, "max_steps": 1,
                                              "grad_clip": 1.0, **train})


@pytest.fixture(scope="module")
def oracle(shapes, batch_data, tmp_path_factory):
    """Per-sample gradients with plain autograd (see the module doc) and their global-batch combination."""
    cfg = _cfg(shapes, tmp_path_factory.mktemp("oracle_out"), batch_data, G)
    torch.manual_seed(cfg.train.seed)  # the trainer's init
    model = EmmaMamba(cfg.model, for_training=True).set_stage(cfg.stage, cfg.train.trainable).train()
    ds = LlavaDataset.for_model(cfg.data, model)
    assert len(ds) == G
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]

    def flat_grad(loss):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])

    per = []  # per sample: (answer tokens, images, CE sum, pixel loss x images, their gradients)
    for s in ds.samples:
        px = ds.load_images(s) if s.images else None
        b = collate([[(s, px)]], model.tokenizer.pad_token_id, False, ds.N)
        inst = model.tokenize_instructions(b["instructions"]) if px is not None else None
        out = model(b["input_ids"], b["pixel_values"], b["labels"], inst, b["image_counts"])
        target = out.labels[0, 1:]
        ce = F.cross_entropy(out.logits[0, :-1].float(), target, ignore_index=-100, reduction="sum")
        n_img = len(s.images)
        al = out.loss["align"] * n_img
        per.append(SimpleNamespace(id=s.id, tokens=int((target != -100).sum()), images=n_img, ce=float(ce.detach()),
                                   al=float(al.detach()), g_ce=flat_grad(ce),
                                   g_al=flat_grad(al) if n_img else torch.zeros(sum(p.numel() for p in params))))
    w = cfg.model.align.loss_weight
    assert w > 0 and model.align_head is not None

    def grad(group):
        """The objective's gradient over ``group`` (sample positions) as if it were the global batch."""
        n_lab = sum(per[i].tokens for i in group)
        n_img = max(1, sum(per[i].images for i in group))
        return sum(per[i].g_ce / n_lab + w * per[i].g_al / n_img for i in group)

    n_lab, n_img = sum(p.tokens for p in per), sum(p.images for p in per)
    lm, align = sum(p.ce for p in per) / n_lab, sum(p.al for p in per) / n_img
    g = grad(range(G))
    order = [i for (i,) in plan_rows(ds.lengths, cfg.train.seed, 0, False, cfg.data.max_length)][:G]
    return SimpleNamespace(cfg=cfg, names=names, params={n: p.detach().clone() for n, p in zip(names, params)},
                           per=per, grad=grad, g=g, norm=float(g.double().norm()), lm=lm, align=align,
                           loss=lm + w * align, n_lab=n_lab, n_img=n_img, order=order,
                           ids=[per[i].id for i in order])


def _flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def _clipped(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    return g * min(1.0, max_norm / (float(g.double().norm()) + 1e-6))  # as torch.nn.utils.clip_grad_norm_


def _tol(o) -> float:
    return 1e-5 * float(o.g.abs().max())


def _check_step(o, pre: dict, post: dict, m: dict, split: str) -> dict:
    """The trainer's gradients (before / after clipping) and logged values of a step against the oracle;
    returns the max abs differences (printed with -s)."""
    assert sorted(pre) == sorted(o.names), split  # the same trainable parameters got a gradient
    got_pre, got_post = _flat(pre, o.names), _flat(post, o.names)
    d_pre = float((got_pre - o.g).abs().max())
    want_post = _clipped(o.g, 1.0)
    d_post = float((got_post - want_post).abs().max())
    print(f"{split}: max |grad - oracle| {d_pre:.3g} before clipping, {d_post:.3g} after (max |g| "
          f"{float(o.g.abs().max()):.3g}, norm {o.norm:.4g})")
    assert d_pre <= _tol(o), (split, d_pre)
    # the clipping coefficient comes from the trainer's fp32 norm (rounded ~1e-5 relative over 3M entries)
    assert d_post <= _tol(o) + 5e-5 * float(want_post.abs().max()), (split, d_post)
    # clipped once, the whole step's gradient, by the logged (global) norm
    coef = min(1.0, 1.0 / (m["grad_norm"] + 1e-6))
    assert float((got_post - got_pre * coef).abs().max()) <= 1e-6 * float(got_pre.abs().max()), split
    assert m["grad_norm"] == pytest.approx(o.norm, rel=5e-5), split  # an fp32 norm of 3M entries: ~1e-5
    assert m["lm_loss"] == pytest.approx(o.lm, rel=1e-5), split
    assert m["align_loss"] == pytest.approx(o.align, rel=1e-5), split
    assert m["loss"] == pytest.approx(o.loss, rel=1e-5), split
    assert (m["label_tokens"], m["images"], m["samples"]) == (o.n_lab, o.n_img, G), split
    return {"pre": d_pre, "post": d_post}


def _groups(o, world: int, mb: int):
    """The global batch's positions per process and per micro-batch of a split (the documented layout)."""
    per_rank = G // world
    ranks = [o.order[r * per_rank:(r + 1) * per_rank] for r in range(world)]
    return ranks, [r[j:j + mb] for r in ranks for j in range(0, per_rank, mb)]


def _assert_mistakes_are_visible(o, world: int, mb: int):
    """Per-micro-batch means, per-process means and clipping each micro-batch's gradient all move this split's
    gradient by far more than the tolerance (so the test can tell them apart)."""
    ranks, mbs = _groups(o, world, mb)
    tol = _tol(o)
    wrong = {}
    if len(mbs) > 1:
        wrong["mean of micro-batch means"] = sum(o.grad(g) for g in mbs) / len(mbs) - o.g
        shares = [sum(o.per[i].g_ce / o.n_lab + o.cfg.model.align.loss_weight * o.per[i].g_al / o.n_img for i in g)
                  for g in mbs]
        wrong["clipped per micro-batch"] = sum(_clipped(s, 1.0) for s in shares) - _clipped(o.g, 1.0)
    if world > 1:
        wrong["mean of process means"] = sum(o.grad(r) for r in ranks) / world - o.g
    for what, d in wrong.items():
        print(f"  {what}: max |diff| {float(d.abs().max()):.3g}")
        assert float(d.abs().max()) > 100 * tol, what


def test_oracle_batch_has_unequal_token_and_image_counts(oracle):
    """The premise: answer-token counts differ by an order of magnitude, and processes / micro-batches get
    different numbers of images (a split that gave every part the same counts would hide a wrong mean)."""
    tokens = [p.tokens for p in oracle.per]
    print("answer tokens, images per sample in global-batch order:",
          [(oracle.per[i].tokens, oracle.per[i].images) for i in oracle.order])
    assert max(tokens) >= 10 * min(tokens), tokens
    ranks, _ = _groups(oracle, 2, 1)
    assert [sum(oracle.per[i].images for i in r) for r in ranks] == [3, 1]
    assert all(oracle.per[r[-1]].images == 0 for r in ranks)  # each process's last micro-batch: text only
    assert oracle.norm > 1.0  # so train.grad_clip 1.0 clips


@pytest.mark.parametrize("mb", [G, 1, 4])
def test_one_process_step_gradient_matches_the_full_batch_oracle(shapes, batch_data, oracle, tmp_path, monkeypatch,
                                                                 mb):
    """1 process, the global batch of 8 rows as 8 // mb micro-batches of mb rows: the accumulated gradient
    (before and after clipping), the logged losses and norm are the oracle's; with accumulation the learning
    rate follows the optimizer steps (3 steps, 2 of warmup)."""
    accum = G // mb
    cfg = _cfg(shapes, tmp_path / "run", batch_data, mb, max_steps=3 if accum > 1 else 1, warmup_steps=2)
    t = Trainer(cfg)
    assert t.accum == accum
    seen, real = {}, trainer_mod.clip_grad_norm

    def clip(params, max_norm):
        if not seen:  # the first step
            assert all(torch.equal(p, oracle.params[n]) for n, p in t.model.named_parameters()
                       if n in oracle.params)  # the oracle's model is the trainer's
            seen["pre"] = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None}
            norm = real(params, max_norm)
            seen["post"] = {n: p.grad.detach().clone() for n, p in t.model.named_parameters()
                            if p.grad is not None}
            return norm
        return real(params, max_norm)

    monkeypatch.setattr(trainer_mod, "clip_grad_norm", clip)
    hist = t.fit()
    _check_step(oracle, seen["pre"], seen["post"], hist[0], f"1 process x ({mb} rows x {accum} micro-batches)")
    _assert_mistakes_are_visible(oracle, 1, mb)
    # the schedule counts optimizer steps: with accumulation, one scheduler step per global batch
    total = t.total_steps
    assert t.scheduler.last_epoch == t.global_step == len(hist) == total
    assert [m["lr"] for m in hist] == pytest.approx([cfg.train.lr * lr_lambda(s, total, 2) for s in range(total)])


PROBE = r'''
import sys, torch, yaml
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import emma_mamba.training.trainer as tr
from emma_mamba.training.config import run_config_from_dict
from emma_mamba.training.parallel import destroy_distributed

real = tr.clip_grad_norm
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):  # one run after another in the same process group
    cfg = run_config_from_dict(yaml.safe_load(open(config).read()), source=config)
    t = tr.Trainer(cfg, device="cpu")
    seen, ids = {}, []

    def grads():
        return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                for n, p in t.model.named_parameters() if p.grad is not None}

    def clip(params, max_norm):
        seen["pre"] = grads()  # every process, the same collectives (FSDP)
        norm = real(params, max_norm)
        seen["post"] = grads()
        return norm

    step = t.train_step
    def train_step(mbs):
        ids.append([b["sample_ids"] for b in mbs])
        return step(mbs)

    tr.clip_grad_norm, t.train_step = clip, train_step
    hist = t.fit()
    tr.clip_grad_norm = real
    every = [None] * t.info.world_size
    dist.all_gather_object(every, ids)
    if t.info.is_main:
        torch.save({**seen, "history": hist, "ids": every, "world_size": t.info.world_size, "accum": t.accum,
                    "strategy": t.strategy}, out)
destroy_distributed()
'''


def _torchrun(tmp_path, runs, timeout=240):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = tree_env()
    args = [str(x) for pair in runs for x in pair]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]


@pytest.mark.parametrize("strategy,splits", [("ddp", [4, 1]), pytest.param("fsdp", [2], marks=pytest.mark.slow)])
def test_two_process_step_gradient_matches_the_full_batch_oracle(shapes, batch_data, oracle, tmp_path, strategy,
                                                                 splits):
    """torchrun, 2 CPU processes (gloo), each 4 rows of the global batch as 4 // mb micro-batches: the gradient
    every process steps with (all-reduced; under FSDP gathered from the shards), before and after clipping, the
    logged losses and norm are the oracle's; the processes' micro-batches hold the global batch, each sample
    once."""
    runs = []
    for mb in splits:
        cfg = _cfg(shapes, tmp_path / f"run{mb}", batch_data, mb)
        d = run_config_to_dict(cfg)
        d["parallel"]["strategy"] = strategy
        y = tmp_path / f"run{mb}.yaml"
        y.write_text(yaml.safe_dump(d))
        runs.append((y, tmp_path / f"run{mb}.pt"))
    _torchrun(tmp_path, runs)
    for mb, (_, out) in zip(splits, runs):
        r = torch.load(out, weights_only=False)
        assert (r["world_size"], r["accum"], r["strategy"]) == (2, 4 // mb, strategy)
        split = f"2 processes x ({mb} rows x {4 // mb} micro-batches), {strategy}"
        _check_step(oracle, r["pre"], r["post"], r["history"][0], split)
        _assert_mistakes_are_visible(oracle, 2, mb)
        # sharding: the processes' micro-batches hold the global batch, each sample once (which micro-batch holds
        # which sample is data.group_by_length's: test_every_split_covers_the_epoch_once... and test_trainer)
        (rank0,), (rank1,) = r["ids"]  # one step each
        assert len(rank0) == len(rank1) == 4 // mb
        assert sorted(ids for micro in rank0 + rank1 for ids in micro) == sorted(oracle.ids)


def _rank_micro_batches(n_rows: int, gbs: int, mb: int, world: int, step: int,
                        grouped: bool = False) -> list[list[list[int]]]:
    """Trainer._step_micro_batches of each rank for a plan of n_rows rows (row r is [r], of length (7 r) % 11)."""
    out = []
    for rank in range(world):
        t = Trainer.__new__(Trainer)  # only the fields the slicing reads
        t.rows_per_step, t.accum = gbs, gbs // (mb * world)
        t.cfg = SimpleNamespace(train=SimpleNamespace(micro_batch_size=mb),
                                data=SimpleNamespace(packing=False, group_by_length=grouped))
        t.dataset = SimpleNamespace(lengths=[(7 * r) % 11 for r in range(n_rows)])
        t.info = DistInfo(rank=rank, world_size=world)
        out.append(t._step_micro_batches([[r] for r in range(n_rows)], step))
    return out


@pytest.mark.parametrize("n_rows,gbs", [(16, 8), (19, 8), (5, 8), (8, 8)])
def test_every_split_covers_the_epoch_once_and_fills_only_the_last_step(n_rows, gbs):
    """An epoch of n_rows rows, global batch gbs, split over 1, 2 or 4 processes with micro-batches of 1, 2 or
    4 rows: every split steps through the same global batches; each rank gets accum micro-batches of exactly
    mb rows; over the epoch every row is seen once, and only when n_rows is not a multiple of gbs the last step
    is filled with the epoch's first rows (the documented wrap-around), each at most once more."""
    steps = steps_per_epoch(n_rows, gbs)
    fill = steps * gbs - n_rows
    reference = None
    for world in (1, 2, 4):
        for mb in (1, 2, 4):
            if gbs % (mb * world):
                continue
            seen = []
            for step in range(steps):
                ranks = _rank_micro_batches(n_rows, gbs, mb, world, step)
                assert all(len(r) == gbs // (mb * world) and all(len(m) == mb for m in r) for r in ranks)
                seen.append([row for r in ranks for m in r for (row,) in m])
            if reference is None:
                reference = seen
            assert seen == reference, (world, mb)  # the same global batches, in the same order
            flat = [row for s in seen for row in s]
            assert sorted(flat) == sorted(list(range(n_rows)) + [r % n_rows for r in range(fill)])
            assert [row for s in seen[:-1] for row in s] == list(range((steps - 1) * gbs))  # no early repeats
            # data.group_by_length: the same rows in each step, dealt to the micro-batches longest first
            for step in range(steps):
                ranks = _rank_micro_batches(n_rows, gbs, mb, world, step, grouped=True)
                assert all(len(r) == gbs // (mb * world) and all(len(m) == mb for m in r) for r in ranks)
                assert sorted(row for r in ranks for m in r for (row,) in m) == sorted(reference[step])
                lengths = [(7 * row) % 11 for k in range(len(ranks[0])) for r in ranks for (row,) in r[k]]
                assert lengths == sorted(lengths, reverse=True), (world, mb, step)
