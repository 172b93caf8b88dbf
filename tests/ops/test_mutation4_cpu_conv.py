"""The `cpu` backend's causal conv1d (csrc/cpu/causal_conv1d.cpp) on two cases the other tests leave out.

* A second packed sequence starting within the first W-1 steps of a row that has initial states: the initial
  states belong to the row's first sequence only, so the taps of the new sequence's first outputs that reach
  before t = 0 read zero, in the forward and in the backward (dx, dweight, dbias, dinitial_states). The random
  cuts of the other conv tests rarely fall at t = 1 or 2. Oracle: the fp32 reference conv (causal_conv1d_ref)
  with autograd, and one output by hand.
* The decode step with an fp32 x and a 16-bit conv state: the output is computed from the state, i.e. from x
  rounded to the state's dtype, as the reference step (causal_conv1d_update_ref) computes it."""

from __future__ import annotations

import pytest
import torch

from emma_mamba import ops
from emma_mamba.ops.reference import causal_conv1d_update_ref

from .tolerances import TOL, assert_close, conv_on_backends

pytest.importorskip("emma_mamba._C")


@pytest.mark.parametrize("w,cut", [(4, 1), (4, 2), (3, 1)])
@pytest.mark.parametrize("act", [None, "silu"])
def test_initial_states_stay_in_the_first_sequence(w, cut, act):
    b, d, l = 2, 3, 9
    g = torch.Generator().manual_seed(w * 10 + cut)
    inputs = dict(x=torch.randn(b, d, l, generator=g), weight=torch.randn(d, w, generator=g),
                  bias=torch.randn(d, generator=g), initial_states=torch.randn(b, d, w - 1, generator=g))
    seq_idx = torch.zeros(b, l, dtype=torch.int32)
    seq_idx[0, cut:] = 1  # row 0: a new sequence at t = cut < W - 1
    seq_idx[1, cut:] = 4
    seq_idx[1, cut + 3:] = 7
    dout = torch.randn(b, d, l, generator=g)
    res = conv_on_backends(("cpu", "torch"), inputs, dout, "cpu", act, seq_idx)
    rtol, atol = TOL[torch.float32]
    assert_close("out", res["cpu"][0], res["torch"][0], rtol, atol)
    assert set(res["cpu"][1]) == set(res["torch"][1])
    for k, want in res["torch"][1].items():
        assert_close(f"d{k}", res["cpu"][1][k], want, rtol, atol)
    # the hand-checkable part: output t = cut of row 0 reads no initial state (its taps before 0 are zero)
    x, wt, bias = inputs["x"], inputs["weight"], inputs["bias"]
    pre = bias + sum(wt[:, k] * x[0, :, cut - (w - 1) + k] for k in range(w) if cut - (w - 1) + k >= cut)
    want_t = pre if act is None else torch.nn.functional.silu(pre)
    torch.testing.assert_close(res["cpu"][0][0, :, cut], want_t, rtol=rtol, atol=atol)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_update_output_sees_the_state_rounding_of_x(state_dtype, bias):
    """causal_conv1d_update with an fp32 x and a 16-bit state: x enters the state rounded to the state's dtype,
    and the output is computed from the state (as the reference step computes it), so it carries that rounding:
    fp32 output within fp32 summation-order error of the reference, not within a 16-bit step."""
    b, d, w = 2, 24, 4
    g = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(b, d, generator=g)  # fp32, far from the state dtype's grid
    weight = torch.randn(d, w, generator=g)
    bias_t = torch.randn(d, generator=g) if bias else None
    state = torch.randn(b, d, w, generator=g).to(state_dtype)
    want_state = state.clone()
    with ops.use_backend("cpu"):
        got = ops.causal_conv1d_update(x, state, weight, bias_t, None)
    want = causal_conv1d_update_ref(x, want_state, weight, bias_t, None)
    assert got.dtype == torch.float32 and state.dtype == state_dtype
    assert torch.equal(state, want_state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
