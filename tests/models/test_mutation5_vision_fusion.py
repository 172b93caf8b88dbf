"""Mutation round 5 (emma_mamba.models.vision, fusion, align_head, vlm): behaviours that the earlier tests could
not tell from a plausible mistake, mostly because the tiny preset hides them (one tap in the autograd check, an
image size that is a whole number of patches, modules still at their symmetric initialisation).

Oracles: autograd through the towers' ordinary forward with hooks on their blocks (not ``forward_intermediates``);
forward hooks counting which blocks run; open_clip's own tokenizer at the context length against a much longer
one; slices of the image cut by hand; LayerNorm and softmax written with torch primitives; LLaVA-1.5's projector
widths; the LM's hidden states at the visual positions taken from a forward over the splice done token by token.
"""

from __future__ import annotations

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.models.align_head import PixelAlignHead
from emma_mamba.models.fusion import InstructionFusion, Projector
from emma_mamba.models.vision import ImageProcessor, VisionEncoder, build_open_clip, build_second_encoder
from tests.models.test_dual_encoder import dual_cfg
from tests.models.test_vision import ASTRONAUT, CHELSEA, _hooked_blocks, tiny_vision_cfg
from tests.models.test_vlm import loop_splice, make_batch, make_model

# ------------------------------------------------------------------------------------------------ vision


def _reached(params: dict, outputs) -> set[str]:
    """Names of the parameters that autograd reaches from the sum of ``outputs``."""
    grads = torch.autograd.grad(sum(o.float().sum() for o in outputs), list(params.values()), allow_unused=True)
    return {n for n, g in zip(params, grads) if g is not None}


def test_an_unfrozen_encoder_with_several_taps_trains_every_block_up_to_the_deepest():
    """Guards against the idle (never-trainable) blocks being counted from the shallowest tap instead of the deepest,
    which froze block 1 of taps [1, 0] although its output is a tap."""
    cfg = tiny_vision_cfg(taps=[1, 0], freeze=False)  # 3 blocks; listed out of order on purpose
    clip, pp = build_open_clip(cfg)
    enc = VisionEncoder(clip.visual, cfg, pp).train()
    visual = enc.visual
    params = dict(visual.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    x = ImageProcessor(pp)([ASTRONAUT])
    outs = _hooked_blocks(visual.transformer.resblocks, lambda: visual(x))  # the ordinary forward
    reached = _reached(params, [outs[0], outs[1]])
    assert any(n.startswith("transformer.resblocks.1.") for n in reached)
    assert not any(n.startswith("transformer.resblocks.2.") for n in reached)
    enc.set_frozen(False)
    assert {n for n, p in visual.named_parameters() if p.requires_grad} == reached
    assert enc.trainable_numel(visual) == sum(params[n].numel() for n in reached)


def test_an_unfrozen_second_encoder_trains_every_block_up_to_its_deepest_tap():
    """Guards against the second (timm) tower's idle blocks being counted from its shallowest tap: its deepest tapped
    block was frozen although its output is a tap."""
    torch.manual_seed(0)
    cfg = dual_cfg()  # second taps [2, -2] of 3 blocks -> [1, 2]: only its final norm is idle
    cfg.vision.freeze = False
    clip, pp = build_open_clip(cfg.vision)
    dino, mean, std = build_second_encoder(cfg.vision.second_encoder)
    enc = VisionEncoder(clip.visual, cfg.vision, pp, dino, mean, std).train()
    params = dict(dino.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    x2 = ImageProcessor({**pp, "mean": mean, "std": std})([CHELSEA])
    outs = _hooked_blocks(dino.blocks, lambda: dino.forward_features(x2))
    reached = _reached(params, [outs[1], outs[2]])
    assert any(n.startswith("blocks.2.") for n in reached)
    enc.set_frozen(False)
    assert {n for n, p in dino.named_parameters() if p.requires_grad} == reached


def test_blocks_after_the_deepest_tap_never_run():
    """Guards against ``forward_intermediates`` being called without ``stop_early``: the blocks after the deepest tap
    (whose parameters are listed as idle) were computed on every image and thrown away."""
    torch.manual_seed(0)
    cfg = dual_cfg()
    cfg.vision.taps, cfg.vision.second_encoder.taps = [0], [1]
    cfg.validate()
    clip, pp = build_open_clip(cfg.vision)
    dino, mean, std = build_second_encoder(cfg.vision.second_encoder)
    enc = VisionEncoder(clip.visual, cfg.vision, pp, dino, mean, std)
    calls = {"clip": [], "second": []}
    handles = [b.register_forward_hook(lambda m, i, o, k=k, w=w: calls[w].append(k))
               for w, blocks in (("clip", clip.visual.transformer.resblocks), ("second", dino.blocks))
               for k, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            feats = enc(ImageProcessor(pp)([ASTRONAUT]))
    finally:
        for h in handles:
            h.remove()
    assert len(feats) == 1
    assert calls == {"clip": [0], "second": [0, 1]}  # each tower: 3 blocks, up to its deepest tap only


def test_a_freshly_built_frozen_encoder_runs_its_tower_in_eval_mode():
    """Guards against ``set_frozen`` leaving a frozen tower in training mode when the encoder is built (modules start
    in training mode): with patch dropout, training mode drops patch tokens, so the taps were random subsets."""
    cfg = tiny_vision_cfg(taps=[0, 1])
    cfg.open_clip_overrides = {**cfg.open_clip_overrides,
                               "vision_cfg": {**cfg.open_clip_overrides["vision_cfg"], "patch_dropout": 0.5}}
    clip, pp = build_open_clip(cfg)
    x = ImageProcessor(pp)([ASTRONAUT])
    visual = clip.visual.train()
    nlc = (lambda t: t) if visual.transformer.batch_first else (lambda t: t.transpose(0, 1))
    train_outs = _hooked_blocks(visual.transformer.resblocks, lambda: visual(x))
    assert nlc(train_outs[0]).shape[1] < 17  # the precondition: training mode drops patch tokens
    enc = VisionEncoder(visual, cfg, pp)  # frozen (the default), never put in train() or eval() here
    assert enc.training  # nn.Module's initial mode
    with torch.no_grad():
        feats = enc(x)
        visual.eval()
        outs = _hooked_blocks(visual.transformer.resblocks, lambda: visual(x))  # the oracle: eval mode, all tokens
    for tap, f in zip(enc.taps, feats):
        torch.testing.assert_close(f, nlc(outs[tap])[:, 1:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ fusion


def _tiny_text_tower():
    import open_clip

    cfg = get_preset("tiny").vision  # text tower: 2 blocks of width 32, context 24
    clip, _ = build_open_clip(cfg)
    clip.visual = None
    return clip, open_clip.get_tokenizer(cfg.model_name, context_length=clip.context_length)


def test_clip_instruction_truncation_is_counted_exactly_at_the_context_length():
    """Guards against an off-by-one in the token count of open_clip's CLIP tokenizer (start and end tokens): an
    instruction one token too long was not counted as truncated. Oracle: open_clip's tokenizer at the context length
    against a much longer one (truncated iff they differ in the first 24 ids)."""
    clip, tok = _tiny_text_tower()
    fusion = InstructionFusion(clip, tok, vision_width=32, num_visual_tokens=16)
    texts = ["cat " * k for k in (21, 22, 23, 24)]  # 23, 24, 25, 26 tokens with start and end
    expect = [not torch.equal(tok([t], 24)[0], tok([t], 1000)[0][:24]) for t in texts]
    assert expect == [False, False, True, True]
    for t, e in zip(texts, expect):
        before = fusion.num_truncated
        fusion.tokenize([t])
        assert fusion.num_truncated - before == e, t


def test_instruction_fusion_keeps_its_text_tower_in_eval_mode_under_train():
    """Guards against ``InstructionFusion.train()`` putting the frozen CLIP text tower in training mode (its dropout,
    where a tower has one, would then be active during training)."""
    clip, tok = _tiny_text_tower()
    fusion = InstructionFusion(clip, tok, vision_width=32, num_visual_tokens=16)
    fusion.train()
    assert fusion.training and fusion.token_mixer.training
    assert not any(m.training for m in fusion.text_model.modules())


@pytest.mark.parametrize("depth", [2, 3])
def test_mlp_projector_hidden_width_defaults_to_the_lm_width(depth):
    """Guards against the MLP projector's hidden layers defaulting to the vision width: LLaVA-1.5's mlp2x_gelu (and
    ``projector.hidden_dim``'s documented default) makes them the LM width."""
    lins = [m for m in Projector(24, 40, depth).mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(24, 40)] + [(40, 40)] * (depth - 1)
    lins = [m for m in Projector(24, 40, depth, hidden_dim=56).mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(24, 56)] + [(56, 56)] * (depth - 2) + [(56, 40)]


# ------------------------------------------------------------------------------------------- alignment head


def _head(norm_pix=True, layers=2):
    return PixelAlignHead(16, layers, (4, 4), (8, 8), d_model=16, n_layer=1, num_heads=2, norm_pix=norm_pix)


def _by_hand(images: torch.Tensor, top: int = 0, left: int = 0) -> torch.Tensor:
    """(n, 16, 192): the 4 x 4 grid of 8 x 8 patches from (top, left), raster order, pixels in (y, x, c) order."""
    rows = []
    for img in images:
        rows.append(torch.stack([img[:, top + gy * 8: top + gy * 8 + 8, left + gx * 8: left + gx * 8 + 8]
                                 .permute(1, 2, 0).reshape(-1) for gy in range(4) for gx in range(4)]))
    return torch.stack(rows)


def test_alignment_targets_are_the_patches_the_vit_sees_and_raw_without_norm_pix():
    """Guards against the patch targets of an image larger than the patch grid (SigLIP-384 with 14-px patches) being
    cut from the wrong corner (the ViT's strided patch conv sees the top-left grid_h*ph x grid_w*pw pixels), and
    against ``norm_pix: false`` still normalising the targets."""
    images = torch.rand(2, 3, 35, 37)
    raw = _by_hand(images)
    torch.testing.assert_close(_head(norm_pix=False).targets(images), raw, rtol=0, atol=0)
    mean, var = raw.mean(-1, keepdim=True), raw.var(-1, keepdim=True)
    torch.testing.assert_close(_head().targets(images), (raw - mean) / (var + 1e-6).sqrt(), rtol=1e-5, atol=1e-5)


def test_alignment_head_mixes_its_lm_layers_by_their_own_norms_and_softmax_weights():
    """Guards against the head pairing LM layer k with another layer's LayerNorm, or inverting its softmax weights:
    both invisible at initialisation, where every norm and weight is the same. Oracle: the input of ``in_proj``
    (captured by a hook) against softmax(w)_k LayerNorm_k(h_k) written with torch primitives."""
    head = _head(layers=3)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
        head.layer_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    hidden = [torch.randn(2, 16, 16) * (k + 1) for k in range(3)]
    seen = []
    handle = head.in_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            head.predict(hidden)
    finally:
        handle.remove()
    w = torch.exp(head.layer_logits) / torch.exp(head.layer_logits).sum()
    want = 0
    for k, h in enumerate(hidden):
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        want = want + w[k] * ((h - mu) / (var + 1e-5).sqrt() * head.in_norms[k].weight + head.in_norms[k].bias)
    torch.testing.assert_close(seen[0], want, rtol=1e-4, atol=1e-5)


def test_alignment_head_prediction_at_each_token_depends_on_exactly_the_tokens_up_to_it():
    """Guards against a mask that lets a visual token see a later one (e.g. the last patch, which a test perturbing
    one middle token misses) or not itself: the prediction at token i must depend on tokens 0..i and on no other.
    Oracle: autograd, d prediction_i / d hidden_j for every pair."""
    head = _head(layers=1)
    hidden = torch.randn(1, 16, 16, requires_grad=True)
    pred = head.predict([hidden])
    for i in range(16):
        (g,) = torch.autograd.grad(pred[0, i].sum(), hidden, retain_graph=True)
        seen = g[0].abs().sum(-1) > 0  # (16,): which input tokens reach prediction i
        assert seen.tolist() == [j <= i for j in range(16)], i


@torch.no_grad()
def test_alignment_loss_reads_the_configured_lm_layers_in_order():
    """Guards against the model handing the head the hidden states of ``align.lm_layers`` in another order (or of
    other layers): at initialisation the head's per-layer norms and weights are equal, so only a head moved off its
    initialisation shows it. Oracle: the LM's hidden states over the splice done token by token, at the visual
    positions found by hand, in config order; the images with the mean/std normalisation undone by hand."""
    m = make_model().eval()
    for p in m.align_head.in_norms.parameters():
        p.add_(torch.randn_like(p) * 0.5)
    m.align_head.layer_logits.copy_(torch.tensor([1.5, -0.5]))
    b = make_batch(m)
    out = m(**b)
    visual = m.encode_images(b["pixel_values"], b["instruction_ids"])
    embeds, _ = loop_splice(m, b["input_ids"], visual, b["labels"])
    hs = m.lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    N = m.vision.num_tokens
    places = []  # (row, start) of each image's tokens, walking the input ids by hand
    for r, row in enumerate(b["input_ids"].tolist()):
        pos = 0
        for t in row:
            if t == m.image_token_id:
                places.append((r, pos))
            pos += N if t == m.image_token_id else 1
    assert len(places) == 3
    hidden = [torch.stack([hs[i][r, j:j + N] for r, j in places]) for i in m.config.align.lm_layers]
    images = b["pixel_values"] * m.image_processor.std + m.image_processor.mean
    want = m.align_head(hidden, images)
    torch.testing.assert_close(out.loss["align"], want, rtol=1e-5, atol=1e-6)
    swapped = m.align_head(hidden[::-1], images)
    assert abs(float(swapped - want)) > 1e-3  # the test can tell the layers apart
