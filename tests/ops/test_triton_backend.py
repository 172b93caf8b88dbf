"""The triton backend (emma_mamba.kernels) against the fp32 reference ops, through the public op layer.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), which is
slow: shapes stay small (d <= 8, n <= 8, L <= 300), yet long enough to cross several scan chunks and conv
blocks. With a GPU the same tests run the compiled kernels on CUDA tensors, and the ``gpu`` tests add
model-scale shapes.

Triton decides whether a function is compiled or interpreted when ``@triton.jit`` decorates it, and that
includes triton.language's own helpers (``tl.zeros``, ``tl.sum``, ...), decorated when triton is first
imported. So ``TRITON_INTERPRET=1`` is set here before the first import of triton; if another test module
of the same pytest process imported triton earlier without it, the interpreter cannot be switched on in this
process any more, and this module runs itself in a fresh subprocess instead (one test,
``test_interpreter_suite_in_subprocess``), so the result never depends on test ordering.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are decorated (the imports below)

triton = pytest.importorskip("triton")

import emma_mamba.kernels as K  # noqa: E402
from emma_mamba import ops  # noqa: E402
from emma_mamba.ops.reference import (causal_conv1d_ref, causal_conv1d_update_ref,  # noqa: E402
                                      selective_state_update_ref)

from .tolerances import (TOL, assert_close, check_batch_sliced_deterministic, check_scan,  # noqa: E402
                         check_state_update, conv_on_backends, scan_on_backend, segments)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return (isinstance(triton.language.standard.zeros, InterpretedFunction)
            and isinstance(K.selective_scan._selective_scan_fwd_kernel, InterpretedFunction))


# triton was imported (compiled mode) by an earlier module: delegate to a subprocess
DELEGATE = INTERPRET and not _interpreted()


@pytest.fixture(autouse=True)
def _interpreter_guard(request):
    if DELEGATE and request.node.originalname != "test_interpreter_suite_in_subprocess":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; "
                    "test_interpreter_suite_in_subprocess runs these tests in a fresh process")


def test_interpreter_suite_in_subprocess():
    if not DELEGATE:
        pytest.skip("the interpreter tests ran in this process")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p",
                        "no:cacheprovider"], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"interpreter tests failed in the subprocess:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout, r.stdout[-2000:]


DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture
def triton_backend():
    with ops.use_backend("triton"):
        yield


# ---------------------------------------------------------------------------------------------------------
# selective scan


def _segments(b, l, gen):
    """seq_idx with boundaries at 1 and 2 (a length-1 segment) and around the first chunk boundary."""
    return segments(b, l, gen, {1, 2, K.selective_scan.CHUNK, K.selective_scan.CHUNK + 1})


def _scan_inputs(b, d, n, l, dtype, bc, z, D, bias, init, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    u = r(b, d, l).to(dtype)
    delta = (0.5 * torch.rand(b, d, l, generator=gen)).to(dtype)
    A = -0.5 - torch.rand(d, n, generator=gen)
    layouts = {"var": lambda: r(b, n, l).to(dtype), "const": lambda: r(d, n),
               "g2": lambda: r(b, 2, n, l).to(dtype), "g4": lambda: r(b, 4, n, l).to(dtype)}
    B = layouts[bc[0]]()
    C = layouts[bc[1]]()
    return dict(
        u=u, delta=delta, A=A, B=B, C=C,
        D=r(d) if D else None,
        z=r(b, d, l).to(dtype) if z else None,
        delta_bias=0.5 * torch.rand(d, generator=gen) if bias else None,
        initial_state=r(b, d, n) if init else None,
        seq_idx=_segments(b, l, gen) if seq else None,
    )


def _run_scan(inputs, softplus, last_grad, backend, deterministic=None):
    return scan_on_backend(inputs, softplus, last_grad, backend, DEVICE, deterministic)


def _check_scan(inputs, dtype, softplus, last_grad, deterministic=None):
    assert inputs["u"].dtype == dtype
    check_scan(inputs, "triton", DEVICE, softplus, last_grad, deterministic)


# (b, d, n, l, dtype, B/C layouts, z, D, delta_bias, softplus, initial_state, seq_idx, grad of last state)
SCAN_CASES = {
    "all-flags-L300": (2, 4, 4, 300, torch.float32, ("var", "var"), 1, 1, 1, 1, 1, 1, 1),
    "L1": (2, 4, 4, 1, torch.float32, ("var", "var"), 1, 1, 1, 1, 1, 1, 1),
    "plain-const-L7": (1, 4, 4, 7, torch.float32, ("const", "const"), 0, 0, 0, 0, 0, 0, 0),
    "one-chunk-exact": (2, 4, 8, 256, torch.float32, ("var", "const"), 0, 1, 0, 1, 1, 0, 1),
    "chunk-plus-one-groups": (2, 4, 4, 65, torch.float32, ("g2", "g2"), 1, 1, 0, 0, 0, 1, 0),
    "mixed-groups": (1, 8, 4, 129, torch.float32, ("g4", "g2"), 0, 1, 1, 1, 1, 0, 1),
    "odd-d-n-group-of-3": (1, 6, 5, 70, torch.float32, ("g2", "const"), 1, 0, 1, 1, 1, 1, 1),
    "fp16": (2, 4, 4, 150, torch.float16, ("var", "var"), 1, 1, 1, 1, 0, 0, 0),
    "bf16-groups-packed": (2, 4, 4, 150, torch.bfloat16, ("g2", "var"), 1, 1, 1, 1, 1, 1, 1),
    # a Mamba-2 layer's scan: 128 states, B/C in groups, no z (its gate is the norm's)
    "mamba2-n128-groups": (1, 2, 128, 40, torch.float32, ("g2", "g2"), 0, 1, 1, 1, 1, 1, 1),
}


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_selective_scan_matches_reference(case):
    b, d, n, l, dtype, bc, z, D, bias, softplus, init, seq, last_grad = SCAN_CASES[case]
    inputs = _scan_inputs(b, d, n, l, dtype, bc, z, D, bias, init, seq)
    _check_scan(inputs, dtype, bool(softplus), bool(last_grad))


@pytest.mark.parametrize("case", ["all-flags-L300", "chunk-plus-one-groups", "mixed-groups", "bf16-groups-packed"])
def test_selective_scan_small_chunks_match_reference(case, monkeypatch):
    """The chunk length is a tuning knob: with 32-step chunks the same cases cross up to 10 boundaries."""
    monkeypatch.setattr(K.selective_scan, "CHUNK", 32)
    b, d, n, l, dtype, bc, z, D, bias, softplus, init, seq, last_grad = SCAN_CASES[case]
    inputs = _scan_inputs(b, d, n, l, dtype, bc, z, D, bias, init, seq)
    _check_scan(inputs, dtype, bool(softplus), bool(last_grad))


# The sequential implementations run with 32-step chunks (and 8-step tiles in the backward), so these cases cross
# chunk and tile edges at a quarter to a half of SCAN_CASES' lengths (the interpreter's time grows with the steps):
# 75 = two chunks + 11 steps (a partial last tile), 65 = two chunks + 1, 69 and 70 = two chunks + a partial tile.
SEQ_CHUNK = 32
SEQUENTIAL_CASES = {
    "all-flags-L75": (2, 4, 4, 75, torch.float32, ("var", "var"), 1, 1, 1, 1, 1, 1, 1),
    "L1": SCAN_CASES["L1"],
    "plain-const-L7": SCAN_CASES["plain-const-L7"],
    "chunk-plus-one-groups": SCAN_CASES["chunk-plus-one-groups"],
    "odd-d-n-group-of-3": SCAN_CASES["odd-d-n-group-of-3"],
    "bf16-groups-packed-L75": (2, 4, 4, 75, torch.bfloat16, ("g2", "var"), 1, 1, 1, 1, 1, 1, 1),
}


@pytest.mark.parametrize("case", list(SEQUENTIAL_CASES))
def test_sequential_forward_matches_reference(case, monkeypatch):
    """The "sequential" forward (one time step per iteration): outputs, last state, and the gradients the
    chunked backward computes from the states it saved (at every chunk edge)."""
    monkeypatch.setattr(K.selective_scan, "FWD_IMPL", "sequential")
    monkeypatch.setattr(K.selective_scan, "CHUNK", SEQ_CHUNK)
    b, d, n, l, dtype, bc, z, D, bias, softplus, init, seq, last_grad = SEQUENTIAL_CASES[case]
    inputs = _scan_inputs(b, d, n, l, dtype, bc, z, D, bias, init, seq)
    _check_scan(inputs, dtype, bool(softplus), bool(last_grad))


def test_both_forwards_save_the_same_states(monkeypatch):
    """The backward's contract: whichever forward ran, the states entering every chunk are the same."""
    monkeypatch.setattr(K.selective_scan, "CHUNK", SEQ_CHUNK)  # 70 steps: two chunk edges, a partial chunk
    x = _scan_inputs(2, 4, 5, 70, torch.float32, ("g2", "var"), z=1, D=1, bias=1, init=1, seq=1)
    args = [x[k].to(DEVICE) if x[k] is not None else None
            for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    res = {}
    for impl in ("chunked", "sequential"):
        monkeypatch.setattr(K.selective_scan, "FWD_IMPL", impl)
        res[impl] = K.selective_scan.selective_scan_fwd(*args, True, x["initial_state"].to(DEVICE),
                                                        x["seq_idx"].to(DEVICE))
    for name, a, b in zip(("out", "last_state", "saved"), res["chunked"], res["sequential"]):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    monkeypatch.setattr(K.selective_scan, "FWD_IMPL", "recursive")
    with pytest.raises(ValueError, match="FWD_IMPL must be 'chunked' or 'sequential'"):
        K.selective_scan.selective_scan_fwd(*args, True, None, None)


@pytest.mark.parametrize("case", list(SEQUENTIAL_CASES) + ["mixed-groups-L69"])
def test_sequential_backward_matches_reference(case, monkeypatch):
    """The "sequential" backward (the adjoint one step at a time, checkpoints per tile): every gradient, both
    reduction modes for variable B/C, with 32-step chunks and 8-step tiles so the cases cross chunk and tile
    edges (a partial last tile included)."""
    monkeypatch.setattr(K.selective_scan, "BWD_IMPL", "sequential")
    monkeypatch.setattr(K.selective_scan, "CHUNK", SEQ_CHUNK)
    monkeypatch.setattr(K.selective_scan, "SEQ_BWD_TILE", 8)
    mixed = (1, 8, 4, 69, torch.float32, ("g4", "g2"), 0, 1, 1, 1, 1, 0, 1)  # SCAN_CASES' mixed-groups, shorter
    b, d, n, l, dtype, bc, z, D, bias, softplus, init, seq, last_grad = SEQUENTIAL_CASES.get(case, mixed)
    inputs = _scan_inputs(b, d, n, l, dtype, bc, z, D, bias, init, seq)
    _check_scan(inputs, dtype, bool(softplus), bool(last_grad), deterministic=case != "mixed-groups-L69")


def test_both_backwards_agree_and_unknown_name_is_an_error(monkeypatch):
    monkeypatch.setattr(K.selective_scan, "CHUNK", SEQ_CHUNK)  # 40 steps: across a chunk edge
    x = _scan_inputs(2, 4, 5, 40, torch.float32, ("g2", "var"), z=1, D=1, bias=1, init=1, seq=1)
    grads = {}
    for impl in ("chunked", "sequential"):
        monkeypatch.setattr(K.selective_scan, "BWD_IMPL", impl)
        grads[impl] = _run_scan(x, True, True, "triton", deterministic=True)[2]
    for k, a in grads["chunked"].items():
        torch.testing.assert_close(grads["sequential"][k], a, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{k}: {m}")
    monkeypatch.setattr(K.selective_scan, "BWD_IMPL", "recursive")
    with pytest.raises(ValueError, match="BWD_IMPL must be 'chunked' or 'sequential'"):
        _run_scan(x, True, True, "triton")


@pytest.mark.parametrize("rows", [True, False], ids=["a-row-per-channel", "the-block-sum"])
def test_selective_scan_atomic_dbc_matches_reference(rows, monkeypatch):
    """deterministic=False: dB/dC of variable and grouped B/C are added with fp32 atomics: by the chunked backward
    one row per channel (BWD_ROW_ATOMICS) or its channel block's sum; over 32-step chunks (150 steps: five)."""
    monkeypatch.setattr(K.selective_scan, "BWD_ROW_ATOMICS", rows)
    monkeypatch.setattr(K.selective_scan, "CHUNK", SEQ_CHUNK)
    inputs = _scan_inputs(2, 4, 4, 150, torch.float32, ("var", "g2"), z=1, D=1, bias=1, init=1, seq=1)
    _check_scan(inputs, torch.float32, True, True, deterministic=False)


def test_selective_scan_deterministic_is_bitwise_reproducible():
    inputs = _scan_inputs(1, 4, 4, 100, torch.float32, ("g2", "var"), z=1, D=1, bias=1, init=1, seq=1)
    runs = [_run_scan(inputs, True, True, "triton", deterministic=True) for _ in range(2)]
    for name in runs[0][2]:
        assert torch.equal(runs[0][2][name], runs[1][2][name]), f"d{name} differs between two runs"


@pytest.mark.parametrize("bc", [("var", "g2"), ("const", "var")], ids=["var-B-grouped-C", "const-B-var-C"])
def test_deterministic_backward_in_batch_slices(monkeypatch, bc):
    """Above EMMA_DETERMINISTIC_PARTIAL_MB the deterministic backward runs over batch slices (its dB/dC partials
    are (b, blocks, n, l) fp32): per-row gradients equal the unsliced call's bit for bit, the summed ones (A, D,
    delta_bias, a constant B) to rounding; it matches the reference and stays reproducible."""
    inputs = _scan_inputs(3, 4, 4, 40, torch.float32, bc, z=1, D=1, bias=1, init=1, seq=1)
    check_batch_sliced_deterministic(lambda x: _run_scan(x, True, True, "triton", deterministic=True),
                                     lambda x: _check_scan(x, torch.float32, True, True, deterministic=True),
                                     inputs, monkeypatch)


def test_selective_scan_never_saves_a_state_per_step(triton_backend, monkeypatch):
    """Only chunk-boundary states are kept for the backward: no saved tensor as large as (b, d, l, n)."""
    monkeypatch.setattr(K.selective_scan, "CHUNK", SEQ_CHUNK)  # 100 steps: four chunks
    b, d, n, l = 1, 4, 8, 100
    inputs = _scan_inputs(b, d, n, l, torch.float32, ("var", "var"), z=1, D=1, bias=1, init=1, seq=1)
    leaf = {k: (v.to(DEVICE).requires_grad_() if v is not None and v.is_floating_point() else
                (v.to(DEVICE) if v is not None else None)) for k, v in inputs.items()}
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.selective_scan(**leaf, delta_softplus=True)
    assert sizes, "nothing was saved for the backward"
    assert max(sizes) < b * d * l * n, f"a saved tensor has {max(sizes)} elements >= b*d*l*n = {b * d * l * n}"
    out.sum().backward()  # and the backward still runs from what was saved
    assert leaf["u"].grad is not None


def test_decode_steps_equal_the_scan(triton_backend):
    """selective_state_update applied step by step reproduces selective_scan's outputs and last state."""
    b, d, n, l = 2, 8, 4, 12
    x = _scan_inputs(b, d, n, l, torch.float32, ("g2", "g2"), z=1, D=1, bias=1, init=1, seq=0)
    x = {k: (v.to(DEVICE) if v is not None else None) for k, v in x.items()}
    out, last = ops.selective_scan(**x, delta_softplus=True, return_last_state=True)
    state = x["initial_state"].clone()
    steps = []
    for t in range(l):
        steps.append(ops.selective_state_update(
            state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], x["D"],
            x["z"][..., t], x["delta_bias"], True))
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=rtol, atol=atol)
    torch.testing.assert_close(state, last, rtol=rtol, atol=atol)


def test_packed_sequences_equal_separate_runs(triton_backend):
    """Two sequences packed in one row with seq_idx give the outputs and gradients of two separate runs;
    the initial state feeds the first one only."""
    d, n, l1, l2 = 4, 4, 90, 45
    full = _scan_inputs(1, d, n, l1 + l2, torch.float32, ("var", "var"), z=1, D=1, bias=1, init=1, seq=0)
    seq = torch.tensor([[0] * l1 + [7] * l2], dtype=torch.int32, device=DEVICE)
    leaf = {k: v.to(DEVICE).clone().requires_grad_() for k, v in full.items() if v is not None}
    out, last = ops.selective_scan(**leaf, delta_softplus=True, return_last_state=True, seq_idx=seq)
    (out * torch.linspace(-1, 1, l1 + l2, device=DEVICE)).sum().backward()

    def part(sl, with_init):
        p = {k: v.to(DEVICE).clone().requires_grad_() for k, v in full.items() if v is not None}
        seqw = {k: (p[k][..., sl] if k in ("u", "delta", "z", "B", "C") else p[k]) for k in p}
        if not with_init:
            seqw["initial_state"] = None
        o, st = ops.selective_scan(**seqw, delta_softplus=True, return_last_state=True)
        (o * torch.linspace(-1, 1, l1 + l2, device=DEVICE)[sl]).sum().backward()
        return o, st, p

    o1, _, p1 = part(slice(0, l1), True)
    o2, st2, p2 = part(slice(l1, l1 + l2), False)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, torch.cat([o1, o2], -1), **tol)
    torch.testing.assert_close(last, st2, **tol)
    for k in ("u", "delta", "z", "B", "C"):
        torch.testing.assert_close(leaf[k].grad, p1[k].grad + p2[k].grad, **tol, msg=lambda m: f"d{k}: {m}")
    for k in ("A", "D", "delta_bias"):  # shared by both sequences: gradients add
        torch.testing.assert_close(leaf[k].grad, p1[k].grad + p2[k].grad, **tol, msg=lambda m: f"d{k}: {m}")
    torch.testing.assert_close(leaf["initial_state"].grad, p1["initial_state"].grad, **tol)


# ---------------------------------------------------------------------------------------------------------
# causal conv1d

# (b, d, l, width, dtype, bias, silu, initial_states, seq_idx)
CONV_CASES = {
    "w4-all-L300": (2, 5, 300, 4, torch.float32, 1, 1, 1, 1),
    "w2-plain-L1": (2, 3, 1, 2, torch.float32, 0, 0, 0, 0),
    "w3-init-L2": (2, 3, 2, 3, torch.float32, 1, 1, 1, 0),
    "w3-packed": (2, 20, 40, 3, torch.float32, 0, 1, 0, 1),
    "w4-packed-init-L3": (1, 4, 3, 4, torch.float32, 1, 0, 1, 1),
    "w4-bf16": (2, 8, 257, 4, torch.bfloat16, 1, 1, 1, 1),
    "w2-fp16": (2, 8, 100, 2, torch.float16, 1, 1, 0, 0),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_causal_conv1d_matches_reference(case):
    b, d, l, w, dtype, bias, silu, init, seq = CONV_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, l, generator=gen).to(dtype)
    inputs = dict(x=x, weight=torch.randn(d, w, generator=gen).to(dtype),
                  bias=torch.randn(d, generator=gen).to(dtype) if bias else None,
                  initial_states=torch.randn(b, d, w - 1, generator=gen).to(dtype) if init else None)
    seq_idx = _segments(b, l, gen).to(DEVICE) if seq else None
    if seq and l == 3:
        seq_idx[0] = torch.tensor([0, 1, 1], dtype=torch.int32)  # the initial states must not reach t=1
    dout = torch.randn(b, d, l, generator=gen).to(dtype).to(DEVICE)
    res = conv_on_backends(("triton", "torch"), inputs, dout, DEVICE, "silu" if silu else None, seq_idx)
    rtol, atol = TOL[dtype]
    assert_close("out", res["triton"][0], res["torch"][0], rtol, atol)
    for k, ref in res["torch"][1].items():
        # dweight/dbias sum over b*l products: scale the tolerance with the number of terms for 16-bit
        scale = 1 if dtype == torch.float32 or k in ("x", "initial_states") else 4
        assert_close(f"d{k}", res["triton"][1][k], ref, rtol * scale, atol * scale)


@pytest.mark.parametrize("w", [2, 3, 4])
def test_conv_update_steps_equal_the_conv(triton_backend, w):
    b, d, l = 2, 6, 9
    x = torch.randn(b, d, l, device=DEVICE)
    weight, bias, init = torch.randn(d, w, device=DEVICE), torch.randn(d, device=DEVICE), torch.randn(
        b, d, w - 1, device=DEVICE)
    full = ops.causal_conv1d(x, weight, bias, "silu", initial_states=init)
    # the state holds the last w inputs; its first slot is shifted out by the first step
    state = torch.cat([torch.zeros(b, d, 1, device=DEVICE), init], -1).contiguous()
    ref_state = state.clone()
    for t in range(l):
        y = ops.causal_conv1d_update(x[..., t], state, weight, bias, "silu")
        y_ref = causal_conv1d_update_ref(x[..., t], ref_state, weight, bias, "silu")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, full[..., t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_state)


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
                                               (torch.bfloat16, torch.float16)])
def test_conv_update_keeps_state_dtype(triton_backend, dtype, state_dtype):
    """The state keeps its dtype; x enters it rounded as torch rounds (bit for bit), also when x's dtype differs.
    Except under Triton's interpreter for x of another dtype into a bf16 state: its fp32 -> bf16 cast truncates
    instead of rounding to nearest (triton 3.8, interpreter.py ``_convert_float``; a GPU rounds), so there the
    state is compared within one bf16 step."""
    b, d, w = 3, 40, 4
    state = torch.randn(b, d, w, device=DEVICE).to(state_dtype)
    ref_state = state.clone()
    x, weight = torch.randn(b, d, device=DEVICE).to(dtype), torch.randn(d, w, device=DEVICE)
    y = ops.causal_conv1d_update(x, state, weight, None, None)
    y_ref = causal_conv1d_update_ref(x, ref_state, weight, None, None)
    assert state.dtype == state_dtype and y.dtype == dtype
    truncating = INTERPRET and state_dtype == torch.bfloat16 and dtype != state_dtype
    torch.testing.assert_close(state, ref_state, rtol=2.0**-7 if truncating else 0, atol=0)
    tol = max(TOL[dtype], TOL[state_dtype])
    torch.testing.assert_close(y, y_ref, rtol=tol[0], atol=tol[1])


# ---------------------------------------------------------------------------------------------------------
# selective_state_update


@pytest.mark.parametrize("dtype,state_dtype,groups,flags", [
    (torch.float32, torch.float32, 0, (1, 1, 1, 1)),
    (torch.float32, torch.float32, 2, (0, 0, 0, 0)),
    (torch.bfloat16, torch.float32, 3, (1, 1, 1, 1)),
    (torch.float16, torch.float16, 0, (1, 0, 1, 1)),
])
def test_selective_state_update_matches_reference(dtype, state_dtype, groups, flags):
    check_state_update("triton", DEVICE, 3, 6, 5, dtype, state_dtype, groups, flags)


# ---------------------------------------------------------------------------------------------------------
# dispatch


def test_use_backend_triton_dispatches_to_the_kernels(monkeypatch):
    calls = []
    real = K.selective_scan_fwd
    monkeypatch.setattr(K, "selective_scan_fwd", lambda *a: calls.append(1) or real(*a))
    u = torch.randn(1, 2, 5, device=DEVICE)
    with ops.use_backend("triton"):
        assert ops.get_backend(DEVICE) == "triton"
        ops.selective_scan(u, torch.rand_like(u), -torch.rand(2, 3, device=DEVICE),
                           torch.randn(1, 3, 5, device=DEVICE), torch.randn(1, 3, 5, device=DEVICE))
    assert calls == [1]


@pytest.mark.gpu
def test_cuda_tensors_prefer_cuda_then_triton():
    """Dispatch order on a GPU machine: the compiled cuda backend if built, else triton."""
    expected = "cuda" if ops.available_backends()["cuda"] == "available" else "triton"
    assert ops.get_backend("cuda") == expected


# ---------------------------------------------------------------------------------------------------------
# model-scale shapes on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "sequential"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selective_scan_gpu_scale(dtype, impl, monkeypatch):
    monkeypatch.setattr(K.selective_scan, "FWD_IMPL", impl)
    inputs = _scan_inputs(2, 256, 16, 2048, dtype, ("var", "var"), z=1, D=1, bias=1, init=1, seq=1)
    _check_scan(inputs, dtype, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_sequential_backward_gpu_scale(deterministic, monkeypatch):
    monkeypatch.setattr(K.selective_scan, "BWD_IMPL", "sequential")
    inputs = _scan_inputs(2, 256, 16, 2048, torch.bfloat16, ("var", "var"), z=1, D=1, bias=1, init=1, seq=1)
    _check_scan(inputs, torch.bfloat16, True, True, deterministic=deterministic)


@pytest.mark.gpu
def test_selective_scan_gpu_scale_deterministic_groups():
    inputs = _scan_inputs(2, 128, 16, 1000, torch.bfloat16, ("g4", "g4"), z=1, D=1, bias=1, init=0, seq=0)
    _check_scan(inputs, torch.bfloat16, True, False, deterministic=True)


@pytest.mark.gpu
def test_decode_step_gpu_scale(triton_backend):
    b, d, n = 4, 5120, 16
    state = torch.randn(b, d, n, device="cuda")
    ref_state = state.clone()
    x, dt = torch.randn(b, d, device="cuda").bfloat16(), torch.rand(b, d, device="cuda").bfloat16()
    A = -torch.rand(d, n, device="cuda")
    B, C = torch.randn(b, n, device="cuda").bfloat16(), torch.randn(b, n, device="cuda").bfloat16()
    D, z, dtb = torch.randn(d, device="cuda"), torch.randn(b, d, device="cuda").bfloat16(), torch.rand(d,
                                                                                                      device="cuda")
    y = ops.selective_state_update(state, x, dt, A, B, C, D, z, dtb, True)
    y_ref = selective_state_update_ref(ref_state, x, dt, A, B, C, D, z, dtb, True)
    torch.testing.assert_close(y, y_ref, rtol=3e-2, atol=5e-2)
    torch.testing.assert_close(state, ref_state, rtol=6e-4, atol=2e-3)


@pytest.mark.gpu
def test_causal_conv1d_gpu_scale():
    b, d, l, w = 2, 1024, 2048, 4
    x = torch.randn(b, d, l, device="cuda").bfloat16().requires_grad_()
    weight = torch.randn(d, w, device="cuda").requires_grad_()
    bias = torch.randn(d, device="cuda").requires_grad_()
    seq = _segments(b, l, torch.Generator().manual_seed(0)).cuda()
    with ops.use_backend("triton"):
        out = ops.causal_conv1d(x, weight, bias, "silu", seq_idx=seq)
    ref = causal_conv1d_ref(x, weight, bias, "silu", seq_idx=seq)  # same bf16 inputs, fp32 inside
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=5e-2)
    dout = torch.randn_like(ref)
    g = torch.autograd.grad(out, (x, weight, bias), dout)
    gr = torch.autograd.grad(ref, (x, weight, bias), dout)
    torch.testing.assert_close(g[0], gr[0], rtol=3e-2, atol=5e-2)
    for a, r in zip(g[1:], gr[1:]):  # fp32 sums of b*l terms
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-2)
