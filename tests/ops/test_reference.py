"""The reference ops (the oracle of every kernel test) against independent hand computations in plain Python."""

import math

import numpy as np
import pytest
import torch

from emma_mamba.ops.reference import (causal_conv1d_ref, causal_conv1d_update_ref, selective_scan_ref,
                                      selective_state_update_ref)


def _softplus(x):
    return math.log1p(math.exp(x))


def _scan_python(u, delta, A, B, C, D, z, delta_bias, softplus, h0, seq):
    """Scalar loops over every (batch, channel, state): no tensors at all."""
    b, d, l = len(u), len(u[0]), len(u[0][0])
    n = len(A[0])
    out = [[[0.0] * l for _ in range(d)] for _ in range(b)]
    last = [[[0.0] * n for _ in range(d)] for _ in range(b)]
    for bi in range(b):
        for di in range(d):
            h = [h0[bi][di][k] for k in range(n)]
            for t in range(l):
                if t > 0 and seq[bi][t] != seq[bi][t - 1]:
                    h = [0.0] * n
                dt = delta[bi][di][t] + delta_bias[di]
                if softplus:
                    dt = _softplus(dt)
                y = 0.0
                for k in range(n):
                    h[k] = math.exp(dt * A[di][k]) * h[k] + dt * B[bi][k][t] * u[bi][di][t]
                    y += C[bi][k][t] * h[k]
                y += D[di] * u[bi][di][t]
                zz = z[bi][di][t]
                out[bi][di][t] = y * zz / (1 + math.exp(-zz))
            last[bi][di] = h
    return out, last


@pytest.mark.parametrize("softplus", [False, True])
def test_selective_scan_ref_matches_scalar_loops(softplus):
    b, d, n, l = 2, 3, 4, 9
    u, delta, z = torch.randn(b, d, l), torch.rand(b, d, l), torch.randn(b, d, l)
    A = -torch.rand(d, n) - 0.5
    B, C = torch.randn(b, n, l), torch.randn(b, n, l)
    D, bias, h0 = torch.randn(d), torch.rand(d) * 0.1, torch.randn(b, d, n)
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9], dtype=torch.int32)
    out, last = selective_scan_ref(u, delta, A, B, C, D, z, bias, softplus, True, h0, seq)
    eo, el = _scan_python(*(t.tolist() for t in (u, delta, A, B, C, D, z, bias)), softplus, h0.tolist(),
                          seq.tolist())
    torch.testing.assert_close(out, torch.tensor(eo), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, torch.tensor(el), rtol=1e-5, atol=1e-5)


def test_grouped_and_constant_bc_layouts_are_expansions_of_variable():
    b, d, n, l, g = 2, 4, 3, 5, 2
    u, delta, A = torch.randn(b, d, l), torch.rand(b, d, l), -torch.rand(d, n)
    Bg, Cg = torch.randn(b, g, n, l), torch.randn(b, g, n, l)
    out_g = selective_scan_ref(u, delta, A, Bg, Cg)
    for gi in range(g):  # channels of group gi see B[:, gi]
        sl = slice(gi * d // g, (gi + 1) * d // g)
        out_v = selective_scan_ref(u[:, sl], delta[:, sl], A[sl], Bg[:, gi], Cg[:, gi])
        torch.testing.assert_close(out_g[:, sl], out_v)
    Bc, Cc = torch.randn(d, n), torch.randn(d, n)
    out_c = selective_scan_ref(u, delta, A, Bc, Cc)
    for c in range(d):  # a constant B for one channel equals a variable B repeated over time
        Bv = Bc[c][None, :, None].expand(b, n, l)
        Cv = Cc[c][None, :, None].expand(b, n, l)
        torch.testing.assert_close(out_c[:, c:c + 1], selective_scan_ref(u[:, c:c + 1], delta[:, c:c + 1],
                                                                         A[c:c + 1], Bv, Cv))


def test_causal_conv1d_ref_matches_numpy_convolution():
    b, d, l, w = 2, 3, 11, 4
    x, weight, bias = torch.randn(b, d, l), torch.randn(d, w), torch.randn(d)
    init = torch.randn(b, d, w - 1)
    out = causal_conv1d_ref(x, weight, bias, "silu", init)
    for bi in range(b):
        for c in range(d):
            full = np.concatenate([init[bi, c].numpy(), x[bi, c].numpy()])
            # np.convolve flips its kernel: flip the weight back to get a correlation
            conv = np.convolve(full, weight[c].numpy()[::-1], mode="valid") + bias[c].item()
            expect = conv / (1 + np.exp(-conv))
            np.testing.assert_allclose(out[bi, c].numpy(), expect, rtol=1e-5, atol=1e-5)


def test_causal_conv1d_ref_seq_idx_equals_separate_samples():
    d, w = 3, 3
    lens = [4, 1, 6]
    xs = [torch.randn(1, d, n) for n in lens]
    weight, bias = torch.randn(d, w), torch.randn(d)
    seq = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lens)])[None]
    packed = causal_conv1d_ref(torch.cat(xs, -1), weight, bias, None, None, seq)
    sep = torch.cat([causal_conv1d_ref(x, weight, bias) for x in xs], -1)
    torch.testing.assert_close(packed, sep)


def test_decode_steps_equal_sequence_ops():
    b, d, n, l, w = 2, 5, 4, 7, 4
    u, delta, z = torch.randn(b, d, l), torch.randn(b, d, l), torch.randn(b, d, l)
    A, B, C = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l)
    D, bias = torch.randn(d), torch.randn(d)
    out, last = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, True)
    state = torch.zeros(b, d, n)
    steps = [selective_state_update_ref(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t],
                                        bias, True) for t in range(l)]
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)

    x, weight, cb = torch.randn(b, d, l), torch.randn(d, w), torch.randn(d)
    conv_state = torch.zeros(b, d, w)
    steps = [causal_conv1d_update_ref(x[..., t], conv_state, weight, cb, "silu") for t in range(l)]
    torch.testing.assert_close(torch.stack(steps, -1), causal_conv1d_ref(x, weight, cb, "silu"))
    torch.testing.assert_close(conv_state, x[..., -w:])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_causal_conv1d_keeps_a_nan_in_its_packed_sequence(backend):
    """Defect (the torch backend, the reference): taps from another sequence were masked by a product with 0,
    and NaN * 0 is NaN, so a NaN at sequence 0's end made sequence 1's first outputs NaN, and a NaN gradient in
    sequence 1 reached sequence 0's dx (the compiled kernels kept both in place). Oracle: each sequence alone."""
    from emma_mamba import ops

    torch.manual_seed(0)
    d, w, lens = 3, 4, (6, 5)
    x = torch.randn(1, d, sum(lens), dtype=torch.float32)
    x[0, :, lens[0] - 1] = float("nan")
    weight, bias = torch.randn(d, w), torch.randn(d)
    seq_idx = torch.tensor([[0] * lens[0] + [1] * lens[1]], dtype=torch.int32)
    xg = x.clone().requires_grad_(True)
    with ops.use_backend(backend):
        out = ops.causal_conv1d(xg, weight, bias, seq_idx=seq_idx, activation="silu")
    alone = causal_conv1d_ref(x[..., lens[0]:], weight, bias, activation="silu")
    torch.testing.assert_close(out[..., lens[0]:], alone)
    xg = x.nan_to_num().requires_grad_(True)  # finite inputs, a NaN gradient at sequence 1's first position
    with ops.use_backend(backend):
        out = ops.causal_conv1d(xg, weight, bias, seq_idx=seq_idx, activation="silu")
    g = torch.zeros_like(out)
    g[0, :, lens[0]] = float("nan")
    out.backward(g)
    assert torch.isfinite(xg.grad[..., :lens[0]]).all()
