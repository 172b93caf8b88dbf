"""Stage 0 (contrastive CLIP pretraining): the loss against a hand computation, bad caption files, and a short
run that lowers the loss and whose checkpoint the model loads through vision.pretrained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.training.clip_pretrain import clip_loss, pretrain_clip, read_caption_pairs


def test_clip_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    scale = torch.tensor(math.log(2.0))
    # logits = 2 * img @ txt.T = [[0, 2], [1.6, 1.2]]
    logits = [[0.0, 2.0], [1.6, 1.2]]

    def ce(row, k):
        return -row[k] + math.log(sum(math.exp(v) for v in row))

    rows = ce(logits[0], 0) + ce(logits[1], 1)
    cols = ce([logits[0][0], logits[1][0]], 0) + ce([logits[0][1], logits[1][1]], 1)
    loss, acc = clip_loss(img, txt, scale)
    assert float(loss) == pytest.approx(0.5 * (rows / 2 + cols / 2), rel=1e-6)
    assert float(acc) == 0.0  # row 0 picks text 1, row 1 picks text 0
    # the temperature is clamped at 100, as CLIP's
    big, _ = clip_loss(img, txt, torch.tensor(10.0))
    ref, _ = clip_loss(img, txt, torch.tensor(math.log(100.0)))
    assert float(big) == pytest.approx(float(ref))


def test_bad_caption_files_name_the_record(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    good = {"id": "r0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                             {"from": "gpt", "value": "A red circle."}]}
    cases = [
        ({"id": "r1", "conversations": good["conversations"]}, r"record 1 \(id 'r1'\): needs an 'image' path"),
        ({"id": "r1", "image": "a.png", "conversations": good["conversations"][:1]}, r"record 1.*no assistant"),
        ({"id": "r1", "image": "missing.png", "conversations": good["conversations"]}, r"record 1.*missing\.png not found"),
    ]
    for bad, msg in cases:
        f = tmp_path / "c.json"
        f.write_text(json.dumps([good, bad]))
        with pytest.raises((ValueError, FileNotFoundError), match=msg):
            read_caption_pairs(f, tmp_path)
    f.write_text(json.dumps([good]))
    with pytest.raises(ValueError, match="at least 2 captioned images"):
        read_caption_pairs(f, tmp_path)
    with pytest.raises(FileNotFoundError, match="caption file not found"):
        read_caption_pairs(tmp_path / "nope.json", tmp_path)


def test_short_run_lowers_the_loss_and_the_model_loads_it(shapes, tmp_path):
    from emma_mamba.models.vlm import EmmaMamba

    cfg = get_preset("tiny")
    ckpt = tmp_path / "clip" / "open_clip.pt"
    res = pretrain_clip(cfg.vision, shapes / "train" / "stage1_captions.json", shapes / "images", ckpt,
                        steps=30, batch_size=8, lr=3e-3, warmup_steps=3, seed=0, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "clip" / "clip_metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and {"step", "loss", "i2t_acc", "lr", "temperature"} <= set(lines[0])
    first = sum(x["loss"] for x in lines[:5]) / 5
    last = sum(x["loss"] for x in lines[-5:]) / 5
    assert last < first - 0.2, (first, last)
    # the checkpoint is what a downloaded open_clip file would be: vision.pretrained loads both towers
    cfg.vision.pretrained = str(ckpt)
    model = EmmaMamba(cfg)
    state = torch.load(ckpt, weights_only=True)
    vis = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    for k, v in model.vision.visual.state_dict().items():
        assert torch.equal(v, vis[k]), k
    text_key = "token_embedding.weight"
    assert torch.equal(model.instruction.text_model.state_dict()[text_key], state[text_key])
    n_records = len(json.loads((shapes / "train" / "stage1_captions.json").read_text()))
    assert res["pairs"] == n_records and res["steps"] == 30 and res["checkpoint"] == str(ckpt)


def test_clip_loss_equals_open_clips_own():
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    for scale in (0.0, math.log(1 / 0.07), math.log(100.0)):
        s = torch.tensor(scale)
        ours, _ = clip_loss(img, txt, s)
        assert float(ours) == pytest.approx(float(ClipLoss()(img, txt, s.exp())), rel=1e-5)


def test_malformed_caption_records_are_named_not_a_traceback(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    good = {"id": "r0", "image": "a.png", "conversations": [{"from": "gpt", "value": "A red circle."}]}
    f = tmp_path / "c.json"
    for conv in ("A red circle.", ["A red circle."]):  # not a list of turns: used to be an AttributeError
        f.write_text(json.dumps([good, {"id": "r1", "image": "a.png", "conversations": conv}]))
        with pytest.raises(ValueError, match=r"record 1 \(id 'r1'\): no assistant"):
            read_caption_pairs(f, tmp_path)
    f.write_text(json.dumps([good])[:-1])  # a truncated file: used to be a JSONDecodeError without the file
    with pytest.raises(ValueError, match=r"c\.json: not a JSON file"):
        read_caption_pairs(f, tmp_path)


def test_quickstart_clip_section_values_are_checked(tmp_path):
    # they go straight to pretrain_clip and AdamW: `lr: 1e-3` (YAML text) used to end in a TypeError inside torch
    from emma_mamba.config import ConfigError
    from emma_mamba.quickstart import load_quickstart_config

    f = tmp_path / "q.yaml"
    for text, msg in [("lr: 1e", r"clip\.lr must be a number > 0, got '1e'"),
                      ("lr: 0", r"clip\.lr must be a number > 0, got 0"),
                      ("weight_decay: .nan", r"clip\.weight_decay must be a number >= 0, got nan"),
                      ("batch_size: 1", r"clip\.batch_size must be an integer >= 2, got 1"),
                      ("warmup_steps: 2.5", r"clip\.warmup_steps must be an integer >= 0, got 2\.5"),
                      ("batch_size: 8", None)]:
        f.write_text(f"clip: {{steps: {'ten' if msg is None else 3}, {text}}}\n")
        msg = msg or r"clip\.steps must be an integer >= 0, got 'ten'"
        with pytest.raises(ConfigError, match=msg):
            load_quickstart_config(f)
    f.write_text("clip: {steps: 3, batch_size: 8, lr: 1.0e-3, weight_decay: 0, warmup_steps: 1}\n")
    assert load_quickstart_config(f).clip["lr"] == 1e-3
    f.write_text("clip: {steps: 3, lr: 1e-3, weight_decay: 1e-2}\n")  # PyYAML's text: numbers, as in run configs
    assert load_quickstart_config(f).clip == {"steps": 3, "lr": 1e-3, "weight_decay": 1e-2}


def test_logged_lr_is_the_one_each_step_used(shapes, tmp_path, monkeypatch):
    # clip_metrics.jsonl's lr of step k is the lr AdamW applied in step k (the trainer's convention): by hand,
    # warmup 2 of 4 steps then cosine to 0, and against what the optimizer held at each step. It used to log
    # the scheduler's lr after its step, i.e. the next step's (the last step showed 0)
    used = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    pretrain_clip(get_preset("tiny").vision, shapes / "train" / "stage1_captions.json", shapes / "images",
                  tmp_path / "clip" / "open_clip.pt", steps=4, batch_size=4, lr=1e-3, warmup_steps=2, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "clip" / "clip_metrics.jsonl").read_text().splitlines()]
    want = [1e-3 * f for f in (0.5, 1.0, 1.0, 0.5)]
    assert used == pytest.approx(want)
    assert [x["lr"] for x in lines] == pytest.approx(want)


def test_the_temperature_parameter_is_clamped_as_open_clip_does(shapes, tmp_path, monkeypatch):
    # open_clip's training clamps logit_scale to [0, ln 100] after each update; the loss's cap alone gives no
    # gradient past ln 100, so a parameter that got there stayed (and the logged temperature read above 100)
    from emma_mamba.models import vision

    build = vision.build_open_clip

    def high(*a, **k):
        model, pp = build(*a, **k)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100.0) + 1.0)
        return model, pp

    monkeypatch.setattr(vision, "build_open_clip", high)
    ckpt = tmp_path / "clip" / "open_clip.pt"
    pretrain_clip(get_preset("tiny").vision, shapes / "train" / "stage1_captions.json", shapes / "images", ckpt,
                  steps=3, batch_size=4, lr=1e-2, warmup_steps=0, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "clip" / "clip_metrics.jsonl").read_text().splitlines()]
    assert all(x["temperature"] <= 100.0 * (1 + 1e-6) for x in lines)
    scale = float(torch.load(ckpt, weights_only=True)["logit_scale"])
    assert scale <= math.log(100.0) + 1e-6  # clamped (it started 1 above; nothing but the clamp lowers it)
