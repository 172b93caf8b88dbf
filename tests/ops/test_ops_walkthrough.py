"""A researcher's walkthrough of emma_mamba.ops used directly as a drop-in for mamba-ssm / causal-conv1d: inputs such a
user passes (views, expanded and offset tensors, degenerate sizes, dtype mixes, partial requires_grad, flags) on every
CPU-runnable backend, against an independent float64 oracle written here (plain loops over time, never the code under
test), plus the defects the walkthrough found:

* gradients of gradients (``create_graph=True``) through a kernel-backed op silently missed the op's part (its
  backward's outputs carry no graph); they are now refused with a message naming the op;
* the decode steps updated their state through its data pointer without bumping its version counter, so a tensor
  computed from the state and saved for backward before the step was silently read after it (wrong gradients);
* ``mamba_inner`` under ``torch.autocast`` with an fp32 x failed ("delta must have dtype float32"): autocast ran its
  x_proj / dt_proj GEMMs in bf16 beside the fp32 conv output, where the op's GEMMs run in x's dtype;
* ``selective_state_update`` refused D and dt_bias in x's dtype, which mamba-ssm's takes (its Mamba.step passes the
  module's own, bf16 in a bf16 model);
* the decode steps on the kernel backends returned outputs without gradients when their inputs required grad (a
  prefill-then-decode loss silently lost the decode part); they now run the differentiable reference then.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from emma_mamba import ops

from .test_mamba_inner import _skip_unavailable

CPU_BACKENDS = ["cpu", "torch", "cuda-emu", "triton"]
KERNEL_BACKENDS = ["cpu", "cuda-emu", "triton"]  # those whose backward is a kernel


def _use(backend):
    _skip_unavailable(backend, "cpu")
    return ops.use_backend(backend)


# ---------------------------------------------------------------------------------------------------------------
# the oracle: float64, one time step at a time, differentiable by autograd


def scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, init=None, seq_idx=None):
    u, delta, A = u.double(), delta.double(), A.double()
    b, d, l = u.shape
    n = A.shape[1]

    def at(X, t):  # B or C at step t as (b, d, n)
        X = X.double()
        if X.dim() == 2:
            return X[None].expand(b, d, n)
        if X.dim() == 3:
            return X[:, None, :, t].expand(b, d, n)
        return X[..., t].repeat_interleave(d // X.shape[1], dim=1)

    h = torch.zeros(b, d, n, dtype=torch.float64) if init is None else init.double()
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None]
        dt = delta[..., t] + (0 if delta_bias is None else delta_bias.double())
        if softplus:
            dt = F.softplus(dt)
        h = torch.exp(dt[..., None] * A) * h + dt[..., None] * at(B, t) * u[..., t, None]
        y = (h * at(C, t)).sum(-1)
        if D is not None:
            y = y + D.double() * u[..., t]
        if z is not None:
            y = y * F.silu(z[..., t].double())
        ys.append(y)
    return torch.stack(ys, -1), h


def conv64(x, w, bias=None, silu=False, init=None, seq_idx=None):
    b, d, l = x.shape
    W = w.shape[1]
    pad = init.double() if init is not None else torch.zeros(b, d, W - 1, dtype=torch.float64)
    xp = torch.cat([pad, x.double()], -1)
    outs = []
    for t in range(l):
        s = 0
        for k in range(W):
            p = t - (W - 1) + k  # input position of tap k; < 0: the initial states (the row's first sequence)
            v = xp[..., p + W - 1]
            if seq_idx is not None:
                v = v * (seq_idx[:, max(p, 0)] == seq_idx[:, t]).double()[:, None]
            s = s + w[:, k].double() * v
        if bias is not None:
            s = s + bias.double()
        outs.append(F.silu(s) if silu else s)
    return torch.stack(outs, -1)


def _rnd(*s, g, scale=1.0):
    return torch.randn(*s, generator=g) * scale


def _close(name, got, want, rtol=6e-4, atol=2e-3):
    assert got is not None, f"{name}: missing"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# selective_scan: layouts and flags against the oracle, outputs and every gradient


def _offset(t, pad):
    """t's values at a storage offset inside a larger buffer (contiguous, data_ptr not the buffer's)."""
    buf = torch.zeros(t.numel() + pad)
    v = buf[pad:].view(t.shape)
    v.copy_(t)
    return v


SCAN_LAYOUTS = {
    "transposed": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t,
    "strided": lambda t: torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0] if t.dim() >= 1 else t,
    "offset": lambda t: _offset(t, 3),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", list(SCAN_LAYOUTS))
def test_scan_views_and_flags_match_oracle(backend, layout):
    """Every input as a view of the given layout (NaN-filled gaps for strided ones), every flag on, variable B and
    constant C, packed sequences and an initial state: out, last state and every gradient."""
    g = torch.Generator().manual_seed(1)
    b, d, l, n = 2, 5, 9, 3
    vals = dict(u=_rnd(b, d, l, g=g), delta=_rnd(b, d, l, g=g, scale=0.5), A=-torch.rand(d, n, generator=g) - 0.2,
                B=_rnd(b, n, l, g=g), C=_rnd(d, n, g=g), D=_rnd(d, g=g), z=_rnd(b, d, l, g=g),
                delta_bias=_rnd(d, g=g, scale=0.3), initial_state=_rnd(b, d, n, g=g))
    seq = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2], [4, 4, 4, 4, 4, 4, 4, 4, 5]], dtype=torch.int32)
    leaves = {k: v.clone().requires_grad_() for k, v in vals.items()}
    args = {k: SCAN_LAYOUTS[layout](v) for k, v in leaves.items()}
    with _use(backend):
        out, last = ops.selective_scan(**args, delta_softplus=True, return_last_state=True, seq_idx=seq)
    dout, dlast = _rnd(*out.shape, g=g), _rnd(*last.shape, g=g)
    grads = torch.autograd.grad((out * dout).sum() + (last * dlast).sum(), list(leaves.values()))
    ref = {k: v.double().requires_grad_() for k, v in vals.items()}
    r_out, r_last = scan64(ref["u"], ref["delta"], ref["A"], ref["B"], ref["C"], ref["D"], ref["z"],
                           ref["delta_bias"], True, ref["initial_state"], seq)
    r_grads = torch.autograd.grad((r_out * dout.double()).sum() + (r_last * dlast.double()).sum(), list(ref.values()))
    _close("out", out, r_out)
    _close("last_state", last, r_last)
    for k, gk, rk in zip(vals, grads, r_grads):
        _close(f"d{k}", gk, rk, rtol=3e-3, atol=1e-2 * max(1.0, rk.abs().max().item()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scan_expanded_groups_and_partial_grads(backend):
    """Zero-stride inputs (B expanded over the batch, grouped C expanded over groups, D and delta_bias expanded from
    one value, z expanded over channels), d_state 1, gradients for only some inputs, and backward twice with
    retain_graph (the same gradients)."""
    g = torch.Generator().manual_seed(2)
    b, d, l, n, grp = 2, 6, 7, 1, 3
    u, delta = _rnd(b, d, l, g=g), _rnd(b, d, l, g=g, scale=0.5)
    A = -torch.rand(d, n, generator=g) - 0.2
    B1 = _rnd(1, n, l, g=g).requires_grad_()
    C1 = _rnd(b, 1, n, l, g=g).requires_grad_()
    D1, db1 = _rnd(1, g=g).requires_grad_(), _rnd(1, g=g)
    z1 = _rnd(b, 1, l, g=g).requires_grad_()
    u.requires_grad_()
    args = (u, delta, A, B1.expand(b, n, l), C1.expand(b, grp, n, l))
    kw = dict(D=D1.expand(d), z=z1.expand(b, d, l), delta_bias=db1.expand(d), delta_softplus=True)
    with _use(backend):
        out = ops.selective_scan(*args, **kw)
    dout = _rnd(*out.shape, g=g)
    wrt = [u, B1, C1, D1, z1]
    g1 = torch.autograd.grad((out * dout).sum(), wrt, retain_graph=True)
    g2 = torch.autograd.grad((out * dout).sum(), wrt)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c), "a second backward with retain_graph gave other gradients"
    ref = [t.detach().double().requires_grad_() for t in wrt]
    r_out, _ = scan64(ref[0], delta, A, ref[1].expand(b, n, l), ref[2].expand(b, grp, n, l), ref[3].expand(d),
                      ref[4].expand(b, d, l), db1.expand(d), True)
    rg = torch.autograd.grad((r_out * dout.double()).sum(), ref)
    _close("out", out, r_out)
    for name, a, c in zip(("u", "B", "C", "D", "z"), g1, rg):
        _close(f"d{name}", a, c, rtol=3e-3, atol=1e-2 * max(1.0, c.abs().max().item()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scan_mixed_dtypes_and_seqlen_one(backend):
    """bf16 u / delta / z with fp32 B and bf16 C; fp16 everything but A; seqlen 1 with an initial state."""
    g = torch.Generator().manual_seed(3)
    b, d, l, n = 2, 5, 6, 4
    u, delta, z = _rnd(b, d, l, g=g), _rnd(b, d, l, g=g, scale=0.5).abs(), _rnd(b, d, l, g=g)
    A, B, C, D = -torch.rand(d, n, generator=g) - 0.2, _rnd(b, n, l, g=g), _rnd(b, n, l, g=g), _rnd(d, g=g)
    for dt, Bd, (rtol, atol) in ((torch.bfloat16, torch.float32, (3e-2, 5e-2)),
                                 (torch.float16, torch.float16, (3e-3, 5e-3))):
        ins = (u.to(dt), delta.to(dt), A, B.to(Bd), C.to(dt))
        with _use(backend):
            out, last = ops.selective_scan(*ins, D=D, z=z.to(dt), return_last_state=True)
        r_out, r_last = scan64(*ins, D=D, z=z.to(dt))
        assert out.dtype == dt and last.dtype == torch.float32
        _close(f"out {dt}", out, r_out, rtol, atol)
        _close(f"last {dt}", last, r_last, rtol, atol)
    init = _rnd(b, d, n, g=g)
    with _use(backend):
        out, last = ops.selective_scan(u[..., :1], delta[..., :1], A, B[..., :1], C[..., :1], D=D, z=z[..., :1],
                                       return_last_state=True, initial_state=init)
    r_out, r_last = scan64(u[..., :1], delta[..., :1], A, B[..., :1], C[..., :1], D=D, z=z[..., :1], init=init)
    _close("out l=1", out, r_out)
    _close("last l=1", last, r_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_degenerate_sizes(backend):
    """batch 0 and dim 0 give empty results and empty / zero gradients; seqlen 0 and d_state 0 are named errors."""
    for b, d in ((0, 4), (2, 0)):
        u = torch.randn(b, d, 5, requires_grad=True)
        A = (-torch.rand(d, 3)).requires_grad_()
        B = torch.randn(b, 3, 5, requires_grad=True)
        w = torch.randn(d, 4, requires_grad=True)
        with _use(backend):
            out, last = ops.selective_scan(u, torch.rand(b, d, 5), A, B, B, return_last_state=True)
            co = ops.causal_conv1d(u, w, None, "silu")
        assert out.shape == (b, d, 5) and last.shape == (b, d, 3) and co.shape == (b, d, 5)
        (out.sum() + last.sum() + co.sum()).backward()
        assert u.grad.shape == u.shape and A.grad.shape == A.shape and B.grad.shape == B.shape
        assert not A.grad.any() and not w.grad.any()
        st = torch.randn(b, d, 3)
        with _use(backend):
            assert ops.selective_state_update(st, torch.randn(b, d), torch.rand(b, d), A.detach(), torch.randn(b, 3),
                                              torch.randn(b, 3)).shape == (b, d)
            assert ops.causal_conv1d_update(torch.randn(b, d), torch.randn(b, d, 4), w.detach()).shape == (b, d)
    with _use(backend):
        with pytest.raises(ops.OpInputError, match=r"seqlen \(u.shape\[2\]\) must be at least 1"):
            ops.selective_scan(torch.randn(2, 4, 0), torch.rand(2, 4, 0), -torch.rand(4, 3), torch.randn(4, 3),
                               torch.randn(4, 3))
        with pytest.raises(ops.OpInputError, match=r"dstate \(A.shape\[1\]\) must be at least 1"):
            ops.selective_scan(torch.randn(2, 4, 5), torch.rand(2, 4, 5), -torch.rand(4, 0), torch.randn(4, 0),
                               torch.randn(4, 0))
        with pytest.raises(ops.OpInputError, match=r"seqlen \(x.shape\[2\]\) must be at least 1"):
            ops.causal_conv1d(torch.randn(2, 4, 0), torch.randn(4, 4))
        with pytest.raises(ops.OpInputError, match=r"u must be float32, float16 or bfloat16, got torch.float64"):
            ops.selective_scan(torch.randn(2, 4, 5).double(), torch.rand(2, 4, 5).double(), -torch.rand(4, 3),
                               torch.randn(4, 3), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------------------------
# causal_conv1d


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_conv_views_dtypes_and_packing(backend, width):
    """x strided (every other column), transposed weight, bias expanded, transposed initial states, packed sequences
    (a row starting at id 4); fp32 and bf16 x with fp32 weight; odd dims; gradients of x, weight, bias and the
    initial states against the oracle."""
    g = torch.Generator().manual_seed(4)
    b, d, l = 2, 7, 9
    vals = dict(x=_rnd(b, d, l, g=g), weight=_rnd(d, width, g=g, scale=0.5), bias=_rnd(d, g=g, scale=0.1),
                initial_states=_rnd(b, d, width - 1, g=g))
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [4, 4, 4, 4, 4, 4, 4, 4, 5]], dtype=torch.int32)
    lay = dict(x=lambda t: torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0],
               weight=lambda t: t.t().contiguous().t(), bias=lambda t: t[:, None].expand(d, 3)[:, 1],
               initial_states=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))
    for dtype, (rtol, atol) in ((torch.float32, (6e-4, 2e-3)), (torch.bfloat16, (3e-2, 5e-2))):
        leaves = {k: (v.to(dtype) if k in ("x", "initial_states") else v).clone().requires_grad_()
                  for k, v in vals.items()}
        args = {k: lay[k](v) for k, v in leaves.items()}
        with _use(backend):
            out = ops.causal_conv1d(**args, activation="silu", seq_idx=seq)
        assert out.dtype == dtype
        dout = _rnd(*out.shape, g=g).to(dtype)
        grads = torch.autograd.grad((out * dout).float().sum(), list(leaves.values()))
        ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
        r = conv64(ref["x"], ref["weight"], ref["bias"], True, ref["initial_states"], seq)
        r_grads = torch.autograd.grad((r * dout.double()).sum(), list(ref.values()))
        _close(f"out {dtype}", out, r, rtol, atol)
        for k, a, c in zip(leaves, grads, r_grads):
            _close(f"d{k} {dtype}", a, c, rtol * 5, atol * 10)


# ---------------------------------------------------------------------------------------------------------------
# decode steps


def _step64(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus=False):
    b, d, n = state.shape
    h = state.double().clone()
    out = torch.zeros(b, d, dtype=torch.float64)
    for i in range(b):
        for c in range(d):
            t = float(dt[i, c]) + (0.0 if dt_bias is None else float(dt_bias[c]))
            if softplus:
                t = math.log1p(math.exp(t))
            y = 0.0
            for k in range(n):
                bb = float(B[i, k] if B.dim() == 2 else B[i, c // (d // B.shape[1]), k])
                cc = float(C[i, k] if C.dim() == 2 else C[i, c // (d // C.shape[1]), k])
                h[i, c, k] = math.exp(t * float(A[c, k])) * float(h[i, c, k]) + t * bb * float(x[i, c])
                y += float(h[i, c, k]) * cc
            y += 0.0 if D is None else float(D[c]) * float(x[i, c])
            if z is not None:
                y *= float(F.silu(z[i, c].double()))
            out[i, c] = y
    return out, h


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_update_layouts_groups_and_dtypes(backend):
    """x / dt / z as transposed and strided views, B expanded over the batch, B and C of different group counts, a
    bf16 state; the state updated in place and the output against the oracle."""
    g = torch.Generator().manual_seed(5)
    b, d, n = 3, 6, 5
    st = _rnd(b, d, n, g=g)
    x, dt, z = _rnd(b, d, g=g), torch.rand(b, d, generator=g), _rnd(b, d, g=g)
    A, D, db = -torch.rand(d, n, generator=g) - 0.1, _rnd(d, g=g), _rnd(d, g=g, scale=0.2)
    cases = [
        ("views", st, x.t().contiguous().t(), torch.stack([dt, dt], -1)[..., 0], _rnd(1, n, g=g).expand(b, n),
         _rnd(b, n, g=g), z.t().contiguous().t(), (6e-4, 2e-3)),
        ("groups 3/2", st, x, dt, _rnd(b, 3, n, g=g), _rnd(b, 2, n, g=g), z, (6e-4, 2e-3)),
        ("bf16 state", st.bfloat16(), x, dt, _rnd(b, n, g=g), _rnd(b, n, g=g), None, (3e-2, 5e-2)),
    ]
    for name, s0, xx, dd, B, C, zz, (rtol, atol) in cases:
        s = s0.clone()
        with _use(backend):
            out = ops.selective_state_update(s, xx, dd, A, B, C, D, z=zz, dt_bias=db, dt_softplus=True)
        r_out, r_state = _step64(s0, xx, dd, A, B, C, D, zz, db, True)
        _close(f"{name}: out", out, r_out, rtol, atol)
        _close(f"{name}: state", s, r_state, rtol, atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_update_takes_D_and_dt_bias_in_x_dtype(backend):
    """mamba-ssm's Mamba.step passes the module's own D and dt_proj.bias, bf16 in a bf16 model; they were refused
    ("D must have dtype in (float32)"). They now give what their fp32 values give."""
    g = torch.Generator().manual_seed(6)
    b, d, n = 2, 4, 3
    st = _rnd(b, d, n, g=g)
    x, dt = _rnd(b, d, g=g).bfloat16(), torch.rand(b, d, generator=g).bfloat16()
    A, B, C = -torch.rand(d, n, generator=g), _rnd(b, n, g=g).bfloat16(), _rnd(b, n, g=g).bfloat16()
    D, db = _rnd(d, g=g).bfloat16(), _rnd(d, g=g).bfloat16()
    s1, s2 = st.clone(), st.clone()
    with _use(backend):
        o1 = ops.selective_state_update(s1, x, dt, A, B, C, D, dt_bias=db, dt_softplus=True)
        o2 = ops.selective_state_update(s2, x, dt, A, B, C, D.float(), dt_bias=db.float(), dt_softplus=True)
        with pytest.raises(ops.OpInputError, match=r"D must have dtype in \(float32, bfloat16\), got float16"):
            ops.selective_state_update(st.clone(), x, dt, A, B, C, D.half())
    assert torch.equal(o1, o2) and torch.equal(s1, s2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conv_update_layouts_and_dtypes(backend):
    g = torch.Generator().manual_seed(7)
    for w in (2, 3, 4):
        b, d = 3, 7
        st, wt, bias = _rnd(b, d, w, g=g), _rnd(d, w, g=g), _rnd(d, g=g)
        for name, x, s0, (rtol, atol) in (("strided x", _rnd(b, 3 * d, g=g)[:, ::3], st, (6e-4, 2e-3)),
                                          ("bf16 state", _rnd(b, d, g=g), st.bfloat16(), (3e-2, 5e-2))):
            s = s0.clone()
            with _use(backend):
                out = ops.causal_conv1d_update(x, s, wt.t().contiguous().t(), bias, "silu")
            want_state = torch.cat([s0.double()[..., 1:], x.double()[..., None]], -1)
            want = F.silu((want_state * wt.double()).sum(-1) + bias.double())
            _close(f"w{w} {name}: out", out, want, rtol, atol)
            _close(f"w{w} {name}: state", s, want_state, rtol, atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_steps_bump_the_state_version(backend):
    """The decode steps write their state in place: a tensor computed from the state and saved for backward before
    the step must not be read after it. The kernels wrote through the data pointer without bumping the version
    counter, so autograd silently used the new values (wrong gradients); torch's in-place ops raise."""
    b, d, n, w = 2, 4, 3, 4
    x, dt, A = torch.randn(b, d), torch.rand(b, d), -torch.rand(d, n)
    p = torch.randn(b, d, n, requires_grad=True)
    state = p * 2
    y = (state ** 2).sum()  # pow saves state
    v = state._version
    with _use(backend):
        ops.selective_state_update(state, x, dt, A, torch.randn(b, n), torch.randn(b, n))
    assert state._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    q = torch.randn(b, d, w, requires_grad=True)
    conv_state = q * 2
    y = (conv_state ** 2).sum()
    with _use(backend):
        ops.causal_conv1d_update(x, conv_state, torch.randn(d, w))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_steps_are_differentiable_over_several_steps(backend, caplog):
    """A loss through decode steps (truncated BPTT, RL on sampled continuations): the gradient of every input of
    three steps, against float64 autograd of the steps written out by hand. The kernels' steps have no backward:
    with an input requiring grad the op runs the reference (said once), where it returned outputs without a
    gradient; the reference itself saved the state it then overwrote (an autograd error from the second step)."""
    b, d, n, w, steps = 2, 5, 3, 4, 3
    g = torch.Generator().manual_seed(7)
    vals = {"state": _rnd(b, d, n, g=g), "A": -torch.rand(d, n, generator=g), "D": _rnd(d, g=g),
            "dt_bias": _rnd(d, g=g), "xs": _rnd(steps, b, d, g=g), "dts": _rnd(steps, b, d, g=g),
            "Bs": _rnd(steps, b, n, g=g), "Cs": _rnd(steps, b, n, g=g), "zs": _rnd(steps, b, d, g=g)}
    leaves = {k: v.clone().requires_grad_() for k, v in vals.items()}
    state = leaves["state"] * 1.0  # a non-leaf state, updated in place
    ops._STEP_GRAD_SAID.clear()
    with _use(backend), caplog.at_level("WARNING", logger="emma_mamba.ops"):
        ys = [ops.selective_state_update(state, leaves["xs"][t], leaves["dts"][t], leaves["A"], leaves["Bs"][t],
                                         leaves["Cs"][t], leaves["D"], leaves["zs"][t], leaves["dt_bias"],
                                         dt_softplus=True) for t in range(steps)]
        (sum(y.sin().sum() * (t + 1) for t, y in enumerate(ys)) + state.cos().sum()).backward()
    assert ("selective_state_update: an input requires grad" in caplog.text) == (backend != "torch")
    r = {k: v.double().requires_grad_() for k, v in vals.items()}
    h, want = r["state"], []
    for t in range(steps):
        delta = F.softplus(r["dts"][t] + r["dt_bias"])
        h = h * torch.exp(delta[..., None] * r["A"]) + (delta * r["xs"][t])[..., None] * r["Bs"][t][:, None]
        want.append(((h * r["Cs"][t][:, None]).sum(-1) + r["D"] * r["xs"][t]) * F.silu(r["zs"][t]))
    (sum(y.sin().sum() * (t + 1) for t, y in enumerate(want)) + h.cos().sum()).backward()
    for t in range(steps):
        _close(f"out {t}", ys[t].detach(), want[t].detach())
    for k in vals:
        _close(f"d{k}", leaves[k].grad, r[k].grad)
    # the conv step, three steps too
    cv = {"xs": _rnd(steps, b, d, g=g), "conv_state": _rnd(b, d, w, g=g), "weight": _rnd(d, w, g=g),
          "bias": _rnd(d, g=g)}
    cl = {k: v.clone().requires_grad_() for k, v in cv.items()}
    cs = cl["conv_state"] * 1.0
    with _use(backend):
        outs = [ops.causal_conv1d_update(cl["xs"][t], cs, cl["weight"], cl["bias"], activation="silu")
                for t in range(steps)]
        (sum(o.sin().sum() * (t + 1) for t, o in enumerate(outs)) + cs.cos().sum()).backward()
    rc = {k: v.double().requires_grad_() for k, v in cv.items()}
    window, want = rc["conv_state"], []
    for t in range(steps):
        window = torch.cat([window[..., 1:], rc["xs"][t][..., None]], -1)
        want.append(F.silu((window * rc["weight"]).sum(-1) + rc["bias"]))
    (sum(o.sin().sum() * (t + 1) for t, o in enumerate(want)) + window.cos().sum()).backward()
    for t in range(steps):
        _close(f"conv out {t}", outs[t].detach(), want[t].detach())
    for k in cv:
        _close(f"conv d{k}", cl[k].grad, rc[k].grad)


# ---------------------------------------------------------------------------------------------------------------
# autograd modes


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_is_refused_not_silently_wrong(backend):
    """A gradient penalty through a kernel-backed op: torch.autograd.grad(..., create_graph=True) then a gradient of
    that gradient. The kernels' gradients carry no graph, so the second derivative silently lacked the op's part
    (torch's once_differentiable does not catch autograd.grad(inputs=[w]) either); now an error naming the op."""
    g = torch.Generator().manual_seed(8)
    b, d, l, n = 1, 3, 5, 2
    u, w = _rnd(b, d, l, g=g).requires_grad_(), _rnd(d, 4, g=g).requires_grad_()
    delta, A, B = _rnd(b, d, l, g=g).abs(), -torch.rand(d, n, generator=g), _rnd(b, n, l, g=g)
    with _use(backend):
        out = ops.selective_scan(u, delta, A, B, B)
        co = ops.causal_conv1d(u, w, None, "silu")
    with pytest.raises(RuntimeError, match=r"emma_mamba.ops.selective_scan: gradients of gradients"):
        torch.autograd.grad(out.pow(2).sum() + u.pow(3).sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match=r"emma_mamba.ops.causal_conv1d: gradients of gradients"):
        torch.autograd.grad(co.pow(2).sum() + w.pow(3).sum(), w, create_graph=True)
    # a plain backward still works, and the torch backend differentiates twice
    gu, = torch.autograd.grad(out.pow(2).sum(), u)
    assert gu.shape == u.shape
    with ops.use_backend("torch"):
        out = ops.selective_scan(u, delta, A, B, B)
    gu, = torch.autograd.grad(out.pow(2).sum(), u, create_graph=True)
    assert gu.requires_grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mamba_inner_double_backward_is_refused(backend):
    g = torch.Generator().manual_seed(9)
    b, d, l, n, r = 1, 4, 6, 2, 2
    xz = _rnd(b, 2 * d, l, g=g).requires_grad_()
    x, z = xz.chunk(2, 1)
    with _use(backend):
        y = ops.mamba_inner(x, z, _rnd(d, 4, g=g), None, _rnd(r + 2 * n, d, g=g, scale=0.5),
                            _rnd(d, r, g=g, scale=0.5), -torch.rand(d, n, generator=g), _rnd(d, g=g))
    with pytest.raises(RuntimeError, match=r"emma_mamba.ops.mamba_inner: gradients of gradients"):
        torch.autograd.grad(y.pow(2).sum(), xz, create_graph=True)


@pytest.mark.parametrize("backend", ["cpu", "torch", "cuda-emu"])
def test_mamba_inner_under_autocast_with_fp32_x(backend):
    """mamba_inner (mamba_inner_fn's drop-in) called with fp32 x inside torch.autocast(bf16): it raised "delta must
    have dtype in (float32), got bfloat16" (autocast ran x_proj / dt_proj in bf16 beside the fp32 conv output). Its
    GEMMs run in x's dtype: the result and gradients equal those without autocast, bit for bit."""
    g = torch.Generator().manual_seed(10)
    b, d, l, n, r, M = 2, 4, 7, 2, 2, 3
    vals = dict(xz=_rnd(b, 2 * d, l, g=g), cw=_rnd(d, 4, g=g, scale=0.5), cb=_rnd(d, g=g, scale=0.1),
                xp=_rnd(r + 2 * n, d, g=g, scale=0.5), dtp=_rnd(d, r, g=g, scale=0.5),
                A=-torch.rand(d, n, generator=g) - 0.2, D=_rnd(d, g=g), db=_rnd(d, g=g, scale=0.3) - 1,
                ow=_rnd(M, d, g=g, scale=0.5))

    def run(autocast):
        lv = {k: v.clone().requires_grad_() for k, v in vals.items()}
        x, z = lv["xz"].chunk(2, 1)
        with _use(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = ops.mamba_inner(x, z, lv["cw"], lv["cb"], lv["xp"], lv["dtp"], lv["A"], lv["D"], lv["db"],
                                out_proj_weight=lv["ow"])
        return (y, *torch.autograd.grad(y.sum(), list(lv.values())))

    for a, c in zip(run(True), run(False)):
        assert a.dtype == c.dtype and torch.equal(a, c)


def test_threads_give_bitwise_equal_results():
    """The CPU kernels' outputs and gradients do not depend on the thread count (README: always deterministic)."""
    g = torch.Generator().manual_seed(11)
    b, d, l, n = 2, 40, 300, 5
    vals = [_rnd(b, d, l, g=g), _rnd(b, d, l, g=g, scale=0.1).abs(), -torch.rand(d, n, generator=g),
            _rnd(b, 2, n, l, g=g), _rnd(b, n, l, g=g), _rnd(d, g=g), _rnd(b, d, l, g=g), _rnd(d, 4, g=g)]
    seq = torch.zeros(b, l, dtype=torch.int32)
    seq[:, 100:] = 1
    seq[1, 250:] = 2
    dout = _rnd(b, d, l, g=g)

    def run(threads):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ins = [t.clone().requires_grad_() for t in vals]
            with ops.use_backend("cpu"):
                o, last = ops.selective_scan(*ins[:7], delta_softplus=True, return_last_state=True, seq_idx=seq)
                co = ops.causal_conv1d(ins[0], ins[7], None, "silu", seq_idx=seq)
            ((o * dout).sum() + last.pow(2).sum() + (co * dout).sum()).backward()
            return [o.detach(), last.detach(), co.detach()] + [t.grad for t in ins]
        finally:
            torch.set_num_threads(prev)

    for i, (a, c) in enumerate(zip(run(1), run(2))):
        assert torch.equal(a, c), f"result {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("backend", ["cpu", "torch", "cuda-emu"])
def test_no_grad_inference_mode_and_compile(backend):
    """no_grad / inference_mode run and give the grad-mode values; a torch.compile'd function (aot_eager) calling the
    conv and the scan on views gives eager's outputs and gradients."""
    g = torch.Generator().manual_seed(12)
    b, d, l, n = 2, 4, 9, 3
    xz, w = _rnd(b, 2 * d, l, g=g), _rnd(d, 4, g=g)
    delta, A, B = _rnd(b, d, l, g=g, scale=0.3).abs(), -torch.rand(d, n, generator=g), _rnd(b, n, 2 * l, g=g)[..., ::2]
    seq = torch.tensor([[0] * 4 + [1] * 5, [0] * 9], dtype=torch.int32)

    def f(xz, w, A):
        x, z = xz.chunk(2, 1)
        xc = ops.causal_conv1d(x, w, None, "silu", seq_idx=seq)
        return ops.selective_scan(xc, delta, A, B, B, None, z, None, True, True, None, seq)

    with _use(backend):
        with torch.no_grad():
            o_ng = f(xz, w, A)
        with torch.inference_mode():
            o_im = f(xz, w, A)
        ins = [t.clone().requires_grad_() for t in (xz, w, A)]
        o = f(*ins)
        torch._dynamo.reset()
        ins_c = [t.clone().requires_grad_() for t in (xz, w, A)]
        o_c = torch.compile(f, backend="aot_eager", fullgraph=True)(*ins_c)
    for a, c in zip(o_ng + o_im + o_c, o + o + o):
        assert torch.equal(a, c.detach())
    gr = torch.autograd.grad(o[0].sum() + o[1].sum(), ins)
    gr_c = torch.autograd.grad(o_c[0].sum() + o_c[1].sum(), ins_c)
    for a, c in zip(gr, gr_c):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
