"""LoRA adapters on the mixers (emma_mamba.models.lora) against a plain LM holding the merged weights
W + alpha/r * B @ A computed here in float64: the forward (training path, cached prefill, decode steps), the
adapters' gradients from the plain model's weight gradient (dA = s B^T dW, dB = s dW A^T), the exported state
and the resume check."""

from __future__ import annotations

import copy

import pytest
import torch

from emma_mamba.models.lora import (LORA_TARGETS, LoRALinear, apply_lora, export_state, has_lora, lora_modules,
                                    resume_state)
from emma_mamba.models.mamba import MambaConfig, MambaLM

R, ALPHA = 3, 6.0


def _lm(seed=0, **kw):
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64, d_state=4, **kw))


def _randomise_adapters(lm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(lm).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)


def _merged_plain(plain, adapted):
    """``plain`` (a copy of the LM before the adapters) with every adapted weight replaced by the float64
    merge of the adapted model's W, A, B."""
    out = copy.deepcopy(plain)
    with torch.no_grad():
        for name, m in lora_modules(adapted).items():
            w = m.weight.double() + (ALPHA / R) * (m.lora_B.double() @ m.lora_A.double())
            out.get_submodule(name).weight.copy_(w.float())
    return out


@pytest.mark.parametrize("targets", [("in_proj", "x_proj", "out_proj"), LORA_TARGETS])
def test_at_init_the_adapted_lm_is_the_pretrained_one(targets):
    plain = _lm()
    adapted = copy.deepcopy(plain)
    names = apply_lora(adapted, R, ALPHA, targets)
    assert names == [f"layers.{i}.mixer.{t}" for i in range(2) for t in targets]
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():  # (with gradients the plain in_proj takes another GEMM path: rounding)
        assert torch.equal(adapted(ids).logits, plain(ids).logits)  # B = 0: W + 0 is W
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{leaf}" for n in names for leaf in ("lora_A", "lora_B")}
    # the plain names are kept: the frozen W is still layers.N.mixer.in_proj.weight
    assert set(plain.state_dict()) < set(adapted.state_dict())


def _adapted_and_oracle():
    """An LM with random adapters on every target, and the plain LM holding its merged weights."""
    plain = _lm()
    lm = copy.deepcopy(plain)
    apply_lora(lm, R, ALPHA, LORA_TARGETS)
    _randomise_adapters(lm)
    return plain, lm, _merged_plain(plain, lm)


def _adapter_grads(lm, oracle, got, want):
    """Backward of one random projection of both models' logits; per adapter, [(dA, s B^T dW), (dB, s dW A^T)]
    with dW the plain LM's weight gradient (float64)."""
    target = torch.randn_like(got)
    (got * target).sum().backward()
    (want * target).sum().backward()
    out, s = {}, ALPHA / R
    for name, m in lora_modules(lm).items():
        dw = oracle.get_submodule(name).weight.grad.double()
        a, b = m.lora_A.double(), m.lora_B.double()
        out[name] = [(m.lora_A.grad.double(), s * b.T @ dw), (m.lora_B.grad.double(), s * dw @ a.T)]
    return out


def test_forward_and_adapter_gradients_equal_the_merged_plain_model():
    _, lm, oracle = _adapted_and_oracle()
    ids = torch.randint(0, 64, (2, 11))
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [0] * 11])  # packed rows take the same path
    got, want = lm(ids, seq_idx=seq_idx).logits, oracle(ids, seq_idx=seq_idx).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, pairs in _adapter_grads(lm, oracle, got, want).items():
        for g, ref in pairs:
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)
        assert lm.get_submodule(name).weight.grad is None  # W is frozen
    assert all(p.grad is None for n, p in lm.named_parameters() if "lora_" not in n)


def _cached_logits(model, ids, prefill: int) -> torch.Tensor:
    """The last-position logits of a cached prefill of ``ids[:, :prefill]``, then of one decode step (the mixers'
    _step path) per remaining id: (steps + 1, b, V)."""
    cache = model.allocate_cache(ids.shape[0])
    logits = [model(ids[:, :prefill], cache=cache).logits[:, -1]]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t:t + 1], cache=cache).logits[:, -1])
    return torch.stack(logits)


def test_cached_prefill_and_decode_steps_use_the_adapters():
    plain, lm, oracle = _adapted_and_oracle()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        outs = [_cached_logits(model, ids, 7) for model in (lm, oracle)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        # and the adapters matter: the plain model's decode differs
        cache = plain.allocate_cache(2)
        assert not torch.allclose(plain(ids[:, :7], cache=cache).logits[:, -1], outs[0][0], atol=1e-3)


def test_export_state_is_a_plain_model_with_the_adapters_merged():
    plain = _lm(tie_embeddings=False)
    lm = copy.deepcopy(plain)
    apply_lora(lm, R, ALPHA, ("in_proj", "out_proj"))
    _randomise_adapters(lm)
    merged, adapters = export_state(lm, lm.state_dict())
    assert set(merged) == set(plain.state_dict())
    assert set(adapters) == {f"layers.{i}.mixer.{t}.lora_{x}" for i in range(2) for t in ("in_proj", "out_proj")
                             for x in "AB"}
    fresh = _lm(seed=5, tie_embeddings=False)
    fresh.load_state_dict(merged, strict=True)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, _merged_plain(plain, lm)(ids).logits, rtol=1e-5, atol=1e-5)
    # resuming: W from this run (current state), A and B from the adapters file; the merged file is checked
    other = copy.deepcopy(plain)
    apply_lora(other, R, ALPHA, ("in_proj", "out_proj"))
    sd = resume_state(other, other.state_dict(), merged, adapters, "ckpt")
    other.load_state_dict(sd, strict=True)
    for name, m in lora_modules(other).items():
        src = lm.get_submodule(name)
        assert torch.equal(m.weight, src.weight) and torch.equal(m.lora_A, src.lora_A)
        assert torch.equal(m.lora_B, src.lora_B)
    # another base (other seed) does not reproduce the merged weights: refused, naming the weight
    moved = _lm(seed=3, tie_embeddings=False)
    apply_lora(moved, R, ALPHA, ("in_proj", "out_proj"))
    with pytest.raises(RuntimeError, match=r"ckpt: layers\.0\.mixer\.in_proj\.weight .*other base weights"):
        resume_state(moved, moved.state_dict(), merged, adapters, "ckpt")
    # another rank or other targets: refused
    wider = copy.deepcopy(plain)
    apply_lora(wider, R + 1, ALPHA, ("in_proj", "out_proj"))
    with pytest.raises(RuntimeError, match=r"lora_A has shape \(3, 16\), this run's adapter \(4, 16\)"):
        resume_state(wider, wider.state_dict(), merged, adapters, "ckpt")
    fewer = copy.deepcopy(plain)
    apply_lora(fewer, R, ALPHA, ("in_proj",))
    with pytest.raises(RuntimeError, match="do not match this run's train.lora"):
        resume_state(fewer, fewer.state_dict(), merged, adapters, "ckpt")


def test_a_tied_head_is_written_once():
    lm = _lm()  # embeddings tied to the head
    apply_lora(lm, R, ALPHA)
    merged, _ = export_state(lm, lm.state_dict())
    assert sum(v.data_ptr() == lm.embeddings.weight.data_ptr() for v in merged.values()) <= 1


@pytest.mark.parametrize("ssm_layer,want", [("mamba1", ("in_proj", "x_proj", "out_proj")),
                                             ("mamba2", ("in_proj", "out_proj"))])
def test_the_default_targets_are_the_lms_own_projections(ssm_layer, want):
    """No targets given: a Mamba-1 LM's in_proj, x_proj and out_proj, a Mamba-2 LM's in_proj and out_proj (it
    has no x_proj: the one default for both refused every Mamba-2 LM); a projection the LM lacks, named, is still
    refused, naming what it has."""
    kw = dict(ssm_layer="mamba2", headdim=8) if ssm_layer == "mamba2" else {}
    lm = _lm(**kw)
    names = apply_lora(lm, R, ALPHA)
    assert names == [f"layers.{i}.mixer.{t}" for i in range(2) for t in want]
    lacks = [t for t in LORA_TARGETS if not hasattr(_lm(**kw).layers[0].mixer, t)]
    assert lacks == ([] if ssm_layer == "mamba1" else ["x_proj", "dt_proj"])
    for t in lacks:
        with pytest.raises(ValueError, match=rf"LoRA target {t}: the Mamba2Mixer of this LM has no {t}; its "
                                             rf"projections are in_proj, out_proj"):
            apply_lora(_lm(**kw), R, ALPHA, ("in_proj", t))


def test_info_counts_the_default_adapters_of_a_mamba2_lm(capsys):
    """`emma-mamba info --preset emma-mamba2-2.7b --lora 8` failed on the x_proj of the one default; it counts the
    in_proj and out_proj adapters, by hand from the shapes."""
    from emma_mamba.cli import main
    from emma_mamba.config import get_preset
    from emma_mamba.info import report

    cfg = get_preset("tiny")
    cfg.lm.ssm_layer, cfg.lm.headdim = "mamba2", 16
    lo = report(cfg, 8)["lora"]
    c = cfg.lm
    di = c.expand * c.d_model
    in_out = 2 * di + 2 * c.ngroups * c.d_state + di // c.headdim  # in_proj's outputs: z, x, B, C, dt per head
    assert lo["targets"] == ["in_proj", "out_proj"]
    assert lo["adapter_params"] == c.n_layer * 8 * ((c.d_model + in_out) + (di + c.d_model))
    assert main(["info", "--preset", "emma-mamba2-2.7b", "--lora", "8"]) == 0
    assert "stage 2 with LoRA r=8 on in_proj, out_proj:" in capsys.readouterr().out


def test_bad_settings_are_refused():
    lm = _lm()
    with pytest.raises(ValueError, match="LoRA targets must be a non-empty list from in_proj"):
        apply_lora(lm, R, ALPHA, ("conv1d",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(lm.layers[0].mixer.in_proj, 0, 1.0)
    apply_lora(lm, R, ALPHA)
    assert has_lora(lm)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(lm, R, ALPHA)


def test_bf16_base_keeps_fp32_adapters():
    lm = _lm().to(torch.bfloat16)
    apply_lora(lm, R, ALPHA, ("in_proj",))
    m = lm.layers[0].mixer.in_proj
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == m.lora_B.dtype == torch.float32
    assert m.merged_weight().dtype == torch.float32  # not rounded back to bf16
    ids = torch.randint(0, 64, (1, 5))
    lm(ids).logits.float().sum().backward()
    assert m.lora_B.grad is not None and m.lora_B.grad.dtype == torch.float32


def test_base_dtype_holds_the_frozen_weights_in_bf16():
    """An fp32 LM with base_dtype bf16: the adapted weights become their bf16 rounding, nothing else changes,
    and the adapted LM computes as a plain fp32 LM holding bf16(W) + s B A."""
    plain = _lm()
    lm = copy.deepcopy(plain)
    apply_lora(lm, R, ALPHA, ("in_proj", "out_proj"), base_dtype=torch.bfloat16)
    _randomise_adapters(lm)
    for name, p in plain.named_parameters():
        mine = lm.get_parameter(name)
        if name.endswith(("in_proj.weight", "out_proj.weight")):
            assert mine.dtype == torch.bfloat16 and torch.equal(mine, p.to(torch.bfloat16))
        else:
            assert mine.dtype == torch.float32 and torch.equal(mine, p)
    oracle = _merged_plain(plain, lm)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_lora_on_a_gpu_under_bf16_autocast():
    """On a GPU (the CUDA or Triton kernels) under bf16 autocast, as the trainer runs: logits and adapter
    gradients against the plain LM holding the merged weights, to bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plain, lm, oracle = _adapted_and_oracle()
    lm, oracle = lm.cuda(), oracle.cuda()
    ids = torch.randint(0, 64, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = lm(ids).logits.float(), oracle(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    for name, pairs in _adapter_grads(lm, oracle, got, want).items():
        for g, ref in pairs:
            assert (g - ref).norm() <= 5e-2 * ref.norm() + 1e-6, name


def test_lora_dropout_acts_on_the_adapters_input_only():
    """dropout p on in_proj's and out_proj's adapters: in training each output is W h + s B A (m * h) / (1 - p)
    with m the mask the same random state draws (reproduced on a tensor of ones); in eval mode no dropout."""
    import torch.nn.functional as F

    from emma_mamba.ops._inner import gemm_cf, project_out

    p = 0.3
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 10, bias=False)
    lin = LoRALinear(base, R, ALPHA, dropout=p)
    with torch.no_grad():
        lin.lora_B.normal_()
    h = torch.randn(2, 6, 5)  # (b, in, l) channels-first
    s = ALPHA / R
    for train in (True, False):
        lin.train(train)
        torch.manual_seed(7)
        x, z = lin.gemm_cf_halves(h)
        torch.manual_seed(7)
        mask = F.dropout(torch.ones_like(h), p) if train else torch.ones_like(h)
        want = gemm_cf(base.weight, h) + s * gemm_cf(lin.lora_B, gemm_cf(lin.lora_A, h * mask))
        torch.testing.assert_close(torch.cat([x, z], 1), want, rtol=1e-5, atol=1e-6)
        assert train == bool((mask == 0).any())
    out_base = torch.nn.Linear(6, 4, bias=True)
    out = LoRALinear(out_base, R, ALPHA, dropout=p)
    with torch.no_grad():
        out.lora_B.normal_()
    torch.manual_seed(3)
    got = out.project_out_cf(h)  # (b, l, out)
    torch.manual_seed(3)
    mask = F.dropout(torch.ones_like(h), p)
    want = project_out(h, out_base.weight, out_base.bias) + s * (h * mask).transpose(1, 2) @ out.lora_A.T @ out.lora_B.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRALinear(torch.nn.Linear(4, 4), R, ALPHA, dropout=1.0)


def test_lora_dropout_in_a_training_forward_and_its_limits():
    """In an LM with dropout on in_proj and out_proj, a training forward differs from the eval forward, which
    equals the merged plain model's; dropout with x_proj or dt_proj targets is refused, naming them."""
    plain = _lm()
    lm = copy.deepcopy(plain)
    apply_lora(lm, R, ALPHA, ("in_proj", "out_proj"), dropout=0.5)
    _randomise_adapters(lm)
    oracle = _merged_plain(plain, lm)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        lm.eval()
        torch.testing.assert_close(lm(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)
        lm.train()
        assert not torch.allclose(lm(ids).logits, oracle(ids).logits, atol=1e-3)
    with pytest.raises(ValueError, match="x_proj adapters are merged"):
        apply_lora(_lm(), R, ALPHA, ("in_proj", "x_proj"), dropout=0.1)


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_save_pretrained_of_an_adapted_lm_writes_the_merged_model(tmp_path, ssm_layer):
    """MambaLM.save_pretrained of an LM with adapters writes the plain model holding W + s B A (in both layouts):
    transformers (which ignores tensors it does not know) and our loader read the adapted model, not the base."""
    transformers = pytest.importorskip("transformers")
    from emma_mamba import ops

    kw = dict(ssm_layer="mamba2", headdim=8) if ssm_layer == "mamba2" else {}
    plain = _lm(tie_embeddings=False, bias=True, **kw)
    lm = copy.deepcopy(plain)
    apply_lora(lm, R, ALPHA, ("in_proj", "out_proj"))
    _randomise_adapters(lm)
    oracle = _merged_plain(plain, lm).eval()
    lm.eval()
    ids = torch.randint(0, 64, (2, 9))
    hf_cls = transformers.Mamba2ForCausalLM if ssm_layer == "mamba2" else transformers.MambaForCausalLM
    with torch.no_grad(), ops.use_backend("torch"):
        want = oracle(ids).logits
        for layout in ("hf", "original"):
            lm.save_pretrained(tmp_path / layout, layout=layout)
            back = MambaLM.from_pretrained(tmp_path / layout).eval()
            torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)
        theirs = hf_cls.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-4, atol=1e-4)
    assert has_lora(lm) and len(lora_modules(lm)) == 4  # the LM itself keeps its adapters


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_base_dtype_bf16_training_forward_without_autocast(ssm_layer):
    """base_dtype bf16 under an fp32 LM trained without autocast (train.precision fp32): the training forward
    (activation space) computes W h + s B A h with W its bf16 rounding, as the eval forward and a plain fp32 LM
    holding bf16(W) + s B A do, and the adapters get gradients."""
    kw = dict(ssm_layer="mamba2", headdim=8) if ssm_layer == "mamba2" else {}
    plain = _lm(**kw)
    lm = copy.deepcopy(plain)
    apply_lora(lm, R, ALPHA, ("in_proj", "out_proj"), base_dtype=torch.bfloat16)
    _randomise_adapters(lm)
    oracle = _merged_plain(plain, lm)
    ids = torch.randint(0, 64, (2, 9))
    lm.train()
    got = lm(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, oracle(ids).logits, rtol=1e-5, atol=1e-5)
    got.float().pow(2).mean().backward()
    assert all(m.lora_A.grad is not None and m.lora_B.grad is not None for m in lora_modules(lm).values())


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_decode_steps_of_a_bf16_lm_with_fp32_adapters(ssm_layer):
    """A bf16 LM with (fp32) adapters decodes as the plain bf16 LM holding bf16(W + s B A): the decode step casts
    the merged weight to the activations' dtype as the full forward's kernels do."""
    kw = dict(ssm_layer="mamba2", headdim=8) if ssm_layer == "mamba2" else {}
    targets = ("in_proj", "out_proj") if ssm_layer == "mamba2" else LORA_TARGETS
    plain = _lm(**kw).to(torch.bfloat16).eval()
    lm = copy.deepcopy(plain)
    apply_lora(lm, R, ALPHA, targets)
    _randomise_adapters(lm)
    oracle = copy.deepcopy(plain)
    with torch.no_grad():
        for name, m in lora_modules(lm).items():
            oracle.get_submodule(name).weight.copy_(m.merged_weight())
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        outs = [_cached_logits(model, ids, 6).float() for model in (lm, oracle)]
        assert outs[0].dtype == torch.float32
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


def test_info_checks_lora_targets_as_training_does(capsys):
    """`info --lora-targets` follows the training config's rules, named by the option (exit 2): only with --lora,
    distinct projections, the LM's own (a Mamba-2 LM has no x_proj); what training refuses, info refuses."""
    from emma_mamba.cli import main

    cases = [(["--preset", "tiny", "--lora-targets", "in_proj"], "--lora-targets goes with --lora R"),
             (["--preset", "tiny", "--lora", "8", "--lora-targets", "x_proj", "x_proj"],
              "--lora-targets must be a non-empty list of distinct projections"),
             (["--preset", "emma-mamba2-2.7b", "--lora", "8", "--lora-targets", "x_proj"],
              "--lora-targets ['x_proj'] names x_proj, which the LM's mamba2 mixer (model.lm.ssm_layer) lacks; "
              "its projections are in_proj, out_proj")]
    for argv, msg in cases:
        assert main(["info", *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert main(["info", "--preset", "tiny", "--lora", "8", "--lora-targets", "in_proj", "out_proj"]) == 0
    assert "on in_proj, out_proj:" in capsys.readouterr().out
