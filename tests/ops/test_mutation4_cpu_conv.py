"""The `cpu` backend's causal conv1d (csrc/cpu/causal_conv1d.cpp) on a case the other tests leave out: a second
packed sequence starting within the first W-1 steps of a row that has initial states. The initial states belong to
the row's first sequence only, so the taps of the new sequence's first outputs that reach before t = 0 read zero,
in the forward and in the backward (dx, dweight, dbias, dinitial_states). The random cuts of the other conv tests
rarely fall at t = 1 or 2. Oracle: the fp32 reference conv (causal_conv1d_ref) with autograd, and one output by
hand. (The decode steps of every backend: test_mutation4_decode_steps.py.)"""

from __future__ import annotations

import pytest
import torch

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
