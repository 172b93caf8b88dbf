"""Inputs the kernels read in place with their own strides (unit stride along the last dimension only): the conv's
x and the scan's z (b, d, l), a decode step's x, z (b, d) and B, C (b, [g,] n). In the Mamba mixer they are views
of one in_proj or x_proj output, which were copied out before every kernel call. Oracles: the same backend on
contiguous copies of the same values (bit for bit: the kernels read the same numbers), the op layer's checks
(the views pass through as the same tensor objects), and counts of the copies a model's forward makes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.mixer_copies import CopyCounter  # the benchmark's own counter (clone, copy_, contiguous)
from emma_mamba import ops
from emma_mamba.ops import _checks
from emma_mamba.models.mamba import MambaConfig, MambaLM

from .test_mamba_inner import BACKENDS, _skip_unavailable
from .tolerances import segments


def _view(t: torch.Tensor, aligned: bool, seed: int = 0) -> torch.Tensor:
    """t's values in a view with unit last stride and larger other strides: ``aligned``, the mixer's case (a half
    of a tensor twice as wide along dim 1); else at an odd offset inside a buffer padded in every dimension (rows
    not 16-byte aligned: the CUDA kernels' scalar path)."""
    g = torch.Generator().manual_seed(seed)
    if aligned:
        big = torch.randn(t.shape[0], 2 * t.shape[1], *t.shape[2:], generator=g).to(t.dtype)
        v = big[:, t.shape[1]:]
    else:
        big = torch.randn(*(s + 3 for s in t.shape), generator=g).to(t.dtype)
        v = big[tuple(slice(1, 1 + s) for s in t.shape)]
    v = v.to(t.device)
    v.copy_(t)
    assert v.stride(-1) == 1 and not v.is_contiguous() and torch.equal(v, t)
    return v


def _grads(fn, inputs: dict, view: dict):
    """fn's output and the gradients of its inputs, with the tensors named in ``view`` passed as views (the
    gradient of a view's values is the same tensor either way)."""
    leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}
    args = {k: (_view(v, view[k]) if k in view else v) for k, v in leaves.items()}
    out = fn(**args)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    grads = torch.autograd.grad(out, [v for v in leaves.values() if v.requires_grad], cot)
    return out.detach(), grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("aligned", [True, False], ids=["half", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_and_scan_read_views_in_place(backend, device, aligned, dtype):
    """causal_conv1d's x and selective_scan's z as views: output and every gradient equal those of contiguous
    copies bit for bit, packed sequences included; the checks hand the views over uncopied."""
    _skip_unavailable(backend, device)
    if backend == "triton" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the Triton interpreter is slow: fp32 only")
    b, d, n, l = 2, 8, 4, 40
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    seq = segments(b, l, g, cuts=[9]).to(device)
    conv = {"x": rnd(b, d, l).to(dtype), "weight": rnd(d, 4, scale=0.5), "bias": rnd(d, scale=0.1)}
    scan = {"u": rnd(b, d, l).to(dtype), "delta": rnd(b, d, l, scale=0.5).to(dtype),
            "A": -torch.rand(d, n, generator=g).to(device) - 0.5, "B": rnd(b, n, l).to(dtype),
            "C": rnd(b, n, l).to(dtype), "D": rnd(d), "z": rnd(b, d, l).to(dtype), "delta_bias": rnd(d, scale=0.1)}
    conv_fn = lambda **a: ops.causal_conv1d(**a, activation="silu", seq_idx=seq)  # noqa: E731
    scan_fn = lambda **a: ops.selective_scan(**a, delta_softplus=True, seq_idx=seq)  # noqa: E731
    with ops.use_backend(backend):
        for fn, inputs, name in ((conv_fn, conv, "x"), (scan_fn, scan, "z")):
            want, want_g = _grads(fn, inputs, {})
            got, got_g = _grads(fn, inputs, {name: aligned})
            assert torch.equal(got, want), f"{name} as a view: output differs"
            for i, (a, c) in enumerate(zip(got_g, want_g)):
                assert torch.equal(a, c), f"{name} as a view: gradient {i} differs"
    xv = _view(conv["x"], aligned)
    assert _checks.check_causal_conv1d(xv, conv["weight"], None, None, None, "silu")[0] is xv
    zv = _view(scan["z"], aligned)
    assert _checks.check_selective_scan(*(scan[k] for k in ("u", "delta", "A", "B", "C", "D")), zv, None, None,
                                        None)[6] is zv


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("aligned", [True, False], ids=["half", "odd"])
@pytest.mark.parametrize("groups", [0, 2], ids=["B(b,n)", "B(b,g,n)"])
def test_decode_steps_read_views_in_place(backend, device, aligned, groups):
    """selective_state_update's x, z, B, C and causal_conv1d_update's x as views: the same outputs and updated
    states as from contiguous copies, bit for bit; the checks hand the views over uncopied."""
    _skip_unavailable(backend, device)
    b, d, n, w = 3, 16, 8, 4
    g = torch.Generator().manual_seed(2)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    bc_shape = (b, groups, n) if groups else (b, n)
    state, conv_state = rnd(b, d, n), rnd(b, d, w)
    x, z, dt, B, C = rnd(b, d), rnd(b, d), rnd(b, d, scale=0.5), rnd(*bc_shape), rnd(*bc_shape)
    A, D, dt_bias, cw, cb = -torch.rand(d, n, generator=g).to(device), rnd(d), rnd(d), rnd(d, w), rnd(d)
    views = {k: _view(t, aligned, seed=i) for i, (k, t) in enumerate({"x": x, "z": z, "B": B, "C": C}.items())}
    with ops.use_backend(backend):
        outs = []
        for xx, zz, BB, CC in ((x, z, B, C), tuple(views.values())):
            st, cst = state.clone(), conv_state.clone()
            y = ops.selective_state_update(st, xx, dt, A, BB, CC, D, zz, dt_bias, dt_softplus=True)
            yc = ops.causal_conv1d_update(xx, cst, cw, cb, activation="silu")
            outs.append((y, st, yc, cst))
    for a, c, name in zip(outs[1], outs[0], ("output", "state", "conv output", "conv state")):
        assert torch.equal(a, c), f"{name} differs with views"
    checked = _checks.check_selective_state_update(state, views["x"], dt, A, views["B"], views["C"], D, views["z"],
                                                   dt_bias)
    assert checked[0] is views["x"] and checked[3] is views["B"] and checked[4] is views["C"]
    assert checked[6] is views["z"]
    assert _checks.check_causal_conv1d_update(views["x"], conv_state, cw, cb, "silu")[0] is views["x"]


def test_a_transposed_input_is_still_copied():
    """An input whose last dimension is not unit-stride (a transposed (b, l, d) tensor) is copied by the checks,
    and gives the contiguous result."""
    x = torch.randn(2, 30, 8).transpose(1, 2)  # (b, d, l) with time stride 8
    w = torch.randn(8, 4)
    checked = _checks.check_causal_conv1d(x, w, None, None, None, None)[0]
    assert checked is not x and checked.is_contiguous()
    with ops.use_backend("cpu"):
        torch.testing.assert_close(ops.causal_conv1d(x, w), ops.causal_conv1d(x.contiguous(), w), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu"])
def test_mamba_lm_copies_no_activation(backend):
    """A MambaLM training forward at batch 2 (weight gradients on, so x and z are the halves of one in_proj
    output) and a batched decode step copy no tensor of the mixer's size: before, the checks copied x and z of
    every layer out of in_proj's output (2 per layer), and a decode step x, z, B and C."""
    _skip_unavailable(backend, "cpu")
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=64, d_state=8)
    lm = MambaLM(cfg).train()
    b, l = 2, 24
    ids = torch.randint(0, 64, (b, l), generator=torch.Generator().manual_seed(3))
    with ops.use_backend(backend):
        with CopyCounter({b * cfg.d_inner * l}) as seen:
            lm(ids).logits.sum().backward()
        assert seen.count == 0, seen.count
        lm.eval()
        with torch.inference_mode():
            cache = lm.allocate_cache(b)
            lm(ids[:, :5], cache=cache)
            for numel in (b * cfg.d_inner, b * cfg.d_state):
                with CopyCounter({numel}) as seen:
                    lm(ids[:, 5:6], cache=cache)
                assert seen.count == 0, (numel, seen.count)
