"""The documented total loss ``lm + align.loss_weight * align`` with a weight other than 1.

Found by mutation testing: ``EmmaMamba.forward`` returning ``total = lm + align`` (the weight ignored) passed every
model test, because the ``tiny`` preset they build has ``align.loss_weight`` 1.0. Oracle: the LM loss is the
token cross-entropy computed here from the logits and the expanded labels (the transformers convention, labels
shifted by one); the total is then combined by hand with the configured weight.
"""

from __future__ import annotations

import os

import pytest
import skimage
import torch
import torch.nn.functional as F

from emma_mamba.config import get_preset
from emma_mamba.models.vlm import EmmaMamba

IMAGE = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")


@pytest.mark.parametrize("weight", [0.25, 3.0, 0.0])
@torch.no_grad()
def test_total_loss_uses_the_configured_alignment_weight(weight):
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.align.loss_weight = weight
    model = EmmaMamba(cfg).eval()
    assert model.align_loss_on and model.config.align.loss_weight == weight
    tok = model.tokenizer
    ids = torch.tensor([tok.encode("<image>\nWhat is this? A man in a space suit.")])
    labels = ids.clone()
    labels[ids == model.image_token_id] = -100
    out = model(ids, model.image_processor([IMAGE]), labels, model.tokenize_instructions(["What is this?"]))

    logits = out.logits.float()
    lm_ref = F.cross_entropy(logits[0, :-1], out.labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss["lm"], lm_ref)
    align = out.loss["align"]
    assert float(align) > 0.1  # a fresh head is far from the targets: the weight visibly matters
    torch.testing.assert_close(out.loss["total"], lm_ref + weight * align, rtol=1e-6, atol=1e-6)
    if weight != 1.0:
        assert abs(float(out.loss["total"] - (lm_ref + align))) > 1e-3
