"""The `cpu` backend (C++ kernels in csrc/cpu) against the fp32 reference ops (emma_mamba.ops.reference).

Covers the grid of DESIGN.md without a full cartesian product: every flag of selective_scan (z, D,
delta_bias, softplus, constant/variable/grouped B and C, B/C in fp32 under bf16 inputs, initial_state,
seq_idx) is on and off across the seqlens 1, 7, 128, 1000, 2049, 4096 (lengths below, at and beyond one
chunk, and with a one-step last chunk), in fp32 and bf16; outputs, last state and every gradient (including
dinitial_state and gradients arriving through the last state) with the tolerances of DESIGN.md (those of
mamba-ssm's tests). Also: every instruction-set path of the kernels, determinism, the decode step against the
scan, packed rows against their samples, causal_conv1d forward/backward/update.
"""

from __future__ import annotations

import os

import pytest
import torch

import emma_mamba.ops as ops
from emma_mamba.ops import reference as ref

from .tolerances import TOL, assert_close

_C = pytest.importorskip("emma_mamba._C")



def _tolerances(dtype):
    """(rtol, atol) for outputs, and for weight gradients (mamba-ssm: 1e-3, raised to rtol/atol below fp32)."""
    rtol, atol = TOL[dtype]
    return (rtol, atol), (max(1e-3, rtol), max(1e-3, atol))


def _seq_idx(b, l, nseg, gen):
    """int32 (b, l), nondecreasing, about nseg segments per row (row 1 has a different cut than row 0)."""
    rows = []
    for r in range(b):
        cuts = torch.randperm(max(l - 1, 1), generator=gen)[: min(nseg - 1, max(l - 1, 0))] + 1 if l > 1 else []
        row = torch.zeros(l, dtype=torch.int32)
        for c in (cuts.tolist() if l > 1 else []):
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows)


def make_scan_inputs(b=2, d=8, n=8, l=64, dtype=torch.float32, bc="var", groups=2, bc_fp32=False, z=True,
                     D=True, delta_bias=True, softplus=True, init=False, seq=False, seed=0):
    """Leaf tensors (requires_grad) for selective_scan, in the value ranges of mamba-ssm's tests."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype, scale=1.0, uniform=False, offset=0.0):
        x = torch.rand(*shape, generator=gen) if uniform else torch.randn(*shape, generator=gen)
        return (x * scale + offset).to(dt).requires_grad_()

    bcdt = torch.float32 if bc_fp32 else dtype
    if bc == "const":
        B, C = rnd(d, n, dt=torch.float32), rnd(d, n, dt=torch.float32)
    elif bc == "var":
        B, C = rnd(b, n, l, dt=bcdt), rnd(b, n, l, dt=bcdt)
    else:
        B, C = rnd(b, groups, n, l, dt=bcdt), rnd(b, groups, n, l, dt=bcdt)
    return dict(
        u=rnd(b, d, l),
        delta=rnd(b, d, l, uniform=True, scale=0.5),
        A=rnd(d, n, dt=torch.float32, uniform=True, scale=-0.5, offset=-0.25),
        B=B, C=C,
        D=rnd(d, dt=torch.float32) if D else None,
        z=rnd(b, d, l) if z else None,
        delta_bias=rnd(d, dt=torch.float32, uniform=True, scale=0.5, offset=-0.25) if delta_bias else None,
        delta_softplus=softplus,
        initial_state=rnd(b, d, n, dt=torch.float32) if init else None,
        seq_idx=_seq_idx(b, l, 3, gen) if seq else None,
    )


def _clone_leaves(inp):
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) and
                v.is_floating_point() else v) for k, v in inp.items()}


def run_scan(backend, inp, dout_seed=1, with_last_grad=True):
    """Forward with return_last_state, backward of <out, dout> + <last, dlast>; returns (out, last, grads)."""
    inp = _clone_leaves(inp)
    with ops.use_backend(backend):
        out, last = ops.selective_scan(return_last_state=True, **inp)
    gen = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    loss = (out.float() * dout.float()).sum()
    if with_last_grad:
        loss = loss + (last * torch.randn(last.shape, generator=gen)).sum()
    leaves = {k: v for k, v in inp.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, last, dict(zip(leaves, grads))


def assert_scan_matches_reference(inp, with_last_grad=True):
    dtype = inp["u"].dtype
    (rtol, atol), (rtolw, atolw) = _tolerances(dtype)
    out, last, grads = run_scan("cpu", inp, with_last_grad=with_last_grad)
    out_r, last_r, grads_r = run_scan("torch", inp, with_last_grad=with_last_grad)
    assert_close("out", out, out_r, rtol, atol)
    assert_close("last_state", last, last_r, *TOL[torch.float32])  # fp32 in both, from the same inputs
    per_grad = {"u": (2 * rtol, 2 * atol), "delta": (5 * rtol, 10 * atol), "z": (rtol, atol)}
    assert set(grads) == set(grads_r)
    for name in grads_r:
        assert_close(f"d{name}", grads[name], grads_r[name], *per_grad.get(name, (rtolw, atolw)))


# (seqlen, dtype, B/C layout, options): every flag on and off across the seqlens, plus combinations.
# The reference's backward costs O(l^2 * b * d * n) (each time step's indexing allocates a full-size
# gradient), so the longest cases use few channels and states: the chunk logic sees the same thing.
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SMALL = dict(b=1, d=2, n=3)
GRID = [
    (1, F32, "var", dict(z=False, D=True, delta_bias=False, softplus=False)),
    (1, BF16, "const", dict(init=True)),
    (7, F32, "grp", dict(z=True, D=False, delta_bias=True, softplus=True, seq=True, init=True)),
    (7, BF16, "var", dict(z=False, softplus=False, seq=True)),
    (128, F32, "const", dict(z=False, init=True, seq=True)),
    (128, BF16, "grp", dict(bc_fp32=True, D=False, init=True)),
    (1000, F32, "var", dict(z=True, D=True, delta_bias=True, softplus=True, init=True, seq=True)),
    (1000, F32, "grp", dict(z=False, D=False, delta_bias=False, softplus=False)),
    (1000, F16, "grp", dict(init=True, seq=True)),
    (2049, F32, "grp", dict(b=1, groups=2, d=4, n=3, seq=True)),
    (2049, BF16, "var", dict(b=2, d=2, n=4, bc_fp32=True, delta_bias=False, init=True)),
    (4096, F32, "var", dict(SMALL, z=False, delta_bias=False, init=True, seq=True)),
]


def _id(case):
    l, dtype, bc, opts = case
    flags = "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in opts.items())
    return f"l{l}-{str(dtype)[6:]}-{bc}-{flags}"


@pytest.mark.parametrize("case", GRID, ids=_id)
def test_selective_scan_matches_reference(case):
    l, dtype, bc, opts = case
    opts = dict(opts)
    assert_scan_matches_reference(make_scan_inputs(l=l, dtype=dtype, bc=bc, **opts))


SLOW_GRID = [
    (4096, BF16, "grp", dict(b=2, d=4, n=4, groups=2, init=True, seq=True)),
    (4096, F32, "const", dict(SMALL, init=True, seq=True)),
    (4096, F32, "grp", dict(b=2, d=8, n=8, groups=4, init=True, seq=True)),
    (2049, F32, "var", dict(d=16, n=16, init=True, seq=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_GRID, ids=_id)
def test_selective_scan_matches_reference_large(case):
    l, dtype, bc, opts = case
    assert_scan_matches_reference(make_scan_inputs(l=l, dtype=dtype, bc=bc, **opts))


@pytest.mark.parametrize("n", [1, 16, 20, 33])
def test_state_sizes_around_the_vector_width(n):
    """The kernels run 16 state lanes at a time: n below, at and above it (padded lanes must stay inert)."""
    assert_scan_matches_reference(make_scan_inputs(n=n, l=300, init=True, seq=True, bc="grp"))


@pytest.mark.parametrize("layouts", [("grp", "var"), ("const", "grp"), ("var", "var")])
def test_many_channels_and_mixed_bc_layouts(layouts):
    """Enough channels that the kernel splits a batch row into several channel blocks whose partial dB/dC
    are summed afterwards, with B and C in different layouts (groups of B finer than C's, or constant)."""
    b, d, n, l = 2, 80, 5, 300
    inp = make_scan_inputs(b=b, d=d, n=n, l=l, init=True, seq=True)
    gen = torch.Generator().manual_seed(7)
    shapes = {"const": (d, n), "var": (b, n, l), "grp": (b, 4, n, l)}
    for name, layout in zip("BC", layouts):
        inp[name] = torch.randn(*shapes[layout], generator=gen).requires_grad_()
    assert_scan_matches_reference(inp)


def test_without_gradient_into_last_state():
    """dlast_state is None when the last state is not used: the backward must accept that."""
    assert_scan_matches_reference(make_scan_inputs(l=300, init=True), with_last_grad=False)
    inp = make_scan_inputs(l=50)
    for backend in ("cpu", "torch"):
        with ops.use_backend(backend):
            out = ops.selective_scan(**_clone_leaves(inp))
        assert out.requires_grad
    out.sum().backward()


def test_gradient_only_through_last_state():
    """A loss on the last state alone: dout is None on the way back (the wrapper passes zeros)."""
    inp = make_scan_inputs(l=300, init=True, seq=True)
    res = {}
    for backend in ("cpu", "torch"):
        leaves = _clone_leaves(inp)
        with ops.use_backend(backend):
            _, last = ops.selective_scan(return_last_state=True, **leaves)
        ws = torch.randn(last.shape, generator=torch.Generator().manual_seed(3))
        (last * ws).sum().backward()
        res[backend] = leaves
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"):
        expected = res["torch"][name].grad  # None where the last state does not depend on the input
        assert_close(f"d{name}", res["cpu"][name].grad,
                expected if expected is not None else torch.zeros_like(res["torch"][name]), 2e-3, 2e-3)


def _isa_available(isa):
    try:
        os.environ["EMMA_CPU_ISA"] = isa
        inp = make_scan_inputs(l=3, z=False)
        with ops.use_backend("cpu"):
            ops.selective_scan(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()})
        return True
    except RuntimeError:
        return False
    finally:
        del os.environ["EMMA_CPU_ISA"]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_instruction_set_path(isa, monkeypatch):
    """The kernels are compiled per instruction set and picked at run time: each path must be right."""
    if not _isa_available(isa):
        pytest.skip(f"this CPU/build has no {isa} path")
    monkeypatch.setenv("EMMA_CPU_ISA", isa)
    assert_scan_matches_reference(make_scan_inputs(n=20, l=530, init=True, seq=True, bc="grp"))
    assert_scan_matches_reference(make_scan_inputs(l=260, bc="const", softplus=True))
    # softplus over the whole input range (both sides of the threshold 20, large negatives)
    x = torch.linspace(-40, 40, 801)[None, None]
    zero_A = torch.zeros(1, 1)
    with ops.use_backend("cpu"):
        # with A = 0, B = 1, C = 1, u = 1: h_t = sum of dt, so y_t - y_{t-1} = softplus(x_t)
        y = ops.selective_scan(torch.ones_like(x), x, zero_A, torch.ones(1, 1), torch.ones(1, 1),
                               delta_softplus=True)
    dt = torch.diff(y.double(), prepend=torch.zeros(1, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(dt.float(), torch.nn.functional.softplus(x), rtol=1e-4, atol=2e-3)
    # the decode step (the same per-ISA step kernel): n = 16 fp32 updates state and B/C in place, n = 20 pads
    # to two lane blocks, a bf16 state and bf16 B/C go through fp32 copies
    for n, dtype, groups in ((16, F32, 1), (20, F32, 2), (16, BF16, 2), (5, F32, 1)):
        g = torch.Generator().manual_seed(n)
        b, d = 3, 10
        r = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
        x, dt, z = r(b, d).to(dtype), (r(b, d) * 0.5).to(dtype), r(b, d).to(dtype)
        A, D, db = -torch.rand(d, n, generator=g) - 0.1, r(d), r(d) * 0.1
        B, C = (r(b, groups, n) if groups > 1 else r(b, n)).to(dtype), (r(b, groups, n) if groups > 1 else r(b, n)).to(dtype)
        st = r(b, d, n).to(dtype)
        st_ref = st.clone()
        with ops.use_backend("cpu"):
            y = ops.selective_state_update(st, x, dt, A, B, C, D, z, db, True)
        y_ref = ref.selective_state_update_ref(st_ref, x, dt, A, B, C, D, z, db, True)
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
        torch.testing.assert_close(st.float(), st_ref.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("where", ["delta", "delta_bias", "A"])
def test_a_nan_stays_a_nan_on_every_instruction_set(isa, where, monkeypatch):
    """A NaN in delta, delta_bias or A (a diverged dt_proj or A_log) makes the outputs it reaches NaN, as in the
    reference, scan and decode step alike: AVX2's exp clamp and every path's softplus turned it into a decay of 0
    or a step of 0 (finite, wrong outputs and losses)."""
    if not _isa_available(isa):
        pytest.skip(f"this CPU/build has no {isa} path")
    monkeypatch.setenv("EMMA_CPU_ISA", isa)
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 3, 16, 9
    u, delta = torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g)
    A, B, C = -torch.rand(d, n, generator=g) - 0.5, torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    bias = torch.rand(d, generator=g)
    if where == "delta":
        delta[0, 1, 4] = float("nan")
    elif where == "delta_bias":
        bias[1] = float("nan")
    else:
        A[1, 3] = float("nan")
    args = (u, delta, A, B, C)
    want = ref.selective_scan_ref(*args, delta_bias=bias, delta_softplus=True)
    with ops.use_backend("cpu"):
        got = ops.selective_scan(*args, delta_bias=bias, delta_softplus=True)
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{isa}: NaN outputs differ from the reference's"
    st = torch.randn(b, d, n, generator=g)
    st_ref = st.clone()
    step = (u[..., 4], delta[..., 4], A, B[..., 4], C[..., 4], None, None, bias, True)
    y_ref = ref.selective_state_update_ref(st_ref, *step)
    with ops.use_backend("cpu"):
        y = ops.selective_state_update(st, *step)
    assert torch.isnan(y_ref).any()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.equal(torch.isnan(st), torch.isnan(st_ref))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("n", [5, 8, 17])
def test_a_decode_steps_inf_stays_in_its_own_row(isa, n, monkeypatch):
    """An inf in one row's x (one request of a batched decode): the other rows' outputs are the reference's,
    finite. With d_state not a multiple of 16 the step's padded state lanes were reused from row to row, and the
    inf row's inf * 0 = NaN there reached every later row's C . h."""
    if not _isa_available(isa):
        pytest.skip(f"this CPU/build has no {isa} path")
    monkeypatch.setenv("EMMA_CPU_ISA", isa)
    g = torch.Generator().manual_seed(n)
    b, d = 3, 2
    x, dt = torch.randn(b, d, generator=g), torch.rand(b, d, generator=g)
    x[0, 0] = float("inf")
    A, B, C = -torch.rand(d, n, generator=g) - 0.5, torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)
    st = torch.randn(b, d, n, generator=g).to(BF16)  # a bf16 state: the step works in its fp32 copy
    st_ref = st.clone()
    y_ref = ref.selective_state_update_ref(st_ref, x, dt, A, B, C)
    with ops.use_backend("cpu"):
        y = ops.selective_state_update(st, x, dt, A, B, C)
    assert torch.isfinite(y_ref[1:]).all() and not torch.isfinite(y_ref[0]).all()
    torch.testing.assert_close(y[1:], y_ref[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st[1:].float(), st_ref[1:].float(), rtol=1e-2, atol=1e-2)


def _heads_A(d, n, headdim, gen):
    """Mamba-2's A: one value per head of ``headdim`` channels, repeated over the channel and its n lanes."""
    per_head = -(torch.rand(d // headdim, generator=gen) * 0.5 + 0.25)
    return per_head.repeat_interleave(headdim)[:, None].expand(d, n).contiguous()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("n", [20, 128])
def test_channels_whose_lanes_share_one_A(isa, n, monkeypatch):
    """Mamba-2's scan: every lane of a channel has the same A, so the kernels broadcast one decay per step
    instead of an exponential per lane. Against the reference, on each instruction set, across a chunk edge,
    with packed rows and an initial state; in one call with channels whose A differs in one lane only (the
    last, or a lane of the second lane block), which must take the per-lane path."""
    if not _isa_available(isa):
        pytest.skip(f"this CPU/build has no {isa} path")
    monkeypatch.setenv("EMMA_CPU_ISA", isa)
    inp = make_scan_inputs(b=2, d=6, n=n, l=300, bc="grp", groups=2, init=True, seq=True, seed=n)
    A = _heads_A(6, n, 2, torch.Generator().manual_seed(1))
    A[2, -1] -= 0.3  # head 1: one channel uniform (3), one not (2)
    A[5, 17] += 0.2  # a lane past the first block of 16
    inp["A"] = A.requires_grad_()
    assert_scan_matches_reference(inp)


def test_one_decay_per_channel_is_the_per_lane_exponential_bit_for_bit():
    """The broadcast decay is the value the per-lane exponential gives (same rounding): a channel whose A is
    uniform except in one lane that B, C and the initial state leave at zero (so it adds nothing) takes the
    per-lane path, and its states and gradients equal the uniform channel's exactly; the output (and dz, which
    reads it) sums <C_t, h_t> over the lane blocks in another order, so it agrees to fp32 rounding."""
    gen = torch.Generator().manual_seed(5)
    inp = make_scan_inputs(b=2, d=4, n=20, l=300, bc="var", init=True, seq=True, seed=5)
    A = _heads_A(4, 20, 1, gen)
    with torch.no_grad():
        for name in ("B", "C"):
            inp[name][:, -1] = 0.0
        inp["initial_state"][:, :, -1] = 0.0
    bent = A.clone()
    bent[:, -1] -= 0.25  # every channel now takes the per-lane path
    # (no gradient into the last state: it would reach the idle lane, whose decay differs)
    out_u, last_u, g_u = run_scan("cpu", dict(inp, A=A.requires_grad_()), with_last_grad=False)
    out_b, last_b, g_b = run_scan("cpu", dict(inp, A=bent.requires_grad_()), with_last_grad=False)
    assert torch.equal(last_u, last_b)
    torch.testing.assert_close(out_u, out_b, rtol=1e-5, atol=1e-6)
    for name in g_u:
        if name == "z":
            torch.testing.assert_close(g_u[name], g_b[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(g_u[name], g_b[name]), f"d{name}"


def test_backward_is_deterministic_and_independent_of_thread_count():
    inp = make_scan_inputs(d=40, l=700, bc="var", init=True, seq=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # (the test run may give this process a single thread: tests/conftest.py)
        _, _, g1 = run_scan("cpu", inp)
        _, _, g2 = run_scan("cpu", inp)
        torch.set_num_threads(1)
        _, _, g3 = run_scan("cpu", inp)
    finally:
        torch.set_num_threads(threads)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"d{name} differs between two identical runs"
        assert torch.equal(g1[name], g3[name]), f"d{name} differs between 1 and 4 threads"


def test_saved_state_is_chunk_boundaries_only():
    """The forward keeps one state per chunk, never the (b, d, l, n) states."""
    b, d, n, l = 2, 8, 8, 4096
    inp = make_scan_inputs(b=b, d=d, n=n, l=l)
    args = [inp[k].detach() if isinstance(inp[k], torch.Tensor) else inp[k] for k in
            ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "initial_state", "seq_idx")]
    out, last, saved = _C.selective_scan_fwd_cpu(*args)
    assert saved.dtype == torch.float32
    assert saved.numel() * 64 <= b * d * l * n, f"saved {tuple(saved.shape)} is not a chunk-boundary tensor"


def test_noncontiguous_inputs_equal_contiguous():
    inp = make_scan_inputs(l=100, init=True, seq=True)
    base = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    strided = dict(base)
    for k in ("u", "delta", "z"):  # (b, l, d) storage viewed as (b, d, l), as the mixer produces them
        strided[k] = base[k].transpose(1, 2).contiguous().transpose(1, 2)
        assert not strided[k].is_contiguous()
    strided["B"] = base["B"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["A"] = base["A"].t().contiguous().t()
    with ops.use_backend("cpu"):
        o1, s1 = ops.selective_scan(return_last_state=True, **base)
        o2, s2 = ops.selective_scan(return_last_state=True, **strided)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)


# ---------------------------------------------------------------------------------------------------------
# decode step vs scan, packed rows vs samples


@pytest.mark.parametrize("bc", ["var", "grp"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_state_update_steps_equal_scan(bc, dtype):
    b, d, n, l, g = 2, 8, 8, 40, 2
    inp = make_scan_inputs(b=b, d=d, n=n, l=l, dtype=dtype, bc=bc, groups=g, init=True)
    t = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    with ops.use_backend("cpu"):
        out, last = ops.selective_scan(return_last_state=True, **t)
        state = t["initial_state"].clone()
        steps = [ops.selective_state_update(state, t["u"][..., i], t["delta"][..., i], t["A"], t["B"][..., i],
                                            t["C"][..., i], t["D"], t["z"][..., i], t["delta_bias"], True)
                 for i in range(l)]
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(torch.stack(steps, -1).float(), out.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(state, last, rtol=6e-4, atol=2e-3)
    # and the cpu decode step against the reference decode step, on a bf16 state
    st_c = t["initial_state"].to(dtype)
    st_r = st_c.clone()
    with ops.use_backend("cpu"):
        y_c = ops.selective_state_update(st_c, t["u"][..., 0], t["delta"][..., 0], t["A"], t["B"][..., 0],
                                         t["C"][..., 0], None, t["z"][..., 0], None, False)
    y_r = ref.selective_state_update_ref(st_r, t["u"][..., 0], t["delta"][..., 0], t["A"], t["B"][..., 0],
                                         t["C"][..., 0], None, t["z"][..., 0], None, False)
    torch.testing.assert_close(y_c.float(), y_r.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(st_c.float(), st_r.float(), rtol=rtol, atol=atol)


def test_packed_row_equals_samples_one_by_one():
    """Samples of lengths 300, 1, 500 packed in one row with seq_idx == each sample run alone (the first
    with the initial state): outputs, the last sample's last state, and every gradient."""
    lens = [300, 1, 500]
    d, n = 8, 8
    samples = [make_scan_inputs(b=1, d=d, n=n, l=L, seed=10 + i, init=(i == 0)) for i, L in enumerate(lens)]
    shared = {k: samples[0][k] for k in ("A", "D", "delta_bias")}
    packed = {k: torch.cat([s[k].detach() for s in samples], -1).requires_grad_() for k in ("u", "delta", "z", "B", "C")}
    packed.update({k: v.detach().clone().requires_grad_() for k, v in shared.items()})
    h0 = samples[0]["initial_state"].detach().clone().requires_grad_()
    seq = torch.cat([torch.full((L,), i, dtype=torch.int32) for i, L in enumerate(lens)])[None]
    gen = torch.Generator().manual_seed(5)
    dout = torch.randn(1, d, sum(lens), generator=gen)
    dlast = torch.randn(1, d, n, generator=gen)
    with ops.use_backend("cpu"):
        out_p, last_p = ops.selective_scan(**packed, delta_softplus=True, return_last_state=True,
                                           initial_state=h0, seq_idx=seq)
        ((out_p * dout).sum() + (last_p * dlast).sum()).backward()
        sep_shared = {k: v.detach().clone().requires_grad_() for k, v in shared.items()}
        h0s = h0.detach().clone().requires_grad_()
        outs, pos = [], 0
        leaves = []
        for i, (s, L) in enumerate(zip(samples, lens)):
            own = {k: s[k].detach().clone().requires_grad_() for k in ("u", "delta", "z", "B", "C")}
            leaves.append(own)
            o, last = ops.selective_scan(**own, **sep_shared, delta_softplus=True, return_last_state=True,
                                         initial_state=h0s if i == 0 else None)
            loss = (o * dout[..., pos:pos + L]).sum() + (last * dlast).sum() * (i == len(lens) - 1)
            loss.backward()
            outs.append(o)
            pos += L
    torch.testing.assert_close(out_p, torch.cat(outs, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_p, last, rtol=1e-5, atol=1e-5)
    for k in ("u", "delta", "z", "B", "C"):
        torch.testing.assert_close(packed[k].grad, torch.cat([lv[k].grad for lv in leaves], -1), rtol=1e-4,
                                   atol=1e-4, msg=lambda m: f"d{k}: {m}")
    for k in shared:
        torch.testing.assert_close(packed[k].grad, sep_shared[k].grad, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"d{k}: {m}")
    torch.testing.assert_close(h0.grad, h0s.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# causal conv1d


def _conv_inputs(b, d, l, w, dtype, bias, init, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=gen).to(dt).requires_grad_()  # noqa: E731
    return dict(x=r(b, d, l), weight=r(d, w, dt=torch.float32), bias=r(d, dt=torch.float32) if bias else None,
                initial_states=r(b, d, w - 1) if init else None, seq_idx=_seq_idx(b, l, 4, gen) if seq else None)


CONV_GRID = [  # (l, w, dtype, bias, init, seq, activation)
    (1, 4, F32, True, True, False, "silu"),
    (7, 2, F32, False, False, True, None),
    (128, 3, BF16, True, True, True, "silu"),
    (1000, 4, F32, True, True, True, "swish"),
    (2049, 4, BF16, False, False, False, None),
    (300, 2, F32, True, True, True, None),
    (300, 3, F16, True, True, True, "silu"),
]


@pytest.mark.parametrize("l,w,dtype,bias,init,seq,act", CONV_GRID)
def test_causal_conv1d_matches_reference(l, w, dtype, bias, init, seq, act):
    inp = _conv_inputs(2, 8, l, w, dtype, bias, init, seq)
    res = {}
    for backend in ("cpu", "torch"):
        leaves = _clone_leaves(inp)
        with ops.use_backend(backend):
            out = ops.causal_conv1d(**leaves, activation=act)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
        names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad((out.float() * dout.float()).sum(), [leaves[k] for k in names])
        res[backend] = (out, dict(zip(names, grads)))
    (rtol, atol), (rtolw, atolw) = _tolerances(dtype)
    assert_close("out", res["cpu"][0], res["torch"][0], rtol, atol)
    for name, g in res["torch"][1].items():
        assert_close(f"d{name}", res["cpu"][1][name], g, *((2 * rtol, 2 * atol) if name in ("x", "initial_states")
                                                     else (rtolw, atolw)))


def test_causal_conv1d_packed_row_equals_samples():
    lens, d, w = [5, 1, 9, 2], 4, 4
    xs = [torch.randn(1, d, L) for L in lens]
    weight, bias, init = torch.randn(d, w), torch.randn(d), torch.randn(1, d, w - 1)
    seq = torch.cat([torch.full((L,), i, dtype=torch.int32) for i, L in enumerate(lens)])[None]
    with ops.use_backend("cpu"):
        packed = ops.causal_conv1d(torch.cat(xs, -1), weight, bias, "silu", init, seq)
        sep = torch.cat([ops.causal_conv1d(x, weight, bias, "silu", init if i == 0 else None)
                         for i, x in enumerate(xs)], -1)
    torch.testing.assert_close(packed, sep, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_causal_conv1d_update_steps_equal_conv(w, dtype):
    b, d, l = 2, 6, 9
    x = torch.randn(b, d, l).to(dtype)
    weight, bias = torch.randn(d, w), torch.randn(d)
    init = torch.randn(b, d, w - 1).to(dtype)
    with ops.use_backend("cpu"):
        full = ops.causal_conv1d(x, weight, bias, "silu", init)
        state = torch.cat([torch.zeros(b, d, 1, dtype=dtype), init], -1).contiguous()  # last w inputs
        steps = [ops.causal_conv1d_update(x[..., t], state, weight, bias, "silu") for t in range(l)]
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(torch.stack(steps, -1).float(), full.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(state, x[..., -w:])
    # the step itself against the reference step, with a state of another dtype than x
    st_c = torch.randn(b, d, w)
    st_r = st_c.clone()
    with ops.use_backend("cpu"):
        y_c = ops.causal_conv1d_update(x[..., 0], st_c, weight, None, None)
    y_r = ref.causal_conv1d_update_ref(x[..., 0], st_r, weight, None, None)
    torch.testing.assert_close(y_c, y_r, rtol=rtol, atol=atol)
    assert torch.equal(st_c, st_r)


def test_direct_kernel_calls_check_layout():
    """_C is callable directly: its kernels check contiguity, dtype and device themselves."""
    b, d, n, l = 1, 4, 4, 8
    u = torch.randn(b, l, d).transpose(1, 2)  # non-contiguous
    delta, A, B, C = torch.rand(b, d, l), -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l)
    with pytest.raises(RuntimeError, match=r"selective_scan_fwd_cpu: u must be contiguous"):
        _C.selective_scan_fwd_cpu(u, delta, A, B, C, None, None, None, False, None, None)
    with pytest.raises(RuntimeError, match=r"delta must have dtype"):
        _C.selective_scan_fwd_cpu(u.contiguous(), delta.double(), A, B, C, None, None, None, False, None, None)
    with pytest.raises(RuntimeError, match=r"B must be a CPU tensor"):
        _C.selective_scan_fwd_cpu(u.contiguous(), delta, A, B.to("meta"), C, None, None, None, False, None, None)
    with pytest.raises(RuntimeError, match=r"C must have shape \(1, 4, 8\)"):
        _C.selective_scan_fwd_cpu(u.contiguous(), delta, A, B, C[..., :4], None, None, None, False, None, None)
    x = torch.randn(b, l, d).transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"causal_conv1d_fwd_cpu: x must have unit stride along its last dimension"):
        _C.causal_conv1d_fwd_cpu(x, torch.randn(d, 4), None, None, None, False)
    with pytest.raises(RuntimeError, match=r"d_conv\) must be 2, 3 or 4, got 5"):
        _C.causal_conv1d_fwd_cpu(x.contiguous(), torch.randn(d, 5), None, None, None, False)
    state = torch.randn(b, n, d).transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"selective_state_update_cpu: state must be contiguous"):
        _C.selective_state_update_cpu(state, torch.randn(b, d), torch.rand(b, d), A, torch.randn(b, n),
                                      torch.randn(b, n), None, None, None, False)
    conv_state = torch.randn(b, 4, d).transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"causal_conv1d_update_cpu: conv_state must be contiguous"):
        _C.causal_conv1d_update_cpu(torch.randn(b, d), conv_state, torch.randn(d, 4), None, False)
    o, last, saved = _C.selective_scan_fwd_cpu(u.contiguous(), delta, A, B, C, None, None, None, False, None, None)
    with pytest.raises(RuntimeError, match=r"selective_scan_bwd_cpu: saved must have shape"):
        _C.selective_scan_bwd_cpu(u.contiguous(), delta, A, B, C, None, None, None, False, None, None,
                                  saved[:, :, :0], torch.randn_like(o), None, False, False)


CPU_ASAN_SCRIPT = """
import os
from emma_mamba.ops import cuda_emulator
cuda_emulator.use_sanitized_cpu_kernels(cuda_emulator.load_cpu_sanitized())
from tests.ops.test_cuda_emulator import exercise_every_kernel
calls = 0
for isa in ("scalar", "avx2", "avx512"):
    os.environ["EMMA_CPU_ISA"] = isa
    try:
        calls += exercise_every_kernel("cpu")
    except RuntimeError as e:
        if "EMMA_CPU_ISA" not in str(e) and isa not in str(e):
            raise
        print("no", isa, "path:", e)
print("ASAN-CLEAN", calls)
"""


def test_cpu_kernels_stay_in_bounds_under_address_sanitizer():
    """csrc/cpu built under AddressSanitizer and UBSan runs the same grid as the CUDA kernels (odd and
    aligned shapes, partial vectors, chunk edges, misaligned inputs) on every instruction-set path this CPU
    has: no access outside torch's allocations, no undefined behaviour."""
    from .test_cuda_emulator import run_sanitized

    run_sanitized(CPU_ASAN_SCRIPT)


def test_a_row_returning_to_an_earlier_seq_idx_is_taken_as_documented():
    """seq_idx is not checked (ops.selective_scan's docstring, README Kernels): in a row that returns to an earlier
    id, 0 0 1 1 0, every backend restarts the scan at each change, while the conv counts a tap whose id equals the
    output position's. Values by hand: width 4, so output 4 sees inputs 1..4, of which 1 and 4 have its id 0."""
    x = torch.tensor([[[1.0, 2.0, 4.0, 8.0, 16.0]]])  # (1, 1, 5)
    w = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])  # tap k weighs input t - 3 + k
    back = torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.int32)
    fresh = torch.tensor([[0, 0, 1, 1, 2]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 2, 5, generator=gen), torch.rand(1, 2, 5, generator=gen)
    A, B, C = -torch.rand(2, 3, generator=gen), torch.randn(1, 3, 5, generator=gen), torch.randn(1, 3, 5, generator=gen)
    for backend in ("torch", "cpu"):
        with ops.use_backend(backend):
            conv = ops.causal_conv1d(x, w, seq_idx=back)[0, 0]
            assert conv.tolist() == [1000.0, 100 + 2000.0, 4000.0, 400 + 8000.0, 2 + 16000.0], backend
            assert ops.causal_conv1d(x, w, seq_idx=fresh)[0, 0, 4].item() == 16000.0  # a new id: no tap before
            scan = ops.selective_scan(u, delta, A, B, C, seq_idx=back)
            torch.testing.assert_close(scan, ops.selective_scan(u, delta, A, B, C, seq_idx=fresh), rtol=0, atol=0)
