"""The matched transformer baseline: parameter counts, shared vision front, KV-cache decode vs full forward."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from emma_mamba.bench.latency import OursRunner, TransformerRunner  # noqa: E402
from emma_mamba.config import get_preset  # noqa: E402
from emma_mamba.models.baseline import TransformerMLLM, matched_llama_config  # noqa: E402
from emma_mamba.models.mamba import MambaConfig, MambaLM  # noqa: E402
from emma_mamba.models.vlm import EmmaMamba  # noqa: E402


def _numel(module):
    return sum(p.numel() for p in module.parameters())  # nn.Module.parameters() yields a tied weight once


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.align.enabled = False
    emma = EmmaMamba(cfg, for_training=False).eval()
    return emma, TransformerMLLM.from_emma(emma).eval()


@pytest.mark.parametrize("shape", [
    dict(d_model=64, n_layer=2, vocab_size=50280, d_state=8),  # the tiny preset's LM
    dict(d_model=512, n_layer=8, vocab_size=50280),  # the benchmark's `small` size
    dict(d_model=768, n_layer=24, vocab_size=50280),  # mamba-130m
    dict(d_model=2560, n_layer=64, vocab_size=50280),  # mamba-2.8b (built on the meta device)
])
def test_parameter_count_matches(shape):
    mc = MambaConfig(**shape)
    lc = matched_llama_config(mc)
    with torch.device("meta"):
        mamba = MambaLM(mc, device="meta")
        llama = transformers.LlamaForCausalLM(lc)
    a, b = _numel(mamba), _numel(llama)
    assert abs(b - a) / a < 0.05, (a, b)
    # the solved part (everything but the shared-size embedding) matches too, not only the embedding-heavy total
    ea, eb = mamba.embeddings.weight.numel(), llama.get_input_embeddings().weight.numel()
    assert ea == eb
    assert abs((b - eb) - (a - ea)) / (a - ea) < 0.02, (a - ea, b - eb)
    assert lc.hidden_size == mc.d_model and lc.tie_word_embeddings
    assert lc.num_key_value_heads == lc.num_attention_heads  # full multi-head KV cache
    assert lc.num_hidden_layers < mc.n_layer  # a Llama layer holds about twice a Mamba layer's parameters


def test_baseline_shares_the_vision_front(pair):
    emma, base = pair
    for name in ("vision", "mff", "instruction", "projector"):
        assert getattr(base, name) is getattr(emma, name)
    assert base.lm.config._attn_implementation == "sdpa"
    assert base.lm.get_input_embeddings().weight.shape == emma.lm.embeddings.weight.shape
    H, W = emma.vision.image_size
    pixels = torch.randn(2, 3, H, W)
    inst = emma.tokenize_instructions(["what is this?", "count the shapes"])
    with torch.no_grad():
        torch.testing.assert_close(base.encode_images(pixels, inst), emma.encode_images(pixels, inst),
                                   rtol=0, atol=0)


def test_baseline_rejects_a_width_mismatch(pair):
    emma, _ = pair
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="width 32 must equal the projector's output width 64"):
        TransformerMLLM(emma, other)


@pytest.mark.parametrize("kv_cache", ["static", "dynamic"])
def test_kv_cache_decode_equals_full_forward(pair, kv_cache):
    """The harness's prefill + one-token steps reproduce the full forward's logits at every new position:
    an image-chat prompt (visual tokens spliced in), then greedy tokens fed back through the KV cache."""
    emma, base = pair
    H, W = emma.vision.image_size
    pixels = torch.randn(1, 3, H, W)
    inst = emma.tokenize_instructions(["Describe the image."])
    text = emma.build_prompt("Describe the image.")
    ids = torch.tensor([emma.tokenizer.encode(text)])
    runner = TransformerRunner(base.lm, kv_cache)
    steps = 6
    with torch.no_grad():
        embeds = base._splice(ids, base.encode_images(pixels, inst), None, None, None, None)[0]  # (1, L, d)
        logits, cache = runner.prefill(embeds=embeds, max_len=embeds.shape[1] + steps + 1)
        got, toks = [logits], []
        for _ in range(steps):
            toks.append(got[-1].argmax(-1, keepdim=True))
            logits, cache = runner.step(cache, toks[-1])
            got.append(logits)
        full_embeds = torch.cat([embeds, base.lm.get_input_embeddings()(torch.cat(toks, 1))], dim=1)
        full = base.lm(inputs_embeds=full_embeds, use_cache=False).logits  # (1, L + steps, V)
    L = embeds.shape[1]
    for i, g in enumerate(got):
        torch.testing.assert_close(g[0], full[0, L - 1 + i], rtol=1e-4, atol=1e-4)
    # the same prompt through the full model forward (ids + pixels) gives the same first logits
    with torch.no_grad():
        out = base(ids, pixels, inst)
    torch.testing.assert_close(out.logits[0, -1], got[0][0], rtol=1e-4, atol=1e-4)


def test_ours_runner_decode_equals_full_forward(pair):
    emma, _ = pair
    runner = OursRunner(emma.lm)
    ids = torch.randint(0, 50000, (2, 11))
    with torch.no_grad():
        logits, cache = runner.prefill(ids=ids)
        got, toks = [logits], []
        for _ in range(4):
            toks.append(got[-1].argmax(-1, keepdim=True))
            logits, cache = runner.step(cache, toks[-1])
            got.append(logits)
        full = emma.lm(torch.cat([ids] + toks, dim=1)).logits
    for i, g in enumerate(got):
        torch.testing.assert_close(g, full[:, 10 + i], rtol=1e-4, atol=1e-4)


def test_state_bytes_constant_for_mamba_linear_for_kv(pair):
    """Bytes of the real cache tensors after prefilling C tokens, against the hand count from the configs."""
    emma, base = pair
    mc, lc = emma.lm.config, base.lm.config
    ours, theirs = OursRunner(emma.lm), TransformerRunner(base.lm, "dynamic")
    static = TransformerRunner(base.lm, "static")
    want_mamba = mc.n_layer * mc.d_inner * (mc.d_conv + mc.d_state) * 4  # fp32 conv window + fp32 SSM state
    with torch.no_grad():
        for C in (8, 16, 48):
            ids = torch.randint(0, 50000, (1, C))
            _, cache = ours.prefill(ids=ids)
            assert ours.state_bytes(cache, C) == want_mamba
            want_kv = 2 * lc.num_hidden_layers * C * lc.num_key_value_heads * lc.head_dim * 4  # K and V, fp32
            _, kv = theirs.prefill(ids=ids)
            assert theirs.state_bytes(kv, C) == want_kv
            _, kv = static.prefill(ids=ids, max_len=C + 10)
            assert static.state_bytes(kv, C) == want_kv
            assert static.allocated_bytes(kv) == want_kv * (C + 10) // C
