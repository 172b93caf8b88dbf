"""The cuda backend (csrc/cuda) against the fp32 reference ops: on a GPU, and on the CPU under the emulator.

Every test that is not about scale or a GPU-only feature runs on two targets: ``gpu`` (the compiled kernels
on CUDA tensors; marked ``gpu``, skipped without CUDA or without the CUDA build) and ``emu`` (backend
``cuda-emu``: the same csrc/cuda source compiled for the CPU against csrc/emu/cuda_emu.h, every CUDA thread a
fiber synchronised at its shuffles and barriers), which CI runs. The oracle is ``emma_mamba.ops.reference`` run
on the same tensors through the ``torch`` backend, with DESIGN.md's tolerances (mamba-ssm's): outputs/states
fp32 6e-4/2e-3, fp16 3e-3/5e-3, bf16 3e-2/5e-2; weight gradients 1e-3 (or the dtype's if larger); du 2x;
ddelta 5x rtol, 10x atol.

The sequence lengths cross every boundary of the kernels: 1, 7 (one partial lane), 128, 1000, 2048, 2049
(saved-state boundaries every 256 steps, forward chunks of 512, backward chunks of 256) and 8192 (16 forward
chunks; few channels, since the reference is a Python loop over time). seq_idx boundaries are put on and
around those chunk edges. Under the emulator the schedule (the order threads run between synchronisation
points) is also varied: the results must not depend on it.
"""

from typing import NamedTuple

import pytest
import torch

from emma_mamba import ops
from emma_mamba.ops.reference import causal_conv1d_update_ref, selective_scan_ref

SAVE = 256  # the kernels' saved-state granularity / backward chunk (csrc/cuda/selective_scan.cu)
FWD_CHUNK = 512

from .tolerances import (TOL, assert_close, check_batch_sliced_deterministic, check_scan, check_state_update,
                         conv_on_backends, scan_on_backend, segments)


class Target(NamedTuple):
    backend: str
    dev: str


GPU = Target("cuda", "cuda")
EMU = Target("cuda-emu", "cpu")


def _ready(target: Target) -> Target:
    if target is GPU:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        status = ops.available_backends()["cuda"]
        if status != "available":
            pytest.skip(f"cuda backend not built: {status}")
    else:
        with ops.use_backend(target.backend):  # builds the emulator once; a build error fails the test here
            pass
    return target


@pytest.fixture(params=[pytest.param(GPU, id="gpu", marks=pytest.mark.gpu), pytest.param(EMU, id="emu")])
def tgt(request):
    """Both targets: the GPU and the emulator."""
    return _ready(request.param)


@pytest.fixture(params=[pytest.param(GPU, id="gpu", marks=pytest.mark.gpu)])
def gpu(request):
    """The GPU only (scale, CUDA graphs, device placement)."""
    return _ready(request.param)


# ---------------------------------------------------------------------------------------------------------
# selective scan


def _segments(b, l, gen):
    """seq_idx with boundaries at 1 and 2 (a length-1 segment), on and around the kernels' chunk edges."""
    return segments(b, l, gen, {1, 2, SAVE - 1, SAVE, SAVE + 1, FWD_CHUNK, FWD_CHUNK + 1, 3 * SAVE})


def _scan_inputs(t, b, d, n, l, dtype, bc=("var", "var"), z=True, D=True, bias=True, init=True, seq=True,
                 bc_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    wdt = bc_dtype or dtype
    layouts = {"var": lambda: r(b, n, l).to(wdt), "const": lambda: r(d, n),
               "var32": lambda: r(b, n, l), "g2": lambda: r(b, 2, n, l).to(wdt),
               "g3": lambda: r(b, 3, n, l).to(wdt), "g4": lambda: r(b, 4, n, l).to(wdt)}
    x = dict(
        u=r(b, d, l).to(dtype),
        delta=(0.5 * torch.rand(b, d, l, generator=gen) - 0.1).to(dtype),
        A=-0.5 - torch.rand(d, n, generator=gen),
        B=layouts[bc[0]](), C=layouts[bc[1]](),
        D=r(d) if D else None,
        z=r(b, d, l).to(dtype) if z else None,
        delta_bias=0.5 * torch.rand(d, generator=gen) if bias else None,
        initial_state=r(b, d, n) if init else None,
        seq_idx=_segments(b, l, gen) if seq else None,
    )
    return {k: (v.to(t.dev) if v is not None else None) for k, v in x.items()}


def _run_scan(t, inputs, softplus, last_grad, deterministic=None):
    return scan_on_backend(inputs, softplus, last_grad, t.backend, t.dev, deterministic)


def _check_scan(t, inputs, softplus=True, last_grad=True, deterministic=None):
    check_scan(inputs, t.backend, t.dev, softplus, last_grad, deterministic)


SEQLENS = [1, 7, 128, 1000, 2048, 2049, 8192]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("l", SEQLENS)
def test_selective_scan_all_flags_over_seqlens(tgt, l, dtype, packed):
    """z, D, delta_bias, softplus, variable B/C, initial state, a gradient into the last state, with and without
    seq_idx (the packed and the unpacked kernel instances: the LM runs the unpacked ones)."""
    if tgt is EMU and not packed and l > 2049:
        pytest.skip("the emulator runs l 8192 packed only (slow); a GPU runs both")
    d = 2 if l > 2049 else 4
    _check_scan(tgt, _scan_inputs(tgt, 2, d, 8, l, dtype, seq=packed))


# (b, d, n, l, dtype, B/C layouts, B/C dtype, z, D, bias, softplus, init, seq, dlast)
SCAN_CASES = {
    "plain-const": (2, 4, 16, 300, torch.float32, ("const", "const"), None, 0, 0, 0, 0, 0, 0, 0),
    "const-B-var-C": (2, 8, 16, 600, torch.bfloat16, ("const", "var"), None, 1, 1, 0, 1, 1, 0, 1),
    "var-B-const-C": (1, 8, 4, 520, torch.float16, ("var", "const"), None, 0, 1, 1, 1, 0, 1, 0),
    "groups-2": (2, 8, 8, 700, torch.bfloat16, ("g2", "g2"), None, 1, 1, 1, 1, 1, 1, 1),
    "groups-3-odd-per-group": (1, 9, 5, 300, torch.float32, ("g3", "g3"), None, 1, 0, 1, 1, 1, 1, 1),
    "mixed-groups": (2, 8, 8, 257, torch.float32, ("g4", "g2"), None, 1, 1, 0, 0, 1, 0, 1),
    "odd-d-n": (2, 7, 5, 513, torch.float32, ("var", "var"), None, 1, 1, 1, 1, 1, 1, 1),
    "n-40-beyond-a-warp": (1, 4, 40, 300, torch.float32, ("var", "var"), None, 1, 1, 1, 1, 1, 1, 1),
    "fp32-BC-bf16-u": (2, 4, 16, 1000, torch.bfloat16, ("var", "var"), torch.float32, 1, 1, 1, 1, 1, 1, 1),
    "fp32-B-bf16-C": (2, 4, 16, 300, torch.bfloat16, ("var32", "var"), None, 1, 1, 1, 1, 1, 1, 1),
    "no-softplus-no-z": (2, 16, 16, 1030, torch.float16, ("var", "var"), None, 0, 1, 1, 0, 1, 1, 0),
    "wide-d": (2, 64, 16, 2048, torch.bfloat16, ("var", "var"), None, 1, 1, 1, 1, 0, 1, 1),
    # a Mamba-2 layer's scan (Mamba2Mixer): 128 states, B/C in groups, no z
    "mamba2-n128-groups": (1, 4, 128, 130, torch.bfloat16, ("g2", "g2"), None, 0, 1, 1, 1, 1, 1, 1),
    "mamba2-wide": (2, 128, 128, 2048, torch.bfloat16, ("var", "var"), None, 0, 1, 1, 1, 0, 1, 1),
}
GPU_ONLY_CASES = {"wide-d", "mamba2-wide"}


def _check_case(t, spec):
    """A SCAN_CASES-style row against the reference."""
    b, d, n, l, dtype, bc, bcd, z, D, bias, softplus, init, seq, dlast = spec
    inputs = _scan_inputs(t, b, d, n, l, dtype, bc, z, D, bias, init, seq, bc_dtype=bcd)
    _check_scan(t, inputs, bool(softplus), bool(dlast))


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_selective_scan_flag_combinations(tgt, case):
    if case in GPU_ONLY_CASES and tgt is EMU:
        pytest.skip("a scale case: too slow for the emulator (runs on a GPU)")
    _check_case(tgt, SCAN_CASES[case])


@pytest.mark.parametrize("deterministic", [False, True])
def test_selective_scan_both_reduction_modes_match_reference(tgt, deterministic):
    """Atomics (default) and per-block partials (deterministic) for the channel-summed dB/dC."""
    inputs = _scan_inputs(tgt, 2, 32, 16, 1000, torch.float32, ("var", "g2"))
    _check_scan(tgt, inputs, deterministic=deterministic)


def test_selective_scan_deterministic_is_bitwise_reproducible(tgt):
    d = 64 if tgt is GPU else 16  # 16: still several blocks per B/C group (the emulator is slow)
    inputs = _scan_inputs(tgt, 2, d, 16, 2049, torch.bfloat16, ("var", "g4"))
    runs = [_run_scan(tgt, inputs, True, True, deterministic=True) for _ in range(3)]
    for name in runs[0][2]:
        for r in runs[1:]:
            assert torch.equal(runs[0][2][name], r[2][name]), f"d{name} differs between runs"
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("bc", [("var", "g2"), ("const", "var")], ids=["var-B-grouped-C", "const-B-var-C"])
def test_deterministic_backward_in_batch_slices(tgt, monkeypatch, bc):
    """Deterministic dB/dC partials are (b, nblk, n, l) fp32 each (43 GB at b 8, d 5120, n 128, l 8192): above
    EMMA_DETERMINISTIC_PARTIAL_MB the batch goes through in slices. Per-row gradients equal the unsliced call's
    bit for bit; the summed ones (A, D, delta_bias, a constant B) to rounding; both modes match the reference
    and stay reproducible."""
    inputs = _scan_inputs(tgt, 3, 16, 8, 300, torch.float32, bc)
    check_batch_sliced_deterministic(lambda x: _run_scan(tgt, x, True, True, deterministic=True),
                                     lambda x: _check_scan(tgt, x, deterministic=True), inputs, monkeypatch)


def test_selective_scan_deterministic_env_and_torch_flag(tgt, monkeypatch):
    """deterministic=None follows EMMA_MAMBA_DETERMINISTIC (bitwise-equal grads across runs)."""
    monkeypatch.setenv("EMMA_MAMBA_DETERMINISTIC", "1")
    inputs = _scan_inputs(tgt, 1, 16, 8, 600, torch.float32, ("var", "var"))
    a = _run_scan(tgt, inputs, True, True)[2]
    b = _run_scan(tgt, inputs, True, True)[2]
    for k in a:
        assert torch.equal(a[k], b[k]), f"d{k} differs between runs"


def test_selective_scan_saves_only_chunk_boundary_states(tgt):
    b, d, n, l = 1, 8, 16, 2049
    inputs = _scan_inputs(tgt, b, d, n, l, torch.float32)
    leaf = {k: (v.requires_grad_() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    sizes = []
    with ops.use_backend(tgt.backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = ops.selective_scan(**leaf, delta_softplus=True)
    assert max(sizes) < b * d * l * n, f"a saved tensor has {max(sizes)} >= b*d*l*n = {b * d * l * n} elements"
    with ops.use_backend(tgt.backend):
        out.sum().backward()
    assert leaf["u"].grad is not None


def test_decode_steps_equal_the_scan(tgt):
    """selective_state_update step by step reproduces selective_scan (outputs and last state)."""
    b, d, n, l = 2, 8, 16, 40
    x = _scan_inputs(tgt, b, d, n, l, torch.float32, ("g2", "g2"), seq=False)
    with ops.use_backend(tgt.backend):
        out, last = ops.selective_scan(**x, delta_softplus=True, return_last_state=True)
        state = x["initial_state"].clone()
        steps = [ops.selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                            x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], True)
                 for t in range(l)]
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, last, rtol=1e-4, atol=1e-4)


def test_packed_sequences_equal_separate_runs(tgt):
    """Two sequences packed in one row (boundary off the chunk grid) give the outputs and gradients of two
    separate runs; the initial state feeds the first only."""
    d, n, l1, l2 = 8, 16, 700, 333
    full = _scan_inputs(tgt, 1, d, n, l1 + l2, torch.float32, seq=False)
    full = {k: v for k, v in full.items() if v is not None}
    seq = torch.tensor([[0] * l1 + [3] * l2], dtype=torch.int32, device=tgt.dev)
    w = torch.linspace(-1, 1, l1 + l2, device=tgt.dev)
    with ops.use_backend(tgt.backend):
        leaf = {k: v.clone().requires_grad_() for k, v in full.items()}
        out, last = ops.selective_scan(**leaf, delta_softplus=True, return_last_state=True, seq_idx=seq)
        (out * w).sum().backward()

        def part(sl, with_init):
            p = {k: v.clone().requires_grad_() for k, v in full.items()}
            a = {k: (p[k][..., sl] if k in ("u", "delta", "z", "B", "C") else p[k]) for k in p}
            if not with_init:
                a["initial_state"] = None
            o, st = ops.selective_scan(**a, delta_softplus=True, return_last_state=True)
            (o * w[sl]).sum().backward()
            return o, st, p

        o1, _, p1 = part(slice(0, l1), True)
        o2, st2, p2 = part(slice(l1, l1 + l2), False)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, torch.cat([o1, o2], -1), **tol)
    torch.testing.assert_close(last, st2, **tol)
    for k in ("u", "delta", "z", "B", "C", "A", "D", "delta_bias"):
        torch.testing.assert_close(leaf[k].grad, p1[k].grad + p2[k].grad, **tol, msg=lambda m: f"d{k}: {m}")
    torch.testing.assert_close(leaf["initial_state"].grad, p1["initial_state"].grad, **tol)


# the state-sequential forward (EMMA_CUDA_SCAN_FWD=seq): variable B/C, n <= 16; blocks of 128 channels
SEQ_FWD_CASES = {  # b, d, n, l, dtype, B/C layouts, B/C dtype
    "L1": (2, 4, 16, 1, torch.float32, ("var", "var"), None),
    "L7-bf16": (2, 4, 16, 7, torch.bfloat16, ("var", "var"), None),
    "L300-partial-block": (2, 130, 16, 300, torch.bfloat16, ("var", "var"), None),
    "groups-of-128-n5": (1, 256, 5, 600, torch.float16, ("g2", "g2"), None),
    "L2049-fp32": (1, 8, 16, 2049, torch.float32, ("var", "var"), None),
    "fp32-BC-bf16-u": (2, 4, 16, 520, torch.bfloat16, ("var", "var"), torch.float32),
}


@pytest.mark.parametrize("case", list(SEQ_FWD_CASES))
def test_state_sequential_forward_matches_reference(tgt, case, monkeypatch):
    monkeypatch.setenv("EMMA_CUDA_SCAN_FWD", "seq")
    b, d, n, l, dtype, bc, bcd = SEQ_FWD_CASES[case]
    _check_scan(tgt, _scan_inputs(tgt, b, d, n, l, dtype, bc, bc_dtype=bcd))


def _raw_forward(t, inputs):
    """The backend's selective_scan_fwd entry point itself: (out, last_state, saved states)."""
    x = inputs
    kern = ops._load(t.backend)
    return kern.selective_scan_fwd(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                   True, x["initial_state"], x["seq_idx"])


@pytest.mark.parametrize("bc", [("var", "var"), ("const", "var"), ("g3", "g3")], ids=str)
def test_both_forwards_save_the_same_states(tgt, bc, monkeypatch):
    """The backward is shared, so both forwards must save the same chunk-boundary states (and give the same
    outputs); where seq does not apply (constant B, groups of 3 channels) it runs the warp kernel: bitwise equal."""
    x = _scan_inputs(tgt, 2, 24 if bc[0] == "g3" else 8, 16, 700, torch.float32, bc)
    monkeypatch.setenv("EMMA_CUDA_SCAN_FWD", "warp")
    warp = _raw_forward(tgt, x)
    monkeypatch.setenv("EMMA_CUDA_SCAN_FWD", "seq")
    seq = _raw_forward(tgt, x)
    for name, a, b in zip(("out", "last_state", "saved"), warp, seq):
        if bc == ("var", "var"):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), f"{name}: the fallback is not the warp kernel"


def test_unknown_forward_name_is_an_error(tgt, monkeypatch):
    monkeypatch.setenv("EMMA_CUDA_SCAN_FWD", "fast")
    x = _scan_inputs(tgt, 1, 4, 4, 9, torch.float32)
    with pytest.raises(RuntimeError, match="EMMA_CUDA_SCAN_FWD must be warp or seq, got 'fast'"):
        _raw_forward(tgt, x)


# the state-sequential backward (EMMA_CUDA_SCAN_BWD=seq): variable B/C, n <= 16; blocks of 32 channels
SEQ_BWD_CASES = {  # b, d, n, l, dtype, B/C layouts, B/C dtype, z, D, bias, softplus, init, seq, dlast
    "L1": (2, 4, 16, 1, torch.float32, ("var", "var"), None, 1, 1, 1, 1, 1, 1, 1),
    "L7-bf16": (2, 4, 16, 7, torch.bfloat16, ("var", "var"), None, 1, 1, 1, 1, 1, 1, 1),
    "L300-partial-block-n5": (1, 40, 5, 300, torch.bfloat16, ("var", "var"), None, 1, 1, 1, 1, 1, 1, 1),
    "groups-of-32-fp16": (2, 64, 16, 520, torch.float16, ("g2", "g2"), None, 1, 1, 1, 1, 1, 1, 0),
    "L2049-fp32-chunks": (1, 8, 16, 2049, torch.float32, ("var", "var"), None, 1, 1, 1, 1, 1, 1, 1),
    "no-z-no-softplus": (2, 8, 8, 513, torch.float32, ("var", "var"), None, 0, 0, 0, 0, 0, 1, 1),
    "fp32-BC-bf16-u": (2, 4, 16, 260, torch.bfloat16, ("var", "var"), torch.float32, 1, 1, 1, 1, 0, 0, 1),
}


@pytest.mark.parametrize("case", list(SEQ_BWD_CASES))
def test_state_sequential_backward_matches_reference(tgt, case, monkeypatch):
    monkeypatch.setenv("EMMA_CUDA_SCAN_BWD", "seq")
    _check_case(tgt, SEQ_BWD_CASES[case])


@pytest.mark.parametrize("deterministic", [False, True])
def test_state_sequential_backward_both_reduction_modes(tgt, deterministic, monkeypatch):
    """Atomics and per-block partials, several blocks per B/C group (64 channels, blocks of 32)."""
    monkeypatch.setenv("EMMA_CUDA_SCAN_BWD", "seq")
    inputs = _scan_inputs(tgt, 2, 128 if tgt is GPU else 64, 16, 600, torch.float32, ("var", "g2"))
    _check_scan(tgt, inputs, deterministic=deterministic)
    if deterministic:
        runs = [_run_scan(tgt, inputs, True, True, deterministic=True)[2] for _ in range(2)]
        for k in runs[0]:
            assert torch.equal(runs[0][k], runs[1][k]), f"d{k} differs between runs"


@pytest.mark.parametrize("bc", [("const", "var"), ("g3", "g3"), ("var", "var")], ids=str)
def test_state_sequential_backward_falls_back_or_agrees(tgt, bc, monkeypatch):
    """Where seq does not apply (constant B, groups of 3 channels, here also n = 40 > 16) the warp kernel runs:
    bitwise the same gradients; where it applies, the same within rounding."""
    n = 16 if bc == ("var", "var") else 40
    x = _scan_inputs(tgt, 2, 24 if bc[0] == "g3" else 8, n, 300, torch.float32, bc)
    grads = {}
    for impl in ("warp", "seq"):
        monkeypatch.setenv("EMMA_CUDA_SCAN_BWD", impl)
        grads[impl] = _run_scan(tgt, x, True, True, deterministic=True)[2]
    for k, a in grads["warp"].items():
        if bc == ("var", "var"):
            torch.testing.assert_close(grads["seq"][k], a, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{k}: {m}")
        else:
            assert torch.equal(grads["seq"][k], a), f"d{k}: the fallback is not the warp kernel"


def test_unknown_backward_name_is_an_error(tgt, monkeypatch):
    monkeypatch.setenv("EMMA_CUDA_SCAN_BWD", "fast")
    x = _scan_inputs(tgt, 1, 4, 4, 9, torch.float32)
    with pytest.raises(RuntimeError, match="EMMA_CUDA_SCAN_BWD must be warp or seq, got 'fast'"):
        _run_scan(tgt, x, True, True)


def test_selective_scan_rejects_cpu_tensors_on_cuda_backend(gpu):
    u = torch.randn(1, 2, 5)
    with ops.use_backend("cuda"), pytest.raises(ops.BackendUnavailableError, match="cannot run on cpu"):
        ops.selective_scan(u, u.clone(), -torch.rand(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))


# ---------------------------------------------------------------------------------------------------------
# causal conv1d

CONV_LENS = [1, 7, 128, 1000, 1025, 2049, 8192]


def _conv_case(t, b, d, l, w, dtype, bias, silu, init, seq, wdtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wdt = wdtype or dtype
    inputs = dict(x=torch.randn(b, d, l, generator=gen).to(dtype), weight=torch.randn(d, w, generator=gen).to(wdt),
                  bias=torch.randn(d, generator=gen).to(wdt) if bias else None,
                  initial_states=torch.randn(b, d, w - 1, generator=gen).to(dtype) if init else None)
    seq_idx = _segments(b, l, gen).to(t.dev) if seq else None
    dout = torch.randn(b, d, l, generator=gen).to(dtype).to(t.dev)
    res = conv_on_backends((t.backend, "torch"), inputs, dout, t.dev, "silu" if silu else None, seq_idx)
    rtol, atol = TOL[dtype]
    assert_close("out", res[t.backend][0], res["torch"][0], rtol, atol)
    for k, ref in res["torch"][1].items():
        tol = (rtol, atol)
        if k in ("weight", "bias"):  # sums over b*l products
            tol = (max(rtol, 1e-3), max(atol, 1e-3, rtol * ref.abs().max().item()))
        assert_close(f"d{k}", res[t.backend][1][k], ref, *tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("l", CONV_LENS)
@pytest.mark.parametrize("w", [2, 3, 4])
def test_causal_conv1d_all_flags_over_seqlens(tgt, w, l, dtype):
    _conv_case(tgt, 2, 8, l, w, dtype, bias=True, silu=True, init=True, seq=True)


@pytest.mark.parametrize("flags", [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1),
                                   (1, 1, 1, 1)])
def test_causal_conv1d_flag_combinations(tgt, flags):
    bias, silu, init, seq = flags
    _conv_case(tgt, 3, 20, 700, 4, torch.float32, bias, silu, init, seq)
    _conv_case(tgt, 2, 8, 301, 3, torch.bfloat16, bias, silu, init, seq, wdtype=torch.float32)


def test_causal_conv1d_short_packed_rows_with_initial_states(tgt):
    """A boundary at t=1 on a length-3 row: the initial states must not reach past position 0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, generator=gen, device="cpu").to(tgt.dev).requires_grad_()
    w = torch.randn(4, 4, device=tgt.dev).requires_grad_()
    init = torch.randn(1, 4, 3, device=tgt.dev).requires_grad_()
    seq = torch.tensor([[0, 1, 1]], dtype=torch.int32, device=tgt.dev)
    outs = []
    for backend in (tgt.backend, "torch"):
        with ops.use_backend(backend):
            o = ops.causal_conv1d(x, w, None, "silu", initial_states=init, seq_idx=seq)
            outs.append((o, torch.autograd.grad(o.sum(), [x, w, init])))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w", [2, 3, 4])
def test_causal_conv1d_inf_stays_in_the_filter_window(tgt, w):
    """An inf at position 5 reaches outputs 5 .. 5 + w - 1 only, forward and backward, as the reference: the
    kernel's taps past the width (weight 0 in a 4-tap loop) must not multiply it (0 * inf is NaN)."""
    x = torch.randn(1, 4, 40, device=tgt.dev)
    x[..., 5] = float("inf")
    x.requires_grad_()
    wt = torch.randn(4, w, device=tgt.dev)
    dout = torch.zeros(1, 4, 40, device=tgt.dev)
    dout[..., 20] = float("inf")  # dx: positions 20 - w + 1 .. 20 only
    bad = {}
    for backend in (tgt.backend, "torch"):
        with ops.use_backend(backend):
            out = ops.causal_conv1d(x, wt)
            dx, = torch.autograd.grad(out, [x], dout)
            bad[backend] = ((~out.isfinite()).any(1).nonzero()[:, 1].tolist(),
                            (~dx.isfinite()).any(1).nonzero()[:, 1].tolist())
    assert bad["torch"] == (list(range(5, 5 + w)), list(range(21 - w, 21)))
    assert bad[tgt.backend] == bad["torch"]


@pytest.mark.parametrize("w", [2, 3, 4])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_update_steps_equal_reference_and_conv(tgt, w, state_dtype):
    b, d, l = 2, 64, 9
    x = torch.randn(b, d, l, device=tgt.dev)
    weight, bias = torch.randn(d, w, device=tgt.dev), torch.randn(d, device=tgt.dev)
    init = torch.randn(b, d, w - 1, device=tgt.dev)
    with ops.use_backend(tgt.backend):
        full = ops.causal_conv1d(x, weight, bias, "silu", initial_states=init)
        state = torch.cat([torch.zeros(b, d, 1, device=tgt.dev), init], -1).to(state_dtype).contiguous()
        ref_state = state.clone()
        for t in range(l):
            y = ops.causal_conv1d_update(x[..., t], state, weight, bias, "silu")
            y_ref = causal_conv1d_update_ref(x[..., t], ref_state, weight, bias, "silu")
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            if state_dtype == torch.float32:
                torch.testing.assert_close(y, full[..., t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# selective_state_update


@pytest.mark.parametrize("dtype,state_dtype,groups,n,flags", [
    (torch.float32, torch.float32, 0, 16, (1, 1, 1, 1)),
    (torch.float32, torch.float32, 2, 16, (0, 0, 0, 0)),
    (torch.bfloat16, torch.float32, 4, 16, (1, 1, 1, 1)),
    (torch.bfloat16, torch.bfloat16, 0, 16, (1, 1, 1, 1)),
    (torch.float16, torch.float16, 0, 5, (1, 0, 1, 1)),
    (torch.float32, torch.float32, 0, 64, (1, 1, 1, 1)),
    (torch.float32, torch.float32, 0, 200, (1, 1, 0, 1)),
    (torch.float16, torch.float32, 3, 7, (0, 1, 1, 0)),
])
def test_selective_state_update_matches_reference(tgt, dtype, state_dtype, groups, n, flags):
    check_state_update(tgt.backend, tgt.dev, 3, 24, n, dtype, state_dtype, groups, flags)


def test_decode_steps_are_cuda_graph_capturable(gpu):
    """One decode step (conv update + state update) captured in a CUDA graph and replayed matches eager
    steps: no host synchronisation or allocation outside the graph pool inside the ops."""
    b, d, n, w = 1, 512, 16, 4
    g = torch.Generator(device=gpu.dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=gpu.dev, generator=g)  # noqa: E731
    A, D, dt_bias, cw, cb = -0.5 - torch.rand(d, n, device=gpu.dev), r(d), torch.rand(d, device=gpu.dev), r(d, w), r(d)
    x, dt, z, B, C = r(b, d), torch.rand(b, d, device=gpu.dev), r(b, d), r(b, n), r(b, n)
    state0, conv0 = r(b, d, n), r(b, d, w)

    def step(state, conv):
        xc = ops.causal_conv1d_update(x, conv, cw, cb, "silu")
        return ops.selective_state_update(state, xc, dt, A, B, C, D, z, dt_bias, True)

    with ops.use_backend(gpu.backend):
        state, conv = state0.clone(), conv0.clone()
        eager = [step(state, conv) for _ in range(3)]
        gstate, gconv = state0.clone(), conv0.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the capture
            step(gstate.clone(), gconv.clone())
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(gstate, gconv)
        outs = []
        for _ in range(3):
            graph.replay()
            outs.append(out.clone())
    for e, o in zip(eager, outs):
        torch.testing.assert_close(o, e, rtol=0, atol=0)
    torch.testing.assert_close(gstate, state, rtol=0, atol=0)
    torch.testing.assert_close(gconv, conv, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# model-scale shape


def test_selective_scan_model_scale_bf16(gpu):
    """mamba-2.8b-like channels (d=256 of 5120), L=2048, bf16, every flag."""
    inputs = _scan_inputs(gpu, 2, 256, 16, 2048, torch.bfloat16)
    _check_scan(gpu, inputs)


def test_deterministic_backward_at_a_mamba2_width_in_slices(gpu, monkeypatch):
    """Mamba-2's scan (n = 128, grouped B/C, no z) at d 2048, l 2049, b 4: the deterministic backward's dB/dC
    partials (about 2 GB) forced into batch slices by a 512 MB budget, against the atomic mode (fp32 sums in
    another order) and itself run twice (bit for bit)."""
    inputs = _scan_inputs(gpu, 4, 2048, 128, 2049, torch.bfloat16, ("g2", "g2"), z=False, init=False)
    atomic = _run_scan(gpu, inputs, True, True, deterministic=False)
    monkeypatch.setenv("EMMA_DETERMINISTIC_PARTIAL_MB", "512")
    runs = [_run_scan(gpu, inputs, True, True, deterministic=True) for _ in range(2)]
    torch.testing.assert_close(runs[0][0], atomic[0], rtol=0, atol=0)  # the forward does not change
    for name, g in atomic[2].items():
        assert torch.equal(runs[0][2][name], runs[1][2][name]), name
        scale = g.float().abs().max().clamp_min(1e-6)
        assert (runs[0][2][name].float() - g.float()).abs().max() <= 1e-2 * scale, name


def test_reference_oracle_is_independent_of_the_backend(tgt):
    """Sanity: the oracle really is the Python loop (not the cuda kernel) in these tests."""
    x = _scan_inputs(tgt, 1, 2, 4, 9, torch.float32)
    with ops.use_backend("torch"):
        assert ops.get_backend(tgt.dev) == "torch"
        a = ops.selective_scan(**x, delta_softplus=True)
    b = selective_scan_ref(**x, delta_softplus=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
