"""selective_state_update with B and C in different group layouts ((b, n) and (b, g, n), or two group counts):
the op layer brings them to one layout, so every backend accepts what the reference accepts (the CUDA kernel
takes one group count for both). Oracle: the fp32 reference step on the original tensors."""

from __future__ import annotations

import pytest
import torch

from emma_mamba import ops
from emma_mamba.ops.reference import selective_state_update_ref

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda-emu", id="cuda-emu"),
            pytest.param("triton", id="triton-interp")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gb,gc,n", [(0, 2, 5), (4, 0, 5), (2, 3, 5), (2, 2, 128)],
                         ids=["Bflat-C2", "B4-Cflat", "B2-C3", "mamba2-B2-C2-n128"])
def test_mixed_group_layouts_match_the_reference(backend, gb, gc, n):
    if backend == "triton" and not ops._runs_on("triton", "cpu"):
        pytest.skip("the Triton interpreter is off")
    b, d = 3, 12
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B = r(b, n) if gb == 0 else r(b, gb, n)
    C = r(b, n) if gc == 0 else r(b, gc, n)
    x, dt, z, D, dt_bias = r(b, d), r(b, d) * 0.5, r(b, d), r(d), r(d) * 0.1
    A = -torch.rand(d, n, generator=g) - 0.1
    state = r(b, d, n)
    want_state = state.clone()

    def per_channel(X):  # (b, d, n) by hand: channel c reads group c * g // d of a g-group tensor
        X3 = X[:, None] if X.dim() == 2 else X
        return torch.stack([X3[:, c * X3.shape[1] // d] for c in range(d)], dim=1)

    want = selective_state_update_ref(want_state, x, dt, A, per_channel(B), per_channel(C), D, z, dt_bias, True)
    with ops.use_backend(backend):
        got = ops.selective_state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
