"""MFF, instruction fusion and the projector: exact identity at initialisation, and after the parameters
move, agreement with hand-written formulas (the oracle) built from torch primitives."""

from __future__ import annotations

import hashlib
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

from emma_mamba.config import get_preset
from emma_mamba.models.fusion import InstructionFusion, MultiScaleFusion, Projector
from emma_mamba.models.vision import build_open_clip

B, N, C, K = 2, 16, 32, 3


def _taps():
    # ViT residual streams have a few huge channels; include them so "exact" is not a small-number accident
    taps = [torch.randn(B, N, C) * (k + 1) for k in range(K)]
    taps[-1][..., 3] += 300.0
    return taps


@pytest.mark.parametrize("mode", ["weighted", "concat", "cross_attn"])
def test_mff_is_exactly_penultimate_only_at_init(mode):
    taps = _taps()
    mff = MultiScaleFusion(C, K, mode, num_heads=4)
    out = mff(taps)
    assert torch.equal(out, taps[-1])
    assert torch.equal(MultiScaleFusion(C, 1, "none")(taps[-1:]), taps[-1])
    # ...and it is not the identity once trained: perturb every parameter
    with torch.no_grad():
        for p in mff.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert not torch.allclose(mff(taps), taps[-1])


def _perturbed(mod):
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return mod


def test_mff_weighted_matches_formula():
    taps = _taps()
    mff = _perturbed(MultiScaleFusion(C, K, "weighted"))
    w = torch.softmax(mff.tap_logits, 0)
    ref = taps[-1] + mff.gate * sum(
        w[k] * F.layer_norm(taps[k], (C,), mff.norms[k].weight, mff.norms[k].bias) for k in range(K))
    torch.testing.assert_close(mff(taps), ref, rtol=1e-5, atol=1e-5)


def test_mff_concat_matches_formula():
    taps = _taps()
    mff = _perturbed(MultiScaleFusion(C, K, "concat"))
    normed = [F.layer_norm(taps[k], (C,), mff.norms[k].weight, mff.norms[k].bias) for k in range(K)]
    W = mff.proj.weight  # (C, K*C): column block k acts on tap k
    ref = taps[-1] + mff.proj.bias + sum(normed[k] @ W[:, k * C:(k + 1) * C].T for k in range(K))
    torch.testing.assert_close(mff(taps), ref, rtol=1e-4, atol=1e-4)


def test_mff_cross_attn_matches_formula():
    taps, H = _taps(), 4
    mff = _perturbed(MultiScaleFusion(C, K, "cross_attn", num_heads=H))
    normed = [F.layer_norm(taps[k], (C,), mff.norms[k].weight, mff.norms[k].bias) for k in range(K)]
    Wq, Wk, Wv = mff.attn.in_proj_weight.chunk(3)
    bq, bk, bv = mff.attn.in_proj_bias.chunk(3)
    ctx = torch.cat(normed[:-1], dim=1)  # keys/values: all tokens of the shallower taps
    q = (normed[-1] @ Wq.T + bq).view(B, N, H, C // H).transpose(1, 2)
    k = (ctx @ Wk.T + bk).view(B, -1, H, C // H).transpose(1, 2)
    v = (ctx @ Wv.T + bv).view(B, -1, H, C // H).transpose(1, 2)
    att = torch.softmax(q @ k.transpose(-1, -2) / (C // H) ** 0.5, dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, N, C)
    ref = taps[-1] + o @ mff.attn.out_proj.weight.T + mff.attn.out_proj.bias
    torch.testing.assert_close(mff(taps), ref, rtol=1e-4, atol=1e-4)


def test_mff_bad_arguments():
    with pytest.raises(ValueError, match="mff.mode must be one of"):
        MultiScaleFusion(C, K, "sum")
    with pytest.raises(ValueError, match="takes one tap"):
        MultiScaleFusion(C, 2, "none")
    with pytest.raises(ValueError, match="must divide the ViT width"):
        MultiScaleFusion(C, K, "cross_attn", num_heads=5)
    with pytest.raises(ValueError, match="built for 3 taps, got 2"):
        MultiScaleFusion(C, K, "weighted")(_taps()[:2])


@pytest.fixture(scope="module")
def text_model():
    cfg = get_preset("tiny").vision  # text tower: 2 blocks of width 32, context 24
    clip, _ = build_open_clip(cfg)
    clip.visual = None
    return clip, open_clip.get_tokenizer(cfg.model_name, context_length=clip.context_length)


def _instruction_fusion(text_model):
    clip, tok = text_model
    return InstructionFusion(clip, tok, vision_width=C, num_visual_tokens=N)


def test_instruction_fusion_is_exactly_identity_at_init(text_model):
    fusion = _instruction_fusion(text_model)
    visual = torch.randn(B, N, C) * 50
    ids = fusion.tokenize(["What is in the image?", "Describe the cat in detail."])
    assert ids.shape == (B, 24)
    assert torch.equal(fusion(visual, ids), visual)


def test_instruction_fusion_matches_formula(text_model):
    clip, _ = text_model
    fusion = _instruction_fusion(text_model)
    with torch.no_grad():
        fusion.token_mixer.weight.normal_(0, 0.1)
        fusion.token_mixer.bias.normal_(0, 0.1)
    visual = torch.randn(B, N, C)
    ids = fusion.tokenize(["a photo of an astronaut", "a cat"])
    # oracle: the CLIP text tower's token features by hand (embedding + positions, causal blocks, final LN)
    x = clip.token_embedding(ids) + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    text = clip.ln_final(x)  # (B, T, text_width)
    t = F.gelu(text @ fusion.text_proj.weight.T + fusion.text_proj.bias)  # (B, T, C)
    z = torch.cat([visual, t], dim=1)  # (B, N + T, C)
    ref = torch.einsum("jk,bkc->bjc", fusion.token_mixer.weight, z) + fusion.token_mixer.bias[:, None]
    torch.testing.assert_close(fusion(visual, ids), ref, rtol=1e-4, atol=1e-4)
    # the text tower stays frozen and out of the gradient
    assert not any(p.requires_grad for p in fusion.text_model.parameters())
    assert fusion.text_proj.weight.requires_grad and fusion.token_mixer.weight.requires_grad


def test_instruction_truncation_is_counted_and_logged(text_model, caplog):
    fusion = _instruction_fusion(text_model)
    long = "please describe " + "every small detail of the picture " * 10
    texts = ["short question", long]
    before = list(texts)
    with caplog.at_level(logging.WARNING, logger="emma_mamba.models.fusion"):
        ids = fusion.tokenize(texts)
    assert texts == before  # the caller's instructions are not modified
    assert fusion.num_truncated == 1
    assert "truncated from" in caplog.text and "1 of 2 instructions truncated" in caplog.text
    assert ids.shape == (2, 24)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emma_mamba.models.fusion"):
        fusion.tokenize(["short question"])  # 2 + 2 tokens: fits
    assert fusion.num_truncated == 1 and "truncated" not in caplog.text
    # many distinct long instructions: the first LOGGED_TEXTS are logged one by one, the rest only counted
    caplog.clear()
    fusion.LOGGED_TEXTS = 3
    with caplog.at_level(logging.WARNING, logger="emma_mamba.models.fusion"):
        fusion.tokenize([f"{i} {long}" for i in range(6)])
    assert fusion.num_truncated == 7 and caplog.text.count("truncated from") == 2  # the first of 3 above
    assert caplog.text.count("further ones are counted, not each logged") == 1


def test_instruction_token_cache_is_exact_bounded_and_still_counts_truncation(text_model, caplog):
    _, tok = text_model
    fusion = _instruction_fusion(text_model)
    fusion.TOKEN_CACHE_SIZE = 3
    long = "please describe " + "every small detail of the picture " * 10
    batches = [["a cat", "a dog", long], ["a dog", "a cat"], ["a bird", long, "a fish", "a cat", "a cat"], []]
    with caplog.at_level(logging.WARNING, logger="emma_mamba.models.fusion"):
        for texts in batches:
            got = fusion.tokenize(texts)
            want = tok(texts, context_length=24) if texts else torch.empty(0, 24, dtype=torch.long)
            assert torch.equal(got, want), texts  # oracle: open_clip's tokenizer on every call
            assert len(fusion._token_cache) <= 3
    assert fusion.num_truncated == 2  # the long instruction, once per use, cached or not
    assert caplog.text.count("truncated from") == 2  # logged when tokenised: first seen, and after its eviction
    key = lambda t: hashlib.blake2b(t.encode(), digest_size=16).digest()  # noqa: E731
    assert list(fusion._token_cache) == [key(long), key("a fish"), key("a cat")]  # least recently used dropped first
    # keyed by a 16-byte digest, not the text: a long question costs no more to keep than a short one
    assert all(isinstance(k, bytes) and len(k) == 16 for k in fusion._token_cache)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emma_mamba.models.fusion"):
        for _ in range(5):  # cached now: counted every time, logged no more; the summary at 4 only
            fusion.tokenize([long])
    assert fusion.num_truncated == 7 and "truncated from" not in caplog.text
    assert caplog.text.count("instructions truncated in this batch") == 1 and "(4 so far" in caplog.text


def test_open_clips_word_cache_is_bounded(text_model):
    """open_clip's tokenizer caches the BPE of every distinct word it meets, without a bound (a server answering
    questions full of ids grew by it for days): past WORD_CACHE_SIZE it is cleared; the ids stay exact."""
    _, tok = text_model
    fusion = _instruction_fusion(text_model)
    fusion.WORD_CACHE_SIZE = 50
    words = getattr(getattr(fusion.tokenizer, "tokenizer", fusion.tokenizer), "cache")
    for i in range(40):
        text = " ".join(f"w{i}x{j}" for j in range(5))
        assert torch.equal(fusion.tokenize([text]), tok([text], context_length=24))
        assert len(words) <= 50 + 5 + 2  # cleared when a question takes it past the bound


def test_instruction_fusion_bad_inputs(text_model):
    fusion = _instruction_fusion(text_model)
    ids = fusion.tokenize(["a", "b", "c"])
    with pytest.raises(ValueError, match="2 images but 3 instructions"):
        fusion(torch.randn(B, N, C), ids)
    with pytest.raises(ValueError, match=r"must be \(n_images, 24\)"):
        fusion(torch.randn(B, N, C), ids[:2, :10])


@pytest.mark.parametrize("depth", [2, 3])
def test_projector(depth):
    proj = Projector(C, 48, depth)
    x = torch.randn(B, N, C)
    lins = [m for m in proj.mlp if isinstance(m, torch.nn.Linear)]
    assert len(lins) == depth
    ref = x
    for i, lin in enumerate(lins):
        ref = ref @ lin.weight.T + lin.bias
        if i < depth - 1:
            ref = F.gelu(ref)
    torch.testing.assert_close(proj(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="projector.depth must be 2 or 3"):
        Projector(C, 48, 4)


def test_fused_projector_is_prismatics_shape_and_formula():
    """kind fused (Cobra's and the EMMA-Mamba authors' projector): in -> 4 in -> out -> out, GELU between, by hand;
    the EMMA-Mamba dinosiglip widths counted; a depth other than 3 is refused by the config and the module."""
    from emma_mamba.config import ConfigError

    proj = Projector(C, 48, 3, kind="fused")
    lins = [m for m in proj.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lins] == [(C, 4 * C), (4 * C, 48), (48, 48)]
    x = torch.randn(B, N, C)
    ref = F.gelu(F.gelu(x @ lins[0].weight.T + lins[0].bias) @ lins[1].weight.T + lins[1].bias)
    torch.testing.assert_close(proj(x), ref @ lins[2].weight.T + lins[2].bias, rtol=1e-5, atol=1e-5)
    # the authors' widths: the 2176-wide DINOv2 + SigLIP tokens into mamba-2.8b's 2560
    big = Projector(2176, 2560, 3, kind="fused", device="meta")
    assert sum(p.numel() for p in big.parameters()) == (2176 * 8704 + 8704) + (8704 * 2560 + 2560) + (2560 * 2560 + 2560)
    with pytest.raises(ValueError, match="fused has 3 layers"):
        Projector(C, 48, 2, kind="fused")
    cfg = get_preset("tiny")
    cfg.projector.kind = "fused"
    with pytest.raises(ConfigError, match="set projector.depth 3"):
        cfg.validate()
    cfg.projector.depth = 3
    from emma_mamba.models.vlm import EmmaMamba

    m = EmmaMamba(cfg.validate(), for_training=False)
    widths = [(l.in_features, l.out_features) for l in m.projector.mlp if isinstance(l, torch.nn.Linear)]
    v = widths[0][0]
    assert widths == [(v, 4 * v), (4 * v, cfg.lm.d_model), (cfg.lm.d_model, cfg.lm.d_model)]


def test_siglip_style_text_tower_with_local_hf_tokenizer(tmp_path):
    # The timm/CustomTextCLIP path (as SigLIP): HF tokenizer read from a local directory, never downloaded.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from emma_mamba.config import ConfigError, VisionConfig
    from emma_mamba.models.vlm import EmmaMamba

    words = ["<pad>", "</s>", "<unk>"] + "what is in the image please describe every small detail of a".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    cfg = get_preset("tiny")
    cfg.vision = VisionConfig(model_name="ViT-B-16-SigLIP", taps=[0, -1], open_clip_overrides={
        "embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "image_size": 224},
        "text_cfg": {"width": 32, "heads": 2, "layers": 1, "context_length": 8, "vocab_size": len(words)}})
    cfg.instruction.tokenizer = str(tmp_path)
    m = EmmaMamba(cfg)
    assert type(m.instruction.text_model).__name__ == "CustomTextCLIP" and m.vision.num_tokens == 196
    ids = m.tokenize_instructions(["what is in the image", "please describe every small detail of the image a"])
    assert ids[0].tolist() == [3, 4, 5, 6, 7, 0, 0, 0] and m.instruction.num_truncated == 1
    visual = torch.randn(2, 196, 192)
    assert torch.equal(m.instruction(visual, ids), visual)
    cfg.instruction.tokenizer = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="instruction.tokenizer: .* is not a directory"):
        EmmaMamba(cfg)


@pytest.mark.parametrize("mode", ["", "clips"])
def test_hf_tokenizer_truncation_is_counted_on_the_cleaned_text(text_model, tmp_path, mode):
    """An HF text-tower tokenizer (SigLIP's: clean 'canonicalize', which drops punctuation and HTML entities)
    tokenises the cleaned text, so an instruction is truncated only when that is too long. Oracle: open_clip's own
    tokenizer at the context length against a much longer one (truncated iff the kept tokens differ)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "<s>", "<cls>"] + "what is in the image please describe".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            bos_token="<s>", cls_token="<cls>").save_pretrained(tmp_path)
    hf = open_clip.tokenizer.HFTokenizer(str(tmp_path), context_length=24, clean="canonicalize",
                                         tokenizer_mode=mode or None, local_files_only=True)
    clip, _ = text_model
    fusion = InstructionFusion(clip, hf, vision_width=C, num_visual_tokens=N)
    texts = ["What, is: in; the? image! " * 3,  # 30 raw tokens, 15 once cleaned: fits
             "what &amp; is &amp; in &amp; the &amp; image " * 2,  # 4 tokens per entity raw, none cleaned: fits
             "what is in the image " * 6,  # 30 words: truncated
             "describe " * 21, "describe " * 22,  # the boundaries: clips adds bos, eos and a class token,
             "describe " * 24, "describe " * 25]  # the plain tokenizer here no special token

    def content(row):
        return [t for t in row.tolist() if t not in (0, 4)]  # without padding and the class token

    expect = [content(hf([t], 24)[0]) != content(hf([t], 1000)[0]) for t in texts]
    assert expect == [False, False, True] + ([False, True, True, True] if mode else [False, False, False, True])
    fusion.tokenize(texts)
    assert fusion.num_truncated == sum(expect)
    for t, e in zip(texts, expect):
        before = fusion.num_truncated
        fusion.tokenize([t])
        assert fusion.num_truncated - before == e, t
