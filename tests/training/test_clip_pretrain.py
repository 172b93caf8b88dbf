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
