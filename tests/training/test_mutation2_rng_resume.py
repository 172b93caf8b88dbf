"""Mutation round 2: a training checkpoint restores this rank's RNG streams (checkpoint module doc:
``rng_rank{r}.pt``: python / numpy / torch RNG states). Oracle: the streams themselves: the numbers drawn right
after the save are drawn again after the load, whatever was drawn or seeded in between."""
from __future__ import annotations

import random

import numpy as np
import torch

from emma_mamba.config import get_preset
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training.checkpoint import load_checkpoint, save_checkpoint
from emma_mamba.training.parallel import DistInfo


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def test_load_checkpoint_restores_the_python_numpy_and_torch_rng_streams(tmp_path):
    torch.manual_seed(0)
    model = EmmaMamba(get_preset("tiny"), for_training=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    info = DistInfo()
    random.seed(123)
    np.random.seed(456)
    torch.manual_seed(789)
    _draw()  # the streams somewhere past their seeds
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {"epoch": 0, "step_in_epoch": 1, "global_step": 1},
                           None, info)
    want = _draw()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    assert _draw() != want
    load_checkpoint(path, model, opt, sched, info)
    assert _draw() == want
