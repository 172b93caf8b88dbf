"""Dual encoder (``vision.second_encoder``: a timm ViT beside the open_clip tower, as Cobra's DINOv2 + SigLIP):
taps against forward hooks on both towers' blocks with the second tower's input built by an independent
transform, the 2.8B preset's shapes against timm's own model, local weights (resampled position embeddings),
training / freezing / save-load of the assembled model, and the configuration errors."""

from __future__ import annotations

import os

import pytest
import skimage
import timm
import torch

import emma_mamba
from emma_mamba.config import ConfigError, SecondEncoderConfig, VisionConfig, get_preset
from emma_mamba.models.vision import ImageProcessor, VisionEncoder, build_open_clip, build_second_encoder
from emma_mamba.models.vlm import EmmaMamba
from tests.models.test_vision import _hooked_blocks

DATA = os.path.dirname(skimage.data.__file__)
IMAGES = [os.path.join(DATA, f) for f in ("astronaut.png", "chelsea.png")]
DINO = "vit_small_patch14_reg4_dinov2"  # 1 class + 4 register tokens before the patches
TINY_DINO = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 2}


def dual_cfg(**second):
    cfg = get_preset("tiny")  # open_clip tower: 32 px, 8 px patches, 3 blocks of width 32, taps [0, 1]
    cfg.vision.second_encoder = SecondEncoderConfig(timm_model=DINO, timm_kwargs=dict(TINY_DINO), taps=[2, -2])
    for k, v in second.items():
        setattr(cfg.vision.second_encoder, k, v)
    return cfg.validate()


def test_taps_are_both_towers_block_outputs_concatenated():
    torch.manual_seed(0)
    cfg = dual_cfg()
    clip, pp = build_open_clip(cfg.vision)
    dino, mean, std = build_second_encoder(cfg.vision.second_encoder)
    assert (mean, std) == (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)  # DINOv2's
    enc = VisionEncoder(clip.visual, cfg.vision, pp, dino, mean, std)
    assert enc.taps == [0, 1] and enc.second_taps == [1, 2] and enc.width == 32 + 24 and enc.grid == (4, 4)
    x = ImageProcessor(pp)(IMAGES)
    feats = enc(x)

    # Oracles: each tower's ordinary forward with hooks on its blocks; the second tower's input made by
    # open_clip's transform with DINOv2's own mean/std (not by the encoder's affine re-normalisation).
    x2 = ImageProcessor({**pp, "mean": mean, "std": std})(IMAGES)
    outs1 = _hooked_blocks(clip.visual.transformer.resblocks, lambda: clip.visual(x))
    outs2 = _hooked_blocks(dino.blocks, lambda: dino.forward_features(x2))
    assert dino.num_prefix_tokens == 5
    for k, f in enumerate(feats):
        assert f.shape == (2, 16, 56)
        torch.testing.assert_close(f[..., :32], outs1[enc.taps[k]][:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(f[..., 32:], outs2[enc.second_taps[k]][:, 5:], rtol=1e-5, atol=1e-5)


def test_the_paper_preset_matches_timm_and_open_clip_shapes(capsys):
    from emma_mamba.cli import main
    from emma_mamba.info import report

    cfg = get_preset("emma-mamba-2.8b-dinosiglip")
    m = EmmaMamba(cfg, device="meta")  # no weights, no tokenizer files
    v = m.vision
    assert (v.grid, v.num_tokens, v.width, v.image_size) == ((27, 27), 729, 1152 + 1024, (384, 384))
    assert v.taps == [6, 13, 19, 25] and v.second_taps == [5, 11, 17, 22]
    with torch.device("meta"):
        ref = timm.create_model("vit_large_patch14_reg4_dinov2", img_size=384, num_classes=0)
    n_ref = sum(p.numel() for p in ref.parameters())
    rows = report(cfg)["modules"]
    assert rows["vision.second_encoder"] == {"total": n_ref, "pretrain": 0, "finetune": 0}
    assert 300e6 < n_ref < 310e6  # DINOv2 ViT-L/14: ~304 M
    assert m.mff.width == 2176 and m.projector.mlp[0].in_features == 2176
    assert main(["info", "--preset", "emma-mamba-2.8b-dinosiglip"]) == 0
    assert "vit_large_patch14_reg4_dinov2 taps [5, 11, 17, 22] (concatenated, width 2176)" in capsys.readouterr().out


def test_local_weights_with_resampled_position_embeddings(tmp_path):
    # DINOv2's weights are 518 px (37 x 37 positions) and run at 384: timm's loader resamples them. Here a
    # 64 px (8 x 8) checkpoint is loaded into the 32 px (4 x 4) encoder.
    torch.manual_seed(1)
    big = timm.create_model(DINO, **{**TINY_DINO, "img_size": 64}, num_classes=0)
    path = tmp_path / "dino.pth"
    torch.save(big.state_dict(), path)
    torch.manual_seed(2)
    small, _, _ = build_second_encoder(SecondEncoderConfig(timm_model=DINO, timm_kwargs=TINY_DINO,
                                                           pretrained=str(path)))
    sd_big, sd_small = big.state_dict(), small.state_dict()
    assert sd_big.keys() == sd_small.keys()
    for k in sd_big:
        if k != "pos_embed":
            assert torch.equal(sd_big[k], sd_small[k]), k
    assert sd_big["pos_embed"].shape == (1, 64, 24) and sd_small["pos_embed"].shape == (1, 16, 24)
    # bilinear-style resampling of a smooth field keeps it: a constant position embedding stays constant
    with torch.no_grad():
        big.pos_embed.fill_(0.25)
    torch.save(big.state_dict(), path)
    small, _, _ = build_second_encoder(SecondEncoderConfig(timm_model=DINO, timm_kwargs=TINY_DINO,
                                                           pretrained=str(path)))
    torch.testing.assert_close(small.pos_embed, torch.full((1, 16, 24), 0.25))

    wrong = timm.create_model(DINO, **{**TINY_DINO, "embed_dim": 16}, num_classes=0)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match=r"second_encoder.pretrained: .*wrong.pth does not fit "
                                          r"vit_small_patch14_reg4_dinov2"):
        build_second_encoder(SecondEncoderConfig(timm_model=DINO, timm_kwargs=TINY_DINO,
                                                 pretrained=str(tmp_path / "wrong.pth")))
    for bad in ("lvd142m", str(tmp_path / "missing.pth")):  # a tag is not a file: refused, never downloaded
        with pytest.raises(ConfigError, match="second_encoder.pretrained: .* is not an existing file"):
            build_second_encoder(SecondEncoderConfig(timm_model=DINO, timm_kwargs=TINY_DINO, pretrained=bad))


def _batch(model):
    tok = model.tokenizer
    ids = torch.tensor([tok.encode("<image>\nWhat is this? A man in a space suit.")])
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    return dict(input_ids=ids, labels=labels, pixel_values=model.image_processor(IMAGES[:1]),
                instruction_ids=model.tokenize_instructions(["What is this?"]))


def test_training_freezing_and_save_load(tmp_path):
    torch.manual_seed(0)
    m = EmmaMamba(dual_cfg())
    second = m.vision.second
    # frozen (the default): no gradient, eval mode under model.train(), not trained in either stage
    m.set_stage("finetune").train()
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    m(**_batch(m)).loss["total"].backward()
    assert all(p.grad is None for p in second.parameters())
    assert m.mff.gate.grad is not None

    # unfrozen: the second tower trains with the LM in stage 2, also under gradient checkpointing
    cfg = dual_cfg()
    cfg.vision.freeze = False
    torch.manual_seed(0)
    m2 = EmmaMamba(cfg).set_stage("finetune").train()
    assert second.training is False and m2.vision.second.training
    with torch.no_grad():  # a non-zero MFF gate, so the taps reach the loss through the weighted mode
        m2.mff.gate.fill_(0.5)
    m2(**_batch(m2)).loss["total"].backward()
    grads = {n: p.grad.clone() for n, p in m2.vision.second.named_parameters() if p.grad is not None}
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    m2.zero_grad()
    m2.set_gradient_checkpointing(True)
    m2(**_batch(m2)).loss["total"].backward()
    for n, g in grads.items():
        torch.testing.assert_close(m2.vision.second.get_parameter(n).grad, g, rtol=1e-5, atol=1e-6)
    rows = m2.parameter_counts()
    # trained: what the backward reached (its final norm never runs: the taps stop at its blocks' outputs)
    reached = sum(p.numel() for n, p in m2.vision.second.named_parameters() if n in grads)
    assert rows["vision.second_encoder"]["finetune"] == reached < rows["vision.second_encoder"]["total"]
    assert rows["vision"]["finetune"] == sum(p.numel() for p in m2.vision.visual.parameters() if p.requires_grad)

    # save / load: every weight comes back from the one file, the outputs are the same
    m.eval()
    m.save(tmp_path / "ck")
    loaded = emma_mamba.load(tmp_path / "ck")
    batch = _batch(m)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, m(**batch).logits, rtol=0, atol=0)
    # `emma-mamba info` reads a checkpoint directory's config
    from emma_mamba.cli import main

    assert main(["info", "--config", str(tmp_path / "ck"), "--json"]) == 0
    # a checkpoint and a config that disagree about the second encoder: named, not loaded half
    import yaml

    cfg_file = tmp_path / "ck" / "config.yaml"
    d = yaml.safe_load(cfg_file.read_text())
    d["vision"]["second_encoder"] = {"timm_model": None, "pretrained": None, "timm_kwargs": {}, "taps": [-2],
                                     "mean": None, "std": None}
    d["vision"]["taps"] = [0, 1]
    cfg_file.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"does not match .*config.yaml"):
        emma_mamba.load(tmp_path / "ck")


@pytest.mark.parametrize("change,match", [
    (dict(taps=[2]), r"vision.second_encoder.taps: \[2\] has 1 block indices but vision.taps \[0, 1\] has 2"),
    (dict(taps=[1, 1]), r"vision.second_encoder.taps: duplicate block indices"),
    (dict(mean=[0.5, 0.5]), r"vision.second_encoder.mean: expected 3 values"),
    (dict(std=[0.5, 0.0, 0.5]), r"vision.second_encoder.std: every value must be > 0"),
    (dict(timm_kwargs={**TINY_DINO, "pretrained": True}), r"timm_kwargs: 'pretrained' is not allowed"),
])
def test_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        dual_cfg(**change)


def test_build_errors_name_the_field():
    cfg = get_preset("tiny")
    cfg.vision.second_encoder.pretrained = "dino.pth"
    with pytest.raises(ConfigError, match=r"second_encoder: pretrained set but timm_model is null"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"timm_model: 'vit_nope_dinov2' is not a timm model"):
        EmmaMamba(dual_cfg(timm_model="vit_nope_dinov2"))
    with pytest.raises(ConfigError, match=r"block index 3 is out of range for vit_small_patch14_reg4_dinov2, which "
                                          r"has 3 blocks"):
        EmmaMamba(dual_cfg(taps=[0, 3]))
    with pytest.raises(ConfigError, match=r"takes 64x64 images but ViT-B-16 takes 32x32; set "
                                          r"vision.second_encoder.timm_kwargs.img_size: 32"):
        EmmaMamba(dual_cfg(timm_kwargs={**TINY_DINO, "img_size": 64}))
    with pytest.raises(ConfigError, match=r"patch grid \(2, 2\) differs from ViT-B-16's \(4, 4\)"):
        EmmaMamba(dual_cfg(timm_kwargs={**TINY_DINO, "patch_size": 16}))
    with pytest.raises(ConfigError, match=r"timm_kwargs: .* not accepted by vit_small_patch14_reg4_dinov2"):
        EmmaMamba(dual_cfg(timm_kwargs={**TINY_DINO, "no_such_arg": 1}))


def test_vision_config_round_trips_through_yaml(tmp_path):
    from emma_mamba.config import load_config, save_config

    cfg = dual_cfg(mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg and isinstance(back.vision.second_encoder, SecondEncoderConfig)
    assert VisionConfig().second_encoder.timm_model is None  # single encoder by default


def test_bf16_model_keeps_the_renormalisation_exact():
    # the affine map is Python floats applied in fp32: casting the model to bf16 does not round it
    import timm.data

    m = EmmaMamba(dual_cfg(), for_training=False, dtype=torch.bfloat16)
    pp = m.vision.preprocess_cfg
    scale, shift = m.vision.second_affine
    for c in range(3):
        s2, m2 = timm.data.IMAGENET_DEFAULT_STD[c], timm.data.IMAGENET_DEFAULT_MEAN[c]
        assert scale[c] == pp["std"][c] / s2 and shift[c] == (pp["mean"][c] - m2) / s2
    feats = m.vision(m.image_processor(IMAGES).to(torch.bfloat16))
    assert feats[0].dtype == torch.bfloat16 and feats[0].shape == (2, 16, 56)


def test_meta_original_dinov2_checkpoint_layout_loads(tmp_path):
    # Meta's released DINOv2 (reg) files use their own layout: register_tokens, a mask_token, a pos_embed with a
    # class position and a class token without it; timm's loader converts it. The file here is a timm model's
    # weights written in that layout (the inverse of the conversion), loaded back through the config.
    torch.manual_seed(3)
    ref = timm.create_model(DINO, **TINY_DINO, num_classes=0)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    p0 = torch.randn(1, 1, sd["pos_embed"].shape[-1])
    meta = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta.update(mask_token=torch.zeros(1, sd["cls_token"].shape[-1]), register_tokens=sd["reg_token"],
                cls_token=sd["cls_token"] - p0, pos_embed=torch.cat([p0, sd["pos_embed"]], dim=1))
    torch.save(meta, tmp_path / "dinov2_reg4_pretrain.pth")
    torch.manual_seed(4)
    got, _, _ = build_second_encoder(SecondEncoderConfig(timm_model=DINO, timm_kwargs=TINY_DINO,
                                                         pretrained=str(tmp_path / "dinov2_reg4_pretrain.pth")))
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=1e-6, msg=k)


def test_info_names_each_towers_width(tmp_path, capsys):
    """`emma-mamba info` on a dual config whose open_clip tower is resized: the resized tower's own width (32), and
    the concatenated features' (32 + 24): it gave the tower the concatenated width."""
    from emma_mamba.cli import main

    cfg = tmp_path / "dual.yaml"
    cfg.write_text("preset: tiny\nvision:\n  second_encoder:\n    timm_model: " + DINO + "\n    timm_kwargs: "
                   + str(TINY_DINO).replace("'", "") + "\n    taps: [2, -2]\n")
    assert main(["info", "--config", str(cfg)]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "(resized by open_clip_overrides: 3 blocks of width 32)" in head
    assert f"+ {DINO} taps [1, 2] (concatenated, width 56)" in head  # (sorted: -2 of 3 blocks is 1)
