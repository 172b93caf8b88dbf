"""The Mamba-2 LM (``ssm_layer: mamba2``) against transformers' Mamba2ForCausalLM (the oracle): logits, hidden
states and gradients, both checkpoint layouts, the recurrent cache (chunked prefill, decode steps, packed rows),
LoRA, and the multimodal model on a Mamba-2 LM.

Small random models, CPU, fp32. transformers runs its own pure-PyTorch SSD path (chunked matmuls, no
mamba-ssm here), an independent computation of the recurrence our mixer runs through the selective-scan ops.
"""

from __future__ import annotations

import json

import pytest
import torch

from emma_mamba import ops
from emma_mamba.models.mamba import CheckpointError, Mamba2Mixer, MambaConfig, MambaLM
from tests.models.test_mamba_lm import _assert_close, backend  # noqa: F401 - the backend fixture

transformers = pytest.importorskip("transformers")

# transformers Mamba2Config kwargs: groups, biases, conv widths, untied heads, a bf16-style residual
HF2_CONFIGS = {
    "g1-k4": dict(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4, head_dim=16,
                  n_groups=1, conv_kernel=4, chunk_size=8, tie_word_embeddings=True),
    "g2-k3-bias-untied": dict(vocab_size=64, hidden_size=24, state_size=4, num_hidden_layers=3, num_heads=6,
                              head_dim=8, n_groups=2, conv_kernel=3, chunk_size=4, use_bias=True,
                              use_conv_bias=False, residual_in_fp32=False, layer_norm_epsilon=1e-6,
                              tie_word_embeddings=False),
}


def _hf2_model(**kw):
    """A random transformers Mamba2 whose every parameter (norms, biases, A_log, D, dt_bias) is perturbed."""
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _random_lm2(**kw) -> MambaLM:
    torch.manual_seed(0)
    cfg = dict(ssm_layer="mamba2", d_model=32, n_layer=2, vocab_size=90, d_state=8, headdim=16, ngroups=2)
    lm = MambaLM(MambaConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return lm


@pytest.mark.parametrize("name", list(HF2_CONFIGS))
def test_logits_and_hidden_states_match_transformers(tmp_path, backend, name):  # noqa: F811
    hf = _hf2_model(**HF2_CONFIGS[name])
    hf.save_pretrained(tmp_path)
    lm = MambaLM.from_pretrained(tmp_path).eval()
    assert lm.checkpoint_layout == "hf" and lm.config.ssm_layer == "mamba2"
    assert isinstance(lm.layers[0].mixer, Mamba2Mixer)
    ids = torch.randint(0, hf.config.vocab_size, (2, 29))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = lm(ids, output_hidden_states=True)
    _assert_close(out.logits, ref.logits)
    # transformers' Mamba2 hidden_states: the embeddings, the residual stream after blocks 1..n-1, then the
    # final-normed output; ours: the embeddings and the residual stream after every block
    n = hf.config.num_hidden_layers
    assert len(out.hidden_states) == len(ref.hidden_states) == n + 1
    for i in range(n):
        _assert_close(out.hidden_states[i], ref.hidden_states[i])
    _assert_close(out.last_hidden_state, ref.hidden_states[n])


def test_gradients_match_transformers(tmp_path, backend):  # noqa: F811
    """Our backward (the ops' selective-scan and conv backward) against autograd through transformers' SSD."""
    hf = _hf2_model(**HF2_CONFIGS["g2-k3-bias-untied"])
    hf.save_pretrained(tmp_path)
    lm = MambaLM.from_pretrained(tmp_path)
    hf.train(), lm.train()
    ids = torch.randint(0, 64, (2, 19))
    lm(ids).logits.float().pow(2).mean().backward()
    hf(ids).logits.float().pow(2).mean().backward()
    ours = dict(lm.named_parameters())
    for name, p in hf.named_parameters():
        key = name if name.startswith("lm_head") else name.removeprefix("backbone.")
        torch.testing.assert_close(ours[key].grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{key}: {m}")


def _write_original_layout(hf, path):
    """The state-spaces layout of a Mamba-2 written by hand from a transformers model (independent of our saver):
    mamba-ssm's MambaConfig with ssm_cfg.layer Mamba2 and its init-only options present."""
    c = hf.config
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": c.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                    "headdim": c.head_dim, "ngroups": c.n_groups, "bias": c.use_bias, "conv_bias": c.use_conv_bias,
                    "rmsnorm": True, "norm_before_gate": False, "chunk_size": 256, "A_init_range": [1, 16],
                    "dt_limit": [0.0, float("inf")]},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": c.residual_in_fp32,
        "fused_add_norm": True, "pad_vocab_size_multiple": 1, "tie_embeddings": c.tie_word_embeddings,
        "norm_epsilon": c.layer_norm_epsilon}))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf.state_dict().items()}
    sd["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    torch.save(sd, path / "pytorch_model.bin")


@pytest.mark.parametrize("name", list(HF2_CONFIGS))
def test_original_layout_and_our_writers(tmp_path, name):
    hf = _hf2_model(**HF2_CONFIGS[name])
    _write_original_layout(hf, tmp_path / "orig")
    lm = MambaLM.from_pretrained(tmp_path / "orig").eval()
    assert lm.checkpoint_layout == "original" and lm.config.ssm_layer == "mamba2"
    ids = torch.randint(0, hf.config.vocab_size, (1, 17))
    with torch.no_grad(), ops.use_backend("torch"):
        _assert_close(lm(ids).logits, hf(ids).logits)
        for layout in ("original", "hf"):  # our own writer, both layouts, round-trips bit for bit
            lm.save_pretrained(tmp_path / layout, layout=layout)
            again = MambaLM.from_pretrained(tmp_path / layout).eval()
            assert again.config == lm.config or layout == "hf"  # (hf has no init-only dt fields of Mamba-1)
            assert torch.equal(again(ids).logits, lm(ids).logits)
        # transformers reads what we write
        theirs = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
        _assert_close(theirs(ids).logits, lm(ids).logits)


def test_checkpoint_errors_name_the_field(tmp_path):
    hf = _hf2_model(**HF2_CONFIGS["g1-k4"])
    _write_original_layout(hf, tmp_path / "orig")
    conf = json.loads((tmp_path / "orig" / "config.json").read_text())
    for field, value, words in (("rmsnorm", False, "ssm_cfg.rmsnorm must be true"),
                                ("norm_before_gate", True, "ssm_cfg.norm_before_gate must be false"),
                                ("dt_limit", [0.001, 0.1], "ssm_cfg.dt_limit"),
                                ("d_ssm", 32, "ssm_cfg.d_ssm"),
                                ("headdim", 24, "multiple of headdim 24"),
                                ("ngroups", 3, "ngroups 3 must divide the head count 4"),
                                ("dt_rank", 4, r"unsupported ssm_cfg field\(s\) dt_rank for Mamba2")):
        bad = json.loads(json.dumps(conf))
        bad["ssm_cfg"][field] = value
        (tmp_path / "orig" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=words):
            MambaLM.from_pretrained(tmp_path / "orig")
    # d_ssm equal to d_inner (expand * d_model = 64) is mamba-ssm's default written out: the same model
    with torch.no_grad():
        want = hf(torch.tensor([[1, 5, 7, 2]])).logits
    (tmp_path / "orig" / "config.json").write_text(json.dumps({**conf, "ssm_cfg": {**conf["ssm_cfg"], "d_ssm": 64}}))
    with torch.no_grad():
        got = MambaLM.from_pretrained(tmp_path / "orig").eval()(torch.tensor([[1, 5, 7, 2]])).logits[..., :97]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    hf.save_pretrained(tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field, value, words in (("time_step_limit", [0.0, 6.5], "time_step_limit"),
                                ("head_dim", 8, "num_heads \\* head_dim = 32 but expand \\* hidden_size = 64"),
                                ("rms_norm", False, "rms_norm=false")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**conf, field: value}))
        with pytest.raises(CheckpointError, match=words):
            MambaLM.from_pretrained(tmp_path / "hf")
    # a Mamba-1 config over Mamba-2 weights: every mismatching tensor is named
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**conf, "model_type": "mamba"}))
    with pytest.raises(CheckpointError, match="dt_bias|x_proj"):
        MambaLM.from_pretrained(tmp_path / "hf")


def test_hf_config_without_the_defaulted_fields_loads_as_transformers_reads_it(tmp_path):
    """A transformers Mamba2 config.json that leaves out fields at Mamba2Config's own defaults (n_groups 8, an
    untied head), which transformers reads as those defaults: ours must read the same model (Mamba-1's defaults,
    1 group and a tied head, would build other in_proj / conv shapes and tie a head the file holds apart)."""
    torch.manual_seed(0)
    hf = _hf2_model(vocab_size=48, hidden_size=32, state_size=4, num_hidden_layers=1, num_heads=8, head_dim=8,
                    chunk_size=8)
    assert hf.config.n_groups == 8 and hf.config.tie_word_embeddings is False  # transformers' defaults
    hf.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    for field in ("n_groups", "tie_word_embeddings"):
        del conf[field]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    lm = MambaLM.from_pretrained(tmp_path).eval()
    assert (lm.config.ngroups, lm.config.tie_embeddings) == (8, False)
    ids = torch.randint(0, 48, (2, 11))
    with torch.no_grad(), ops.use_backend("torch"):
        _assert_close(lm(ids).logits, theirs(ids).logits)
        _assert_close(lm(ids).logits, hf(ids).logits)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of headdim 48"):
        MambaConfig(ssm_layer="mamba2", d_model=32, headdim=48)
    with pytest.raises(ValueError, match="ngroups 3 must divide the head count 4"):
        MambaConfig(ssm_layer="mamba2", d_model=32, headdim=16, ngroups=3)
    with pytest.raises(ValueError, match="ssm_layer"):
        MambaConfig(ssm_layer="mamba3")


def test_init_follows_mamba_ssm():
    lm = MambaLM(MambaConfig(ssm_layer="mamba2", d_model=64, n_layer=2, d_state=16, headdim=16))
    for block in lm.layers:
        m = block.mixer
        A = torch.exp(m.A_log)
        assert A.shape == (8,) and bool(((A >= 1) & (A <= 16)).all())
        assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(128))
        dt = torch.nn.functional.softplus(m.dt_bias)
        assert bool(((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all())
        assert m.in_proj.weight.shape == (2 * 128 + 2 * 16 + 8, 64) and m.conv1d.weight.shape == (160, 1, 4)


def test_chunked_prefill_and_decode_match_full_forward(backend):  # noqa: F811
    lm = _random_lm2(d_conv=3)
    ids = torch.randint(0, 90, (2, 16))
    with torch.no_grad():
        full = lm(ids).logits
        cache = lm.allocate_cache(2)
        assert cache.conv_states[0].shape == (2, 64 + 2 * 2 * 8, 3) and cache.ssm_states[0].shape == (2, 64, 8)
        parts = [lm(ids[:, :1], cache=cache).logits, lm(ids[:, 1:3], cache=cache).logits,
                 lm(ids[:, 3:10], cache=cache).logits]
        parts += [lm(ids[:, t:t + 1], cache=cache).logits for t in range(10, 16)]
    _assert_close(torch.cat(parts, dim=1), full)


def test_packing_equals_separate_forwards(backend):  # noqa: F811
    lm = _random_lm2()
    a, b, c = (torch.randint(0, 90, (1, n)) for n in (5, 2, 9))
    seq_idx = torch.tensor([[0] * 5 + [1] * 2 + [2] * 9], dtype=torch.int32)
    nxt = torch.randint(0, 90, (1, 1))
    with torch.no_grad():
        out = lm(torch.cat([a, b, c], 1), seq_idx=seq_idx).logits
        _assert_close(out, torch.cat([lm(a).logits, lm(b).logits, lm(c).logits], dim=1))
        cache = lm.allocate_cache(1)  # a packed prefill's cache continues its last sequence
        lm(torch.cat([a, b, c], 1), seq_idx=seq_idx, cache=cache)
        _assert_close(lm(nxt, cache=cache).logits, lm(torch.cat([c, nxt], 1)).logits[:, -1:])


def test_generate_greedy_equals_argmax_of_full_forwards():
    from emma_mamba.inference.generate import GenerationConfig, generate

    lm = _random_lm2()
    prompt = torch.randint(0, 90, (1, 7))
    res = generate(lm, prompt, config=GenerationConfig(max_new_tokens=6, eos_token_id=None))
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = lm(ids).logits[:, -1, :90].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert res.sequences[0] == ids[0, 7:].tolist()


def test_lora_on_mamba2():
    from emma_mamba.models.lora import apply_lora, export_state

    lm = _random_lm2()
    with pytest.raises(ValueError, match="Mamba2Mixer of this LM has no x_proj; its projections are in_proj, out_proj"):
        apply_lora(_random_lm2(), 4, 8, targets=("in_proj", "x_proj"))
    apply_lora(lm, 4, 8, targets=("in_proj", "out_proj"), dropout=0.5)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 90, (2, 9))
    lm.eval()
    with torch.no_grad():
        merged = lm(ids).logits  # eval: the merged weights
    lm.train()
    torch.manual_seed(1)
    a = lm(ids).logits
    torch.manual_seed(1)
    b = lm(ids).logits
    torch.manual_seed(2)
    c = lm(ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)  # dropout acts in training, on the adapters' inputs
    a.float().pow(2).mean().backward()
    trainable = {n for n, p in lm.named_parameters() if p.grad is not None}
    assert trainable and all("lora_" in n for n in trainable)
    lm.get_submodule("layers.0.mixer.in_proj").dropout.p = 0.0  # no dropout: activation space == merged
    lm.get_submodule("layers.1.mixer.in_proj").dropout.p = 0.0
    for i in (0, 1):
        lm.get_submodule(f"layers.{i}.mixer.out_proj").dropout.p = 0.0
    _assert_close(lm(ids).logits.detach(), merged)
    sd, adapters = export_state(lm, {k: v.detach() for k, v in lm.state_dict().items()})
    assert len(adapters) == 8  # A and B of 2 projections x 2 layers
    plain = _random_lm2()
    plain.load_state_dict(sd)
    with torch.no_grad():
        _assert_close(plain.eval()(ids).logits, merged)


def test_multimodal_model_on_a_mamba2_lm(tmp_path):
    """The tiny EmmaMamba with a Mamba-2 LM: a training step reaches every trainable module, generation equals
    greedy full forwards, a saved checkpoint reloads to the same logits, and ``lm.pretrained`` takes a Mamba-2
    checkpoint (one of another shape or mixer is refused by name)."""
    import emma_mamba
    from emma_mamba.config import ConfigError
    from tests.models.test_vlm import IMAGES, _grad_nonzero, make_batch, make_model

    lm_cfg = {"ssm_layer": "mamba2", "headdim": 16, "d_state": 16}
    m = make_model(lm=lm_cfg).set_stage("finetune")
    assert isinstance(m.lm.layers[0].mixer, Mamba2Mixer)
    m.train()
    # zero-initialised gates block their inputs' gradient on step 0 only: after one step every trainable tensor
    # receives gradient, the Mamba-2 mixers' included
    m(**make_batch(m)).loss["total"].backward()
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05).step()
    m.zero_grad()
    m(**make_batch(m)).loss["total"].backward()
    assert all(_grad_nonzero(p) for n, p in m.named_parameters() if p.requires_grad), \
        [n for n, p in m.named_parameters() if p.requires_grad and not _grad_nonzero(p)]
    m.eval()
    d = m.save(tmp_path / "ckpt")
    inf = emma_mamba.load(d)
    b = make_batch(m)
    with torch.no_grad():
        assert torch.equal(inf(**b).logits, m(**b).logits)
        from emma_mamba.inference.generate import GenerationConfig
        from emma_mamba.models.vlm import build_chat_prompt

        text = build_chat_prompt("What is it?", 1, m.config.image_token)
        res = inf.generate(text, [IMAGES[0]], ["What is it?"], config=GenerationConfig(max_new_tokens=5,
                                                                                       eos_token_id=None))
        x, seq = inf.prompt_embeds(text, [IMAGES[0]], ["What is it?"]), []
        emb = inf.lm.get_input_embeddings()
        for _ in range(5):
            xs = torch.cat([x, emb(torch.tensor([seq]))], 1) if seq else x
            seq.append(int(inf.lm(inputs_embeds=xs).logits[0, -1, :inf.lm.config.vocab_size].argmax()))
        assert res.sequences[0] == seq
    m.lm.save_pretrained(tmp_path / "lm2", layout="original")
    again = make_model(lm={**lm_cfg, "pretrained": str(tmp_path / "lm2")})
    assert all(torch.equal(a, b) for a, b in zip(again.lm.state_dict().values(), m.lm.state_dict().values()))
    with pytest.raises(ConfigError, match="the checkpoint has ssm_layer=mamba2 but the config says "
                                          "lm.ssm_layer=mamba1"):
        make_model(lm={"pretrained": str(tmp_path / "lm2")})
    with pytest.raises(ConfigError, match="the checkpoint has headdim=16 but the config says lm.headdim=32"):
        make_model(lm={**lm_cfg, "headdim": 32, "pretrained": str(tmp_path / "lm2")})


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_logits_match_transformers_on_gpu(tmp_path, gpu_backend):
    from tests.models.test_mamba_lm import _gpu_backend_missing, check_gpu_logits

    if _gpu_backend_missing(gpu_backend):
        pytest.skip(f"backend {gpu_backend!r} is not available: {_gpu_backend_missing(gpu_backend)}")
    check_gpu_logits(_hf2_model(**{**HF2_CONFIGS["g2-k3-bias-untied"], "state_size": 64}), tmp_path, gpu_backend)
