"""A LoRA fine-tuning walkthrough's findings: settings that gave wrong or silent results (a NaN / zero alpha, a
target named twice, a refused call that left the LM frozen), a sharded checkpoint whose alpha was written to 6
digits (its merge read back another scaling), and a resume with another train.lora.alpha / base_dtype /
train_embeddings (a sharded checkpoint resumed with another alpha silently rescaled the trained adapters)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from emma_mamba.config import ConfigError
from emma_mamba.models.lora import LoRALinear, apply_lora, lora_modules
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.training.checkpoint import STATE_NAME
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg


def _lm():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64, d_state=4))


@pytest.mark.parametrize("r,alpha,targets,match", [
    (4, float("nan"), None, "alpha must be a finite number > 0"),  # was accepted: NaN logits
    (4, 0.0, None, "alpha must be a finite number > 0"),  # was accepted: an adapter that can never act
    (4, -8.0, None, "alpha must be a finite number > 0"),
    (2.5, 8.0, None, r"rank must be >= 1 \(a whole number\), got 2.5"),  # was a TypeError from torch.empty
    (0, 8.0, None, "rank must be >= 1"),  # was raised after the whole LM had been frozen
    (4, 8.0, ["in_proj", "in_proj"], "each named once"),  # was accepted: wrapped twice, one adapter lost
    (4, 8.0, "in_proj", r"got the string 'in_proj' \(write \['in_proj'\]\)"),  # was "got ['i', 'n', '_', ...]"
])
def test_bad_lora_settings_are_refused_and_leave_the_lm_as_it_was(r, alpha, targets, match):
    lm = _lm()
    before = copy.deepcopy(lm)
    with pytest.raises(ValueError, match=match):
        apply_lora(lm, r, alpha, targets)
    assert not lora_modules(lm)
    assert all(p.requires_grad for p in lm.parameters())  # nothing frozen by a refused call
    want = before.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in lm.state_dict().items())
    if not isinstance(targets, (list, str)):
        with pytest.raises(ValueError, match=match):
            LoRALinear(torch.nn.Linear(8, 8), r, alpha)


def test_one_adapter_per_target_and_the_hand_formula():
    """The oracle for what apply_lora builds: per wrapped projection W x + b + alpha / r * B A x, computed here in
    float64 from the module's own tensors, in eval mode with dropout set (dropout does not act in eval)."""
    lm = _lm().double()
    names = apply_lora(lm, 3, 7.0, ["in_proj", "out_proj"], dropout=0.3)
    assert len(names) == len(set(names)) == 2 * 2
    lm.eval()
    g = torch.Generator().manual_seed(1)
    for name, m in lora_modules(lm).items():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64))
        x = torch.randn(5, m.in_features, generator=g, dtype=torch.float64)
        want = x @ m.weight.T + (7.0 / 3) * (x @ m.lora_A.T) @ m.lora_B.T
        if m.bias is not None:
            want = want + m.bias
        torch.testing.assert_close(m(x), want, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def sharded_run(shapes, tmp_path_factory):
    """A LoRA run (alpha with more than 6 significant digits) stopped after its sharded step-1 checkpoint."""
    out = tmp_path_factory.mktemp("lora_walk") / "run"
    lora = {"r": 4, "alpha": 7.123456789, "targets": ["in_proj", "out_proj"]}
    kw = dict(train={"max_steps": 2, "lora": lora}, checkpoint={"every_steps": 1, "format": "sharded"})
    t = Trainer(make_cfg(shapes, out, **kw))
    t.fit(stop_after=1)
    return t, out, kw


def test_a_sharded_checkpoint_keeps_alpha_to_its_last_bit(sharded_run):
    """emma_mamba.load merges a sharded checkpoint's adapters with the alpha its state records: written with
    "%g" it was 7.12346, another scaling than the run's."""
    t, out, _ = sharded_run
    state = torch.load(out / "checkpoints" / "step_00000001" / STATE_NAME, map_location="cpu", weights_only=False)
    assert float(state["lora"]["alpha"]) == 7.123456789  # the config's value
    scaling = float(state["lora"]["alpha"]) / int(state["lora"]["r"])
    assert all(scaling == m.scaling == 7.123456789 / 4 for m in lora_modules(t.model.lm).values())


@pytest.mark.parametrize("change,match", [
    ({"alpha": 16}, r"train\.lora\.alpha 7\.123456789 there, 16\.0 here"),  # was resumed silently: scale x2.25
    ({"base_dtype": "bf16"}, r"train\.lora\.base_dtype 'fp32' there, 'bf16' here"),  # was silently rounded
    ({"train_embeddings": True}, r"train\.lora\.train_embeddings False there, True here"),  # was "corrupt"
])
def test_a_resume_with_other_adapter_settings_is_refused_naming_them(shapes, tmp_path, sharded_run, change, match):
    _, out, kw = sharded_run
    ckpt = out / "checkpoints" / "step_00000001"
    lora = {**kw["train"]["lora"], **change}
    with pytest.raises(ConfigError, match=match):
        Trainer(make_cfg(shapes, tmp_path / "r", train={**kw["train"], "lora": lora}, checkpoint=kw["checkpoint"]),
                resume=str(ckpt))


def test_a_resume_may_change_the_lora_dropout(shapes, tmp_path, sharded_run):
    """Dropout is noise on the adapters' input, no part of what the checkpoint holds: another value resumes (the
    adapters, their scaling and the frozen base are the checkpoint's)."""
    t, out, kw = sharded_run
    ckpt = out / "checkpoints" / "step_00000001"
    lora = {**kw["train"]["lora"], "dropout": 0.1}
    r = Trainer(make_cfg(shapes, tmp_path / "r", train={**kw["train"], "lora": lora}, checkpoint=kw["checkpoint"]),
                resume=str(ckpt))
    assert r.global_step == 1
    got, want = lora_modules(r.model.lm), lora_modules(t.model.lm)
    assert got.keys() == want.keys()
    for name, m in got.items():
        assert m.scaling == want[name].scaling and math.isclose(m.scaling, 7.123456789 / 4)
        assert m.weight.dtype == torch.float32
        for leaf in ("weight", "lora_A", "lora_B"):  # t stopped at the checkpoint's step
            assert torch.equal(getattr(m, leaf), getattr(want[name], leaf)), (name, leaf)
