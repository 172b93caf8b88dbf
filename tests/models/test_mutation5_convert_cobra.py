"""Mutation round 5: ``emma-mamba convert cobra`` beyond the one fixture of test_convert_cobra.py (a
dinosiglip / resize-naive / fused-gelu-mlp run with its --config): the vision backbones' own presets (taps, input
size, against the towers timm and open_clip build), Prismatic's other resize strategies (against its transforms
written out here with torchvision), the gelu-mlp projector and LM shapes other than that fixture's (against
transformers' MambaForCausalLM), and the flags the conversion refuses."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import emma_mamba
from emma_mamba.config import get_preset
from emma_mamba.convert import CobraRun, ConversionError, cobra_config, convert_cobra
from emma_mamba.models.vlm import EmmaMamba
from tests.models.test_convert_cobra import ASTRONAUT, _base_cfg, _cobra_llm_state, _good_pieces, _write_run

ZEPHYR = {"llm_backbone_id": "mamba-2.8b-zephyr"}


def _run(**config) -> CobraRun:
    return CobraRun(dict(ZEPHYR, **config), {}, Path("latest-checkpoint.pt"))


def test_dinosiglip_preset_reads_each_towers_penultimate_block_at_384px():
    """Guards against the dinosiglip backbone's taps or DINOv2 input size being wrong when no --config is given:
    Prismatic reads ``get_intermediate_layers(n={depth - 2})`` of both towers at 384 px (depths from timm)."""
    cfg = cobra_config(_run(vision_backbone_id="dinosiglip-vit-so-384px"), None, {}, "fused", 3, None, None)
    m = EmmaMamba(cfg, for_training=False, device="meta")
    with torch.device("meta"):
        siglip = timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, num_classes=0)
        dino = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=384)
    assert m.vision.taps == [len(siglip.blocks) - 2]
    assert m.vision.second_taps == [len(dino.blocks) - 2]
    assert tuple(m.vision.second.patch_embed.img_size) == (384, 384) == tuple(m.vision.image_size)
    assert m.vision.num_tokens == (384 // 14) ** 2


def test_clip_preset_reads_the_penultimate_block():
    """Guards against the one-tower backbones' taps: clip-vit-l-336px's penultimate of open_clip's blocks."""
    cfg = cobra_config(_run(vision_backbone_id="clip-vit-l-336px"), None, {}, "fused", 3, None, None)
    m = EmmaMamba(cfg, for_training=False, device="meta")
    clip = open_clip.create_model("ViT-L-14-336-quickgelu", device="meta")
    assert m.vision.taps == [len(clip.visual.transformer.resblocks) - 2]
    assert m.vision.second is None
    assert tuple(m.vision.image_size) == (336, 336)


def _prismatic(strategy: str, pp: dict):
    """Prismatic's image transform of a timm-style backbone at 32 px: resize-crop is the default eval transform
    (Resize the shorter side, CenterCrop); letterbox pads to a square of the mean colour first."""
    default = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                         T.Normalize(pp["mean"], pp["std"])])
    if strategy == "resize-crop":
        return default
    fill = tuple(int(255 * x) for x in pp["mean"])

    def letterbox(im):
        side = max(im.size)
        sq = Image.new("RGB", (side, side), fill)
        sq.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
        return default(sq)
    return letterbox


@pytest.mark.parametrize("strategy", ["resize-crop", "letterbox"])
def test_other_resize_strategies_preprocess_as_prismatic(strategy):
    """Guards against image_resize_strategy being mapped to the wrong vision.image_resize (or ignored)."""
    cfg = cobra_config(_run(image_resize_strategy=strategy), _base_cfg(), {}, "fused", 3, None, None)
    m = EmmaMamba(cfg, for_training=False, device="meta")
    image = Image.open(ASTRONAUT).convert("RGB").crop((0, 0, 512, 300))  # not square: the strategies differ
    got = m.image_processor([image])[0]
    want = _prismatic(strategy, m.image_processor.cfg)(image)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("override", ["vision.image_resize=crop", "vision.pretrained=/elsewhere/clip.pth"])
def test_overrides_of_what_the_run_and_the_flags_decide_are_refused(override):
    """Guards against --override silently accepting a key the conversion then overwrites (OWN_KEYS)."""
    with pytest.raises(ConversionError, match="only vision settings may be overridden"):
        cobra_config(_run(), _base_cfg(), {}, "fused", 3, None, None, overrides=[override])


def test_dino_weights_for_a_single_tower_model_are_refused(tmp_path):
    """Guards against --dino-weights being silently ignored for a model with no DINOv2 tower."""
    base = get_preset("tiny")
    assert base.vision.second_encoder.timm_model is None
    with pytest.raises(ConversionError, match="--dino-weights given but .* has no DINOv2 tower"):
        cobra_config(_run(vision_backbone_id="siglip-vit-so400m-384px"), base, {}, "mlp", 2, None,
                     str(tmp_path / "dino.pth"))


def test_gelu_mlp_projector_computes_prismatics_two_layers(tmp_path):
    """Guards against the gelu-mlp projector (layers 0, 2) converting to the wrong kind or depth: the converted
    projector is gelu(x W0 + b0) W2 + b2 on Prismatic's [DINOv2, SigLIP] feature order, written out here."""
    _, llm = _good_pieces()
    g = torch.Generator().manual_seed(7)
    w0, b0 = torch.randn(64, 56, generator=g) * 0.2, torch.randn(64, generator=g) * 0.1
    w2, b2 = torch.randn(64, 64, generator=g) * 0.2, torch.randn(64, generator=g) * 0.1
    proj = {"projector.0.weight": w0, "projector.0.bias": b0, "projector.2.weight": w2, "projector.2.bias": b2}
    run = _write_run(tmp_path, proj, llm, config={"arch_specifier": "no-align+gelu-mlp"})
    out = convert_cobra(run, tmp_path / "out", base=_base_cfg(), random_vision=True)
    model = emma_mamba.load(out)
    x = torch.randn(1, 5, 56, generator=g)  # ours: [open_clip (32), DINOv2 (24)]
    with torch.no_grad():
        got = model.projector(x)
        want = F.linear(F.gelu(F.linear(torch.cat([x[..., 32:], x[..., :32]], -1), w0, b0)), w2, b2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(vocab_size=50281), dict(use_conv_bias=False), dict(use_bias=True)])
def test_lm_shapes_other_than_cobra_3bs_convert_to_transformers_logits(tmp_path, variant):
    """Guards against the LM config read from the checkpoint's shapes (vocabulary rows not a multiple of 8, no
    conv bias, in_proj bias) being assumed instead: the converted LM gives transformers' logits."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=50280, hidden_size=64, num_hidden_layers=2, state_size=8, conv_kernel=4, expand=2,
              use_conv_bias=True, use_bias=False, tie_word_embeddings=True)
    hf = MambaForCausalLM(MambaConfig(**dict(kw, **variant))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    proj, _ = _good_pieces()
    run = _write_run(tmp_path, proj, _cobra_llm_state(hf))
    model = emma_mamba.load(convert_cobra(run, tmp_path / "out", base=_base_cfg(), random_vision=True))
    ids = torch.randint(0, 50277, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.lm(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
