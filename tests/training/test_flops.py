"""Model FLOPs of a training step (the tflops / mfu metrics): the count against torch's FlopCounterMode on a real
forward + backward of the tiny model (which sees every aten matmul, convolution and attention; our scan and conv
kernels are opaque to it, as they are left out of the count), the LM's share against a hand count from the
config, the metrics a run logs, and the peak table."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from emma_mamba.config import ConfigError, get_preset
from emma_mamba.models.vlm import EmmaMamba
from emma_mamba.training import flops as F
from emma_mamba.training.trainer import Trainer
from tests.training.conftest import make_cfg


def _measured(model, b=2, L=40):
    """FLOPs FlopCounterMode sees in one training forward + backward (the LM head at the labelled positions only, as
    the trainer runs it) of a batch of ``b`` rows of ``L`` ids, one image each; that batch's LM positions and
    predicted tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (b, L), generator=g)
    ids[:, 3] = model.image_token_id
    labels = ids.clone()
    labels[:, :5] = -100
    pix = torch.randn(b, 3, *model.vision.image_size, generator=g)
    inst = model.tokenize_instructions(["what is it"] * b) if model.instruction is not None else None
    with FlopCounterMode(display=False) as fc:
        model(ids, pixel_values=pix, labels=labels, instruction_ids=inst,
              labelled_logits_only=True).loss["total"].backward()
    return fc.get_total_flops(), b * (L - 1 + model.vision.num_tokens), b * (L - 5)


@pytest.mark.parametrize("case", ["finetune", "pretrain", "lora", "mamba2-no-instruction"])
def test_step_flops_match_what_torch_counts(case):
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    if case == "mamba2-no-instruction":
        cfg.lm.ssm_layer, cfg.lm.headdim, cfg.lm.d_state = "mamba2", 16, 16
        cfg.instruction.enabled = False
    model = EmmaMamba(cfg.validate(), for_training=True)
    model.set_stage("pretrain" if case == "pretrain" else "finetune")
    if case == "lora":
        from emma_mamba.models.lora import apply_lora

        apply_lora(model.lm, 4, 8.0)
    model.train()
    counted, tokens, predicted = _measured(model)
    got = F.StepFlops(model)(tokens, 2, predicted)
    assert math.isclose(got, counted, rel_tol=0.01), (got, counted)


def test_lm_share_by_hand():
    cfg = get_preset("tiny")  # d_model 64, 2 layers, d_state 8, expand 2, dt_rank ceil(64 / 16) = 4
    model = EmmaMamba(cfg, for_training=True, device="meta")
    E, d, N, R, V = 128, 64, 8, 4, 50280
    per_layer = d * 2 * E + E * (R + 2 * N) + R * E + E * d  # in_proj, x_proj, dt_proj, out_proj
    weights = 2 * per_layer + V * d  # + the head (the tied embedding)
    model.set_stage("finetune")
    assert F.lm_flops_per_position(model.lm) == 2 * weights * 3  # forward, input gradients, weight gradients
    model.set_stage("pretrain")  # the LM frozen: its input gradients still flow to the projector
    assert F.lm_flops_per_position(model.lm) == 2 * weights * 2
    from emma_mamba.info import report

    fl = report(get_preset("tiny"))["flops"]  # `emma-mamba info` prints these
    assert fl["finetune"]["per_lm_position"] == 2 * weights * 3 and fl["pretrain"]["per_lm_position"] == 2 * weights * 2
    assert fl["finetune"]["per_image"] > fl["pretrain"]["per_image"] > 0  # stage 2 also trains the alignment head
    # stage 1 never runs the head (the trainer builds its model without one): info counts what that model runs
    stage1 = EmmaMamba(get_preset("tiny"), for_training=False, device="meta")
    stage1.set_stage("pretrain")
    assert stage1.align_head is None and fl["pretrain"]["per_image"] == F.image_flops(stage1)


def test_a_run_logs_tflops_and_mfu(shapes, tmp_path, caplog):
    t = Trainer(make_cfg(shapes, tmp_path / "a", log={"peak_tflops": 0.5}))
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for m in rows:
        want = t.step_flops(m["tokens"], m["images"], m["label_tokens"]) / m["step_time"] / 1e12
        assert math.isclose(m["tflops"], want, rel_tol=1e-9) and m["tflops"] > 0
        assert math.isclose(m["mfu"], m["tflops"] / 0.5, rel_tol=1e-9)
    Trainer(make_cfg(shapes, tmp_path / "b")).fit()  # a CPU has no known peak: tflops only
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all("tflops" in m and "mfu" not in m for m in rows)
    import logging

    with caplog.at_level(logging.WARNING, logger="emma_mamba.training.trainer"):
        Trainer(make_cfg(shapes, tmp_path / "d", log={"peak_tflops": 1e-12})).fit()
    assert caplog.text.count("is above 1: the peak of 1e-12 TFLOPS per device") == 1  # once per run
    with pytest.raises(ConfigError, match="log.peak_tflops must be > 0"):
        make_cfg(shapes, tmp_path / "c", log={"peak_tflops": 0})


def test_peak_table(monkeypatch):
    cpu = torch.device("cpu")
    assert F.device_peak_tflops(cpu, True) is None and F.device_peak_tflops(cpu, True, 100.0) == 100.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = torch.device("cuda", 0)
    for name, bf16, want in [("NVIDIA H100 80GB HBM3", True, 989.0), ("NVIDIA H100 PCIe", True, 756.0),
                             ("NVIDIA H200", True, 989.0), ("NVIDIA A100-SXM4-80GB", False, 156.0),
                             ("NVIDIA L4", True, 121.0), ("NVIDIA L40S", True, 362.0),
                             ("NVIDIA GeForce RTX 3090", True, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert F.device_peak_tflops(gpu, bf16) == want, name
