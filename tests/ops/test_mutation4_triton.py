"""Mutation round 4 of the `triton` backend: its decode steps (emma_mamba/kernels/state_update.py,
causal_conv1d.py) on inputs the other tests leave out, or check only within a 16-bit tolerance, and its scan on
seq_idx rows that do not start at 0.

* selective_state_update with dt + dt_bias well above 2: softplus(x) = log1p(exp(x)) differs from x up to torch's
  threshold 20 (the other decode tests draw dt + dt_bias below 2);
* selective_state_update with an fp32 x and a 16-bit state: the output comes from the fp32 updated state (as the
  reference step computes it), not from the state rounded to its dtype, so it matches at fp32 tolerance;
* causal_conv1d_update with an fp32 x and a 16-bit conv state: the output is computed from the state as written
  (x rounded to the state's dtype), as the reference step computes it from its state.

Oracles: the fp32 reference steps of emma_mamba.ops.reference, and for the conv step the hand sum over the state
the kernel wrote (Triton's interpreter truncates fp32 -> bf16 where torch rounds, see test_triton_backend.py
test_conv_update_keeps_state_dtype, so the written state may differ from the reference's by one bf16 step).

The scan: seq_idx ids are only compared between neighbouring steps, so a row may well start with sequence 3
(e.g. when the ids continue from the previous row of a packed batch). Step 0 never restarts the state, so the initial state still feeds the row's first sequence and
gets its gradient from it, in both forwards (chunked and sequential) and both backwards. The other seq_idx rows of
the tests all start at 0. Oracle: the fp32 reference scan (emma_mamba.ops.reference) with autograd."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as tests/conftest.py does)

pytest.importorskip("triton")

import emma_mamba.kernels as K  # noqa: E402
from emma_mamba import ops  # noqa: E402
from emma_mamba.ops.reference import causal_conv1d_update_ref, selective_state_update_ref  # noqa: E402

from .tolerances import TOL, check_scan  # noqa: E402

DEVICE = "cpu" if not torch.cuda.is_available() else "cuda"


@pytest.fixture(autouse=True)
def _needs_triton():
    if not ops._runs_on("triton", DEVICE):
        pytest.skip("the Triton interpreter is off")


def _ssu_inputs(b, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(state=r(b, d, n), x=r(b, d), A=-0.05 - 0.1 * torch.rand(d, n, generator=g), B=r(b, n), C=r(b, n),
                D=r(d), z=r(b, d)), g


def _ssu(inp, state, dt, dt_bias, softplus):
    args = [t.to(DEVICE) for t in (state, inp["x"], dt, inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], dt_bias)]
    with ops.use_backend("triton"):
        y = ops.selective_state_update(*args, softplus)
    return y.cpu(), args[0].cpu()


def test_softplus_of_a_large_dt_below_the_threshold():
    b, d, n = 2, 6, 16
    inp, g = _ssu_inputs(b, d, n, 0)
    dt = 2.0 + 1.8 * torch.rand(b, d, generator=g)
    dt[0, 0], dt[1, 0] = 19.6, 20.4  # both sides of the threshold (no bias on channel 0)
    dt_bias = torch.full((d,), 0.2)
    dt_bias[0] = 0.0
    want_state = inp["state"].clone()
    want = selective_state_update_ref(want_state, inp["x"], dt, inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                                      dt_bias, True)
    got, got_state = _ssu(inp, inp["state"].clone(), dt, dt_bias, True)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_state, want_state, rtol=rtol, atol=atol)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16])  # a bf16 rounding of h is far outside fp32 tolerance
def test_state_update_output_from_the_fp32_state(state_dtype):
    b, d, n = 2, 8, 16
    inp, g = _ssu_inputs(b, d, n, 1)
    inp["state"] = 4 * inp["state"]  # |h| of a few units: a 16-bit rounding of h moves y well past fp32 tolerance
    dt, dt_bias = 0.5 * torch.rand(b, d, generator=g), 0.5 * torch.rand(d, generator=g)
    state = inp["state"].to(state_dtype)
    want_state = state.clone()
    want = selective_state_update_ref(want_state, inp["x"], dt, inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                                      dt_bias, True)
    got, got_state = _ssu(inp, state, dt, dt_bias, True)
    assert got.dtype == torch.float32 and got_state.dtype == state_dtype
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_state, want_state, rtol=TOL[state_dtype][0], atol=TOL[state_dtype][1])


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_conv_update_output_from_the_written_state(state_dtype):
    b, d, w = 2, 24, 4
    g = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(b, d, generator=g)  # fp32, far from the state dtype's grid
    weight, bias = torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    state0 = torch.randn(b, d, w, generator=g).to(state_dtype)
    ref_state = state0.clone()
    y_ref = causal_conv1d_update_ref(x, ref_state, weight, bias, None)
    state = state0.clone().to(DEVICE)
    with ops.use_backend("triton"):
        y = ops.causal_conv1d_update(x.to(DEVICE), state, weight.to(DEVICE), bias.to(DEVICE), None)
    y, state = y.cpu(), state.cpu()
    assert y.dtype == torch.float32 and state.dtype == state_dtype
    torch.testing.assert_close(state[..., :-1], state0[..., 1:], rtol=0, atol=0)  # shifted exactly
    torch.testing.assert_close(state, ref_state, rtol=2.0**-7, atol=0)  # x rounded (or truncated) into the state
    by_hand = (state.float() * weight).sum(-1) + bias  # what the output must be: the conv over the written state
    torch.testing.assert_close(y, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=2.0**-7, atol=0.05)


def _scan_inputs(b=2, d=4, n=4, l=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    seq = torch.full((b, l), 3, dtype=torch.int32)
    seq[0, 7:] = 4  # row 0: sequences 3 then 4
    seq[1, :] = 9   # row 1: one sequence, id 9
    return dict(u=r(b, d, l), delta=0.5 * torch.rand(b, d, l, generator=gen), A=-0.5 - torch.rand(d, n, generator=gen),
                B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=0.5 * torch.rand(d, generator=gen),
                initial_state=r(b, d, n), seq_idx=seq)


@pytest.mark.parametrize("fwd,bwd", [("chunked", "chunked"), ("sequential", "sequential")])
def test_a_row_whose_first_sequence_id_is_not_zero(fwd, bwd, monkeypatch):
    monkeypatch.setattr(K.selective_scan, "FWD_IMPL", fwd)
    monkeypatch.setattr(K.selective_scan, "BWD_IMPL", bwd)
    check_scan(_scan_inputs(), "triton", DEVICE, True, True)
