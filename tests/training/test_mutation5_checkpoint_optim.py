"""Mutation round 5: training checkpoints, the optimizer and its schedule, and the run config's ranges.

Oracles: AdamW and the warmup + cosine schedule computed by hand (float64) from the documented formulas
(:mod:`emma_mamba.training.optim`); the RNG streams themselves (what is drawn after a save is drawn again after
the load); the documented layout and ranges (:mod:`emma_mamba.training.checkpoint`, ``RunConfig.validate``)."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from emma_mamba.config import ConfigError, get_preset
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training import TrainingError
from emma_mamba.training.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from emma_mamba.training.config import TrainConfig, run_config_from_dict
from emma_mamba.training.optim import build_optimizer, build_scheduler, param_groups
from emma_mamba.training.parallel import DistInfo

# ------------------------------------------------------------------------------------------ optimizer


class _Net(nn.Module):
    """A weight matrix (decayed), its bias and a LayerNorm (not decayed)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)


def _hand_lr(k: int, lr: float, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The documented schedule: linear warmup to lr (first update lr / warmup), then cosine to min_ratio * lr."""
    if k < warmup:
        return lr * (k + 1) / warmup
    if schedule == "constant":
        return lr
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))


@pytest.mark.parametrize("schedule, min_ratio", [("cosine", 0.25), ("constant", 0.0)])
def test_build_optimizer_and_scheduler_follow_a_hand_computed_adamw(schedule, min_ratio):
    """Guards against the config's lr, betas, eps, min_lr_ratio or schedule not reaching AdamW / the scheduler
    (torch's defaults, lr 1e-3 among them, silently used instead) and against decay on the wrong parameters."""
    torch.manual_seed(0)
    model = _Net().double()
    cfg = TrainConfig(lr=0.02, betas=[0.8, 0.9], eps=1e-4, weight_decay=0.3, warmup_steps=2, schedule=schedule,
                      min_lr_ratio=min_ratio)
    total = 6
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in ref.items()}
    v = {n: torch.zeros_like(p) for n, p in ref.items()}
    gen = torch.Generator().manual_seed(1)
    b1, b2 = 0.8, 0.9
    for k in range(total):
        lr = _hand_lr(k, 0.02, total, 2, schedule, min_ratio)
        for n, p in model.named_parameters():
            g = 1e-4 * torch.randn(p.shape, generator=gen, dtype=torch.float64)  # ~eps: eps matters
            p.grad = g.clone()
            wd = 0.3 if n == "proj.weight" else 0.0  # matrices only
            t = k + 1
            ref[n] = ref[n] * (1 - lr * wd)
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            ref[n] = ref[n] - lr * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + 1e-4)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12), k
        opt.step()
        sched.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-10, atol=1e-13, msg=f"{n} after update {k + 1}")


def test_warmup_steps_zero_means_no_warmup_whatever_the_ratio():
    """Guards against ``train.warmup_steps: 0`` being read as unset (falling back to warmup_ratio): the first
    update is then at the full lr, not at lr / ceil(ratio * total)."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(lr=1.0, warmup_steps=0, warmup_ratio=0.5, min_lr_ratio=0.0), 4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def test_decay_embeddings_false_exempts_the_lm_embedding_as_the_vlm_names_it():
    """Guards against the embedding exemption matching only a bare ``embeddings.weight`` (a MambaLM of its own),
    not ``lm.embeddings.weight`` inside the VLM, where train.decay_embeddings false would then do nothing."""
    root = nn.Module()
    root.lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=64, d_state=4))
    decay, no_decay = (set(g["names"]) for g in param_groups(root, 0.1, decay_embeddings=False))
    assert "lm.embeddings.weight" in no_decay and "lm.layers.0.mixer.in_proj.weight" in decay
    decay, no_decay = (set(g["names"]) for g in param_groups(root, 0.1, decay_embeddings=True))
    assert "lm.embeddings.weight" in decay


def test_a_declared_no_weight_decay_name_exempts_that_submodule_not_its_namesakes():
    """Guards against ``no_weight_decay()`` names matched as bare prefixes: exempting ``mixer`` must not exempt
    a sibling ``mixer2`` (nor ``pos`` a ``pos_proj``)."""

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4, 3))
            self.pos_proj = nn.Parameter(torch.zeros(3, 3))
            self.mixer = nn.Linear(3, 3, bias=False)
            self.mixer2 = nn.Linear(3, 3, bias=False)

        def no_weight_decay(self):
            return {"pos", "mixer"}

    decay, no_decay = (set(g["names"]) for g in param_groups(Tower(), 0.1))
    assert no_decay == {"pos", "mixer.weight"} and decay == {"pos_proj", "mixer2.weight"}


# ------------------------------------------------------------------------------------------ checkpoints


def _model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False)


def _save(tmp_path, step, model=None):
    model = model if model is not None else _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = save_checkpoint(tmp_path, step, model, opt, sched, {"epoch": 0, "step_in_epoch": step,
                                                                "global_step": step}, None, DistInfo())
    return path, model, opt, sched


def test_resume_auto_never_picks_a_tmp_write_even_one_holding_its_trainer_state(tmp_path):
    """Guards against the step_N pattern matching ``step_N.tmp``: a write interrupted after trainer_state.pt but
    before the rename (model or RNG files possibly partial) would be the newest checkpoint for --resume auto."""
    path, *_ = _save(tmp_path, 1)
    shutil.copytree(path, path.parent / "step_00000002.tmp")  # complete-looking, but never renamed
    assert latest_checkpoint(tmp_path) == path
    assert resolve_resume("auto", tmp_path) == path


def test_a_stale_tmp_directory_of_the_same_step_is_replaced_not_reused(tmp_path):
    """Guards against save_checkpoint not clearing ``step_N.tmp`` left by an interrupted write: the new write
    must succeed and the checkpoint hold none of the stale files."""
    stale = tmp_path / "checkpoints" / "step_00000001.tmp"
    stale.mkdir(parents=True)
    (stale / "leftover.bin").write_bytes(b"x")
    path, model, opt, sched = _save(tmp_path, 1)
    assert path.name == "step_00000001" and not (path / "leftover.bin").exists() and not stale.exists()
    load_checkpoint(path, model, opt, sched, DistInfo())


def test_numpys_cached_gaussian_is_restored(tmp_path):
    """Guards against the numpy RNG state losing its cached Gaussian (has_gauss / cached): after an odd number of
    randn draws the stream after the load would differ from the one after the save."""
    model = _model()
    np.random.seed(5)
    np.random.randn()  # legacy Box-Muller: the second value of the pair is now cached
    path, model, opt, sched = _save(tmp_path, 1, model)
    want = np.random.randn(3).tolist()
    np.random.seed(6)
    load_checkpoint(path, model, opt, sched, DistInfo())
    assert np.random.randn(3).tolist() == want


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_each_rank_restores_its_own_rng_and_an_added_rank_gets_a_stream_of_its_own(tmp_path):
    """Guards against a rank restoring rank 0's RNG file instead of its own, and against the ranks a resumed run
    adds all taking the same re-seeded stream (their random draws, e.g. dropout, would then be identical)."""
    path, model, opt, sched = _save(tmp_path, 1)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    from emma_mamba.training.checkpoint import rng_state

    torch.save(rng_state(), path / "rng_rank1.pt")  # what rank 1 of a 2-process run writes
    want1 = _draw()
    load_checkpoint(path, model, opt, sched, DistInfo(rank=1, world_size=2))
    assert _draw() == want1
    load_checkpoint(path, model, opt, sched, DistInfo())
    want0 = _draw()
    assert want0 != want1
    (path / "rng_rank1.pt").unlink()  # resumed by more processes than wrote it
    draws = []
    for rank in (1, 2):
        load_checkpoint(path, model, opt, sched, DistInfo(rank=rank, world_size=3))
        draws.append(_draw())
    assert len({repr(d) for d in [want0, *draws]}) == 3


def test_loading_into_a_model_of_another_shape_is_a_named_training_error(tmp_path):
    """Guards against the shape and key checks of a full checkpoint's load being dropped (torch's strict load
    then fails with a RuntimeError that names neither the checkpoint nor the run)."""
    path, *_ = _save(tmp_path, 1)
    for key, value, match in (("d_model", 32, r"\S+ has shape \(.*\) there, \(.*\) here"),
                              ("n_layer", 3, r"missing \['lm\.layers\.2\.")):
        cfg = get_preset("tiny")
        setattr(cfg.lm, key, value)
        other = EmmaMamba(cfg, for_training=False)
        opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        with pytest.raises(TrainingError, match=r"model\.safetensors does not match the model of this run: " + match):
            load_checkpoint(path, other, opt, sched, DistInfo())


# ------------------------------------------------------------------------------------------ run config

_BASE = {"stage": "pretrain", "output_dir": "runs/x", "model": "tiny", "data": {"json": "d.json"}}


def _cfg(**sections):
    return run_config_from_dict({**_BASE, **sections}, source="test")


@pytest.mark.parametrize("section, values", [
    ("train", {"min_lr_ratio": 1.0}), ("train", {"min_lr_ratio": 0.0}), ("train", {"warmup_ratio": 0.0}),
    ("train", {"warmup_steps": 0}), ("train", {"grad_clip": 0.0}), ("train", {"betas": [0.0, 0.0]}),
    ("checkpoint", {"keep_last": 0, "every_steps": 0}), ("train", {"global_batch_size": 1, "micro_batch_size": 1}),
])
def test_the_documented_edges_of_each_range_are_accepted(section, values):
    """Guards against an off-by-one in a range check refusing a documented value (min_lr_ratio in [0, 1],
    warmup_steps 0, grad_clip 0 = no clipping, keep_last 0 = keep all, ...)."""
    cfg = _cfg(**{section: values})
    assert all(getattr(getattr(cfg, section), k) == v for k, v in values.items())


@pytest.mark.parametrize("section, values, match", [
    ("train", {"min_lr_ratio": 1.01}, "min_lr_ratio must be in"), ("train", {"warmup_ratio": 1.0}, "warmup_ratio"),
    ("train", {"betas": [0.9, 1.0]}, "betas must be"), ("train", {"lr": 0.0}, "lr must be > 0"),
    ("train", {"warmup_steps": -1}, "warmup_steps must be >= 0"), ("train", {"micro_batch_size": 0}, "micro_batch"),
    ("train", {"eps": 0.0}, "eps must be > 0"), ("train", {"max_steps": 0, "epochs": 0.0}, "set max_steps > 0"),
    ("checkpoint", {"keep_last": -1}, "keep_last must be >= 0"),
])
def test_the_first_value_outside_each_range_is_refused(section, values, match):
    """Guards against an off-by-one in a range check letting through the first value outside it (a warmup as long
    as the run, beta2 = 1 freezing AdamW's second moment, lr 0, ...)."""
    with pytest.raises(ConfigError, match=match):
        _cfg(**{section: values})
