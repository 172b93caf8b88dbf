"""Mutation round 4: the decode steps of every kernel backend (``cpu``, ``triton``, and csrc/cuda's under the emulator,
``cuda-emu``) on inputs the other decode tests leave out, or check only within a 16-bit tolerance.

* selective_state_update with large time steps: softplus(x) = log1p(exp(x)) still differs from x up to the
  kernels' x > 20 shortcut (the other decode tests draw dt + dt_bias below 2): dt + dt_bias in [2.2, 4] and on
  both sides of 20, and raw steps spread over [-8, 24] (a trained Mamba's dt bias is softplus^-1 of [1e-3, 0.1],
  about -7 to -2.3). Moving the threshold from 20 to 2 in any backend's step passed every other test.
* selective_state_update with dt_bias and no softplus: the bias is added whether or not softplus follows.
* selective_state_update with an fp32 x and a 16-bit state: the state is stored rounded to its dtype, but the
  output comes from the unrounded new state, as the reference step computes it, so it matches at fp32 accuracy
  (the shared checks compare it at the state dtype's tolerance, which let y from the re-read state pass).
* causal_conv1d_update with an fp32 x and a 16-bit conv state: x enters the state rounded to the state's dtype and
  the output is the conv over the state as written, as the reference step computes it from its state.

Oracles: the fp32 reference steps of emma_mamba.ops.reference on copies of the same tensors, and for the conv step
the sum over the written state by hand. Triton's interpreter truncates fp32 -> bf16 where torch rounds (see
test_triton_backend.py test_conv_update_keeps_state_dtype), so there the written conv state may differ from the
reference's by one bf16 step."""

from __future__ import annotations

import os

import pytest
import torch

from emma_mamba import ops
from emma_mamba.ops.reference import causal_conv1d_update_ref, selective_state_update_ref

from .test_cuda_backend import EMU, Target, _ready
from .tolerances import TOL

TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["cpu", "triton", "cuda-emu"])
def target(request) -> Target:
    if request.param == "cuda-emu":
        return _ready(EMU)  # builds the emulator once; a build error fails here
    t = Target(request.param, "cpu" if request.param == "cpu" else TRITON_DEV)
    status = ops.available_backends()[t.backend]
    if status != "available" or not ops._runs_on(t.backend, t.dev):
        pytest.skip(f"{t.backend} does not run on {t.dev} tensors here ({status})")
    return t


def _interpreted(t: Target) -> bool:
    return t.backend == "triton" and t.dev == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _inputs(b, d, n, seed, state_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(state=state_scale * r(b, d, n), x=r(b, d), A=-0.05 - 0.1 * torch.rand(d, n, generator=g),
                B=r(b, n), C=r(b, n), D=r(d), z=r(b, d)), g


def _check_step(t: Target, inp, dt, dt_bias, softplus, out_tol, state_tol, state_dtype=torch.float32):
    """One step on ``t`` and on the reference from the same state (in ``state_dtype``); output and new state
    compared at ``out_tol`` / ``state_tol`` (rtol, atol)."""
    state = inp["state"].to(state_dtype)
    want_state = state.clone()
    args = (inp["x"], dt, inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], dt_bias)
    want = selective_state_update_ref(want_state, *args, softplus)
    dev_state = state.clone().to(t.dev)
    with ops.use_backend(t.backend):
        got = ops.selective_state_update(dev_state, *[a.to(t.dev) for a in args], softplus).cpu()
    got_state = dev_state.cpu()
    assert got.dtype == torch.float32 and got_state.dtype == state_dtype
    torch.testing.assert_close(got, want, rtol=out_tol[0], atol=out_tol[1])
    torch.testing.assert_close(got_state, want_state, rtol=state_tol[0], atol=state_tol[1])


def test_softplus_of_a_large_dt_below_the_threshold(target):
    """dt + dt_bias in [2.2, 4] and around 20: softplus is log1p(exp(x)) up to 20 (torch's threshold)."""
    b, d = 2, 6
    inp, g = _inputs(b, d, 16, 0)
    dt = 2.0 + 1.8 * torch.rand(b, d, generator=g)
    dt[0, 0], dt[1, 0] = 19.6, 20.4  # both sides of the threshold (no bias on channel 0)
    dt_bias = torch.full((d,), 0.2)
    dt_bias[0] = 0.0
    _check_step(target, inp, dt, dt_bias, True, TOL[torch.float32], TOL[torch.float32])


def test_softplus_over_the_whole_range(target):
    """dt + dt_bias from -8 to 24: every regime of softplus."""
    b, d = 2, 16
    inp, _ = _inputs(b, d, 8, 3)
    inp["A"] = -0.5 - torch.rand(d, 8, generator=torch.Generator().manual_seed(4))
    dt = torch.linspace(-8.0, 24.0, b * d).view(b, d)
    _check_step(target, inp, dt, torch.linspace(-0.5, 0.5, d), True, (1e-4, 1e-4), (1e-4, 1e-4))


def test_dt_bias_without_softplus(target):
    inp, g = _inputs(2, 6, 16, 1)
    dt = 0.5 * torch.rand(2, 6, generator=g)
    _check_step(target, inp, dt, 0.5 + torch.rand(6, generator=g), False, TOL[torch.float32], TOL[torch.float32])


@pytest.mark.parametrize("state_scale", [1.0, 4.0])  # 4: |h| of a few units, a 16-bit rounding of h moves y far
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [16, 7])
def test_output_uses_the_unrounded_state(target, state_dtype, n, state_scale):
    b, d = 2, 8
    inp, g = _inputs(b, d, n, 5, state_scale)
    dt, dt_bias = 0.5 * torch.rand(b, d, generator=g), 0.5 * torch.rand(d, generator=g)
    _check_step(target, inp, dt, dt_bias, True, (1e-5, 1e-5), TOL[state_dtype], state_dtype)  # fp32 output


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_conv_update_output_from_the_written_state(target, state_dtype, bias):
    b, d, w = 2, 24, 4
    g = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(b, d, generator=g)  # fp32, far from the state dtype's grid
    weight = torch.randn(d, w, generator=g)
    bias_t = torch.randn(d, generator=g) if bias else None
    state0 = torch.randn(b, d, w, generator=g).to(state_dtype)
    ref_state = state0.clone()
    y_ref = causal_conv1d_update_ref(x, ref_state, weight, bias_t, None)
    state = state0.clone().to(target.dev)
    dev = lambda v: None if v is None else v.to(target.dev)  # noqa: E731
    with ops.use_backend(target.backend):
        y = ops.causal_conv1d_update(dev(x), state, dev(weight), dev(bias_t), None).cpu()
    state = state.cpu()
    assert y.dtype == torch.float32 and state.dtype == state_dtype
    torch.testing.assert_close(state[..., :-1], state0[..., 1:], rtol=0, atol=0)  # shifted exactly
    by_hand = (state.float() * weight).sum(-1) + (0 if bias_t is None else bias_t)  # the conv over the written state
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-5)
    if _interpreted(target):  # x truncated into the state, not rounded
        torch.testing.assert_close(state, ref_state, rtol=2.0**-7, atol=0)
        torch.testing.assert_close(y, y_ref, rtol=2.0**-7, atol=0.05)
    else:
        assert torch.equal(state, ref_state)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
