"""The `cpu` backend's decode step (csrc/cpu/selective_scan.cpp selective_state_update) on inputs the other tests
leave out: dt + dt_bias well above 2 (softplus(x) = x + log1p(exp(-x)) still differs from x there; only above
torch's threshold 20 is it x), and dt_bias without softplus (the bias is added whether or not softplus follows).
Oracle: the fp32 reference step (emma_mamba.ops.reference.selective_state_update_ref) on a copy of the state."""

from __future__ import annotations

import pytest
import torch

from emma_mamba import ops
from emma_mamba.ops.reference import selective_state_update_ref

from .tolerances import TOL

pytest.importorskip("emma_mamba._C")


def _inputs(b=2, d=6, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(state=r(b, d, n), x=r(b, d), A=-0.05 - 0.1 * torch.rand(d, n, generator=g), B=r(b, n), C=r(b, n),
                D=r(d), z=r(b, d)), g


def _check(inp, dt, dt_bias, softplus):
    state = inp["state"].clone()
    want_state = inp["state"].clone()
    args = (inp["x"], dt, inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], dt_bias, softplus)
    with ops.use_backend("cpu"):
        got = ops.selective_state_update(state, *args)
    want = selective_state_update_ref(want_state, *args)
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(state, want_state, rtol=rtol, atol=atol)


def test_softplus_of_a_large_dt_below_the_threshold():
    """dt + dt_bias in [2.2, 4] and around 20: softplus is log1p(exp(x)) up to 20 (torch's threshold)."""
    inp, g = _inputs()
    dt = 2.0 + 1.8 * torch.rand(2, 6, generator=g)
    dt[0, 0], dt[1, 0] = 19.6, 20.4  # both sides of the threshold (the bias below is 0.2 on channel 0)
    dt_bias = torch.full((6,), 0.2)
    dt_bias[0] = 0.0
    _check(inp, dt, dt_bias, True)


def test_dt_bias_without_softplus():
    inp, g = _inputs(seed=1)
    dt = 0.5 * torch.rand(2, 6, generator=g)
    _check(inp, dt, 0.5 + torch.rand(6, generator=g), False)
