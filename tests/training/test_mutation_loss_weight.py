"""The trainer's objective weights the alignment loss by ``align.loss_weight`` (trainer module doc:
``lm + align.loss_weight * align``), in the gradient it steps with and not only in the logged ``loss``.

Found by mutation testing: a backward of ``lm / n_lab + al / n_img`` (the weight dropped) passed every training
test, the gradient oracle's included, because the ``tiny`` preset they train has ``align.loss_weight`` 1.0.

Oracle: one record with an image, one step of one row (so the documented normalisation divides by that row's
answer tokens and its one image, i.e. the model's own mean losses). Before the step, the gradients of the model's
LM loss and of its pixel loss are taken separately with plain autograd on the trainer's own (initial) model and
combined by hand; the trainer's accumulated gradient (taken before clipping, which is off here) must be that
combination, and far from the unweighted one.
"""

from __future__ import annotations

import pytest
import torch

import emma_mamba.training.trainer as trainer_mod
from emma_mamba.data.llava import collate
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg, subset

WEIGHT = 0.25


def test_step_gradient_weights_the_alignment_loss(shapes, tmp_path, monkeypatch):
    data = subset(shapes, tmp_path, 1)
    cfg = make_cfg(shapes, tmp_path / "run", data,
                   train={"global_batch_size": 1, "micro_batch_size": 1, "max_steps": 1, "warmup_steps": 0,
                          "grad_clip": 0.0})
    cfg.model.align.loss_weight = WEIGHT
    t = Trainer(cfg)
    assert t.model.align_head is not None and t.model.config.align.loss_weight == WEIGHT
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    params = [p for n, p in t.model.named_parameters() if p.requires_grad]

    # the oracle, on the trainer's model before its step
    ds = t.dataset
    assert len(ds) == 1
    s = ds.samples[0]
    assert len(s.images) == 1
    b = collate([[(s, ds.load_images(s))]], t.model.tokenizer.pad_token_id, False, ds.N)
    inst = t.model.tokenize_instructions(b["instructions"])
    out = t.model(b["input_ids"], b["pixel_values"], b["labels"], inst, b["image_counts"],
                  labelled_logits_only=True)  # the forward the trainer runs

    def flat_grad(loss):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])

    g_lm, g_al = flat_grad(out.loss["lm"]), flat_grad(out.loss["align"])
    want = g_lm + WEIGHT * g_al
    unweighted = g_lm + g_al
    tol = 1e-5 * float(want.abs().max())
    assert float((unweighted - want).abs().max()) > 100 * tol  # the test can tell the two apart
    lm, align = float(out.loss["lm"].detach()), float(out.loss["align"].detach())
    del out

    seen, real = {}, trainer_mod.clip_grad_norm

    def clip(ps, max_norm):
        seen["grad"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                                  for p in params])
        return real(ps, max_norm)

    monkeypatch.setattr(trainer_mod, "clip_grad_norm", clip)
    hist = t.fit()
    assert len(hist) == 1
    got = seen["grad"]
    assert float((got - want).abs().max()) <= tol, names[0]
    m = hist[0]
    assert m["lm_loss"] == pytest.approx(lm, rel=1e-5)
    assert m["align_loss"] == pytest.approx(align, rel=1e-5)
    assert m["loss"] == pytest.approx(lm + WEIGHT * align, rel=1e-5)
