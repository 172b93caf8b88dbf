"""What a resume refuses, in one line naming the keys and values, and what a run stops on, from a fault-injection
audit: another train.trainable (the optimizer state holds what the checkpoint trained: it failed inside torch's
loader with a KeyError), another train.lora.r (a traceback), a checkpoint's damaged config files (read as a config
mistake, or an empty model config as the default model), and a non-finite loss beside a finite gradient (the run
went on and wrote Infinity into metrics.jsonl). Also fit(stop_after=N) counts the steps of its own call."""

from __future__ import annotations

import pytest
import torch

from emma_mamba.config import ConfigError
from emma_mamba.training import TrainingError
from emma_mamba.training.trainer import Trainer

from .conftest import make_cfg, subset


@pytest.fixture()
def ckpt_run(shapes, tmp_path):
    """A finished 2-step finetune run with a checkpoint at step 2: (its data file, the checkpoint)."""
    data = subset(shapes, tmp_path, 4)
    Trainer(make_cfg(shapes, tmp_path / "r", data, checkpoint={"every_steps": 2})).fit()
    return data, tmp_path / "r" / "checkpoints" / "step_00000002"


def test_another_trainable_set_is_refused_naming_both(shapes, tmp_path, ckpt_run):
    data, ckpt = ckpt_run
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"trainable": ["mff", "instruction", "projector",
                                                                       "align_head"]})
    with pytest.raises(ConfigError, match=r"the checkpoint trained align_head, instruction, lm, mff, projector and "
                                          r"this run would train align_head, instruction, mff, projector \("
                                          r"train.trainable, the stage or model.vision.freeze changed\)"):
        Trainer(cfg, resume=str(ckpt))
    # the same set named explicitly is the same run
    same = make_cfg(shapes, tmp_path / "r", data, train={"trainable": ["lm", "mff", "instruction", "projector",
                                                                      "align_head"]})
    Trainer(same, resume=str(ckpt))


def test_the_modules_a_stage_trained_named_explicitly_resume(shapes, tmp_path):
    """Without instruction fusion the stage's default trains align_head, lm, mff, projector: a resume naming exactly
    those in train.trainable is the same run (the stage's list names a module this model has not)."""
    data = subset(shapes, tmp_path, 4)
    model = {"preset": "tiny", "instruction": {"enabled": False}}
    Trainer(make_cfg(shapes, tmp_path / "r", data, model=model, checkpoint={"every_steps": 2})).fit()
    same = make_cfg(shapes, tmp_path / "r", data, model=model,
                    train={"trainable": ["mff", "projector", "lm", "align_head"], "max_steps": 3})
    Trainer(same, resume=str(tmp_path / "r" / "checkpoints" / "step_00000002")).fit()


def test_an_unknown_key_in_a_checkpoints_config_is_named_not_called_damage(shapes, tmp_path, ckpt_run):
    data, ckpt = ckpt_run
    f = ckpt / "train_config.yaml"
    f.write_text(f.read_text() + "future_option: 1\n")
    with pytest.raises(TrainingError, match=r"train_config.yaml: .*future_option") as e:
        Trainer(make_cfg(shapes, tmp_path / "r", data), resume=str(ckpt))
    assert "corrupt" not in str(e.value)


def test_another_lora_rank_is_refused_naming_both(shapes, tmp_path):
    data = subset(shapes, tmp_path, 4)
    lora = {"r": 4, "targets": ["in_proj"]}
    Trainer(make_cfg(shapes, tmp_path / "r", data, checkpoint={"every_steps": 2},
                     train={"lora": lora})).fit()
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000002"
    cfg = make_cfg(shapes, tmp_path / "r", data, train={"lora": {**lora, "r": 8}})
    with pytest.raises(ConfigError, match=r"train.lora.r 4 there, 8 here"):
        Trainer(cfg, resume=str(ckpt))


@pytest.mark.parametrize("name,damage", [("train_config.yaml", ""), ("config.yaml", ""),
                                         ("config.yaml", "lm: {d_model: 64\n  n_layer: [")])
def test_a_damaged_config_file_names_the_checkpoint_and_the_others(shapes, tmp_path, name, damage):
    data = subset(shapes, tmp_path, 4)
    Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 4}, checkpoint={"every_steps": 2})).fit()
    newest = tmp_path / "r" / "checkpoints" / "step_00000004"
    (newest / name).write_text(damage)
    with pytest.raises(TrainingError, match=rf"{newest / name} cannot be read \(.*\): the checkpoint is incomplete "
                                            rf"or corrupt; the other checkpoints of this run: .*step_00000002"):
        Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 4}), resume=str(newest))


def test_a_loss_that_is_not_finite_stops_the_run_before_its_update(shapes, tmp_path, monkeypatch):
    """A detached inf added to the loss leaves the gradient finite: the run still stops before the update, naming
    the step (it trained on and logged "lm_loss": Infinity)."""
    from emma_mamba.models.vlm import EmmaMamba

    data = subset(shapes, tmp_path, 4)
    t = Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 3}))
    real = EmmaMamba.forward

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if t.global_step == 1 and out.loss is not None:
            out.loss["lm"] = out.loss["lm"] + torch.tensor(float("inf"))
        return out

    monkeypatch.setattr(EmmaMamba, "forward", forward)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    with pytest.raises(TrainingError, match=r"step 2: the loss \(inf lm, .* align\) or its gradient is not finite"):
        t.fit()
    assert t.global_step == 1
    monkeypatch.undo()
    after = dict(t.model.named_parameters())
    assert not all(torch.equal(after[n].detach(), v) for n, v in before.items())  # step 1 trained
    t2 = Trainer(make_cfg(shapes, tmp_path / "r2", data, train={"max_steps": 1}))
    t2.fit()
    assert all(torch.equal(after[n].detach(), p.detach()) for n, p in t2.model.named_parameters()
               if p.requires_grad)  # and step 2 changed nothing: the weights are step 1's


def test_fit_stop_after_counts_the_steps_of_its_own_call(shapes, tmp_path):
    data = subset(shapes, tmp_path, 8)
    t = Trainer(make_cfg(shapes, tmp_path / "r", data, train={"max_steps": 6}))
    steps = []
    for _ in range(3):
        t.fit(stop_after=2)
        steps.append(t.global_step)
    assert steps == [2, 4, 6]
