"""The CUDA emulator (csrc/emu) that lets CI run csrc/cuda's kernels on the CPU: its warp shuffles against the
CUDA programming guide's definitions (hand-computed here), its schedule orders exposing a shared-memory race,
the undefined behaviour it must report rather than run, and the CUDA kernels' results not depending on the
schedule (bitwise, in the deterministic mode)."""

import pytest
import torch

from emma_mamba import ops
from emma_mamba.bench.kernels_gpu import cuda_backward, cuda_forward
from emma_mamba.ops import cuda_emulator

from .test_cuda_backend import EMU, _scan_inputs
from .tolerances import segments


@pytest.fixture(scope="module")
def emu():
    mod = cuda_emulator.load()  # a build error fails here
    yield mod
    mod.set_schedule("forward", 0)


@pytest.fixture
def forward_after(emu):
    yield
    emu.set_schedule("forward", 0)


def _shuffle_expected(threads, delta, width):
    """(threads, 4): shfl_up, shfl_down, shfl_xor, shfl (index) of v = 100 * warp + lane, per the CUDA
    programming guide: up/down never leave the lane's width-segment (the lane keeps its own value then); xor
    may read earlier segments but not later ones; the index is taken modulo width within the segment."""
    v = lambda t: 100.0 * (t // 32) + t % 32  # noqa: E731
    rows = []
    for t in range(threads):
        lane, wbase = t % 32, t - t % 32
        base = lane - lane % width
        sub = lane - base
        up = v(t - delta) if sub - delta >= 0 else v(t)
        down = v(t + delta) if sub + delta < width else v(t)
        x = lane ^ delta
        xor = v(wbase + x) if x < base + width else v(t)
        idx = v(wbase + base + delta % width)
        rows.append([up, down, xor, idx])
    return torch.tensor(rows)


@pytest.mark.parametrize("delta,width", [(1, 32), (3, 32), (16, 32), (3, 8), (5, 16), (16, 16), (2, 4)])
def test_shuffles_match_the_cuda_definitions(emu, delta, width):
    got = emu.selftest("shuffles", 64, delta, width).view(64, 4)
    torch.testing.assert_close(got, _shuffle_expected(64, delta, width), rtol=0, atol=0)


def test_schedule_order_exposes_a_shared_memory_race(emu, forward_after):
    """Each thread reads its neighbour's shared slot. Without the barrier the result depends on the order the
    threads run in (and reads the NaN that fills fresh shared memory); with it, every order gives the answer."""
    n = 64
    want = torch.tensor([float((t + 1) % n) for t in range(n)])
    racy = {}
    for order in ("forward", "reverse", "random"):
        emu.set_schedule(order, 3)
        torch.testing.assert_close(emu.selftest("neighbour", n, 1)[:n], want, rtol=0, atol=0)
        racy[order] = emu.selftest("neighbour", n, 0)[:n]
    assert torch.isnan(racy["forward"]).sum() == n - 1  # each read before its neighbour wrote (but the last)
    assert not torch.isnan(racy["reverse"]).any() or torch.isnan(racy["reverse"]).sum() == 1
    assert not torch.equal(racy["forward"].nan_to_num(-1), racy["reverse"].nan_to_num(-1))


def test_static_shared_memory_is_fresh_in_every_block(emu):
    """A static __shared__ array that block 1 reads without writing reads NaN (fresh shared memory), not the
    values block 0 left there: a missing staging write shows in the outputs, as it would on a GPU."""
    n = 64
    out = emu.selftest("static_fresh", n)
    torch.testing.assert_close(out[:n], torch.arange(n, dtype=torch.float32), rtol=0, atol=0)
    assert torch.isnan(out[n:2 * n]).all()


def test_random_schedule_reorders_atomics_at_every_launch(emu, forward_after):
    """Under a random schedule the blocks run in a new order at every launch, so the atomic backward's float sums
    differ from run to run (as on a GPU) while the deterministic mode stays bitwise equal: the emulated
    reproducibility tests can tell the two modes apart."""
    from .test_cuda_backend import _run_scan

    inputs = _scan_inputs(EMU, 2, 16, 16, 600, torch.bfloat16, ("var", "g4"))
    emu.set_schedule("random", 7)
    det = [_run_scan(EMU, inputs, True, True, deterministic=True)[2] for _ in range(2)]
    atomic = [_run_scan(EMU, inputs, True, True, deterministic=False)[2] for _ in range(2)]
    assert all(torch.equal(det[0][k], det[1][k]) for k in det[0])
    assert not all(torch.equal(atomic[0][k], atomic[1][k]) for k in atomic[0])
    for k in det[0]:  # the same gradients to rounding
        torch.testing.assert_close(atomic[0][k], det[0][k], rtol=2e-2, atol=2e-2)


def _bad_shape_calls():
    """(what is wrong, a call of the emulated CUDA binding with it, the message) for each argument whose size the
    kernels take from the others."""
    b, d, n, l, w = 1, 2, 4, 16, 4
    r = torch.randn
    u, dl, A, B = r(b, d, l), torch.rand(b, d, l), -torch.rand(d, n), r(b, n, l)
    scan = lambda **kw: lambda m: m.selective_scan_fwd(  # noqa: E731
        u, kw.get("delta", dl), A, kw.get("B", B), kw.get("C", B), kw.get("D"), kw.get("z"), kw.get("bias"), True,
        kw.get("init"), kw.get("seq"))
    st, x2 = r(b, d, n), r(b, d)
    step = lambda **kw: lambda m: m.selective_state_update(  # noqa: E731
        st.clone(), kw.get("x", x2), kw.get("dt", torch.rand(b, d)), A, kw.get("B", r(b, n)), kw.get("C", r(b, n)),
        kw.get("D"), kw.get("z"), kw.get("bias"), True)
    cx, cw = r(b, d, l), r(d, w)
    conv = lambda **kw: lambda m: m.causal_conv1d_fwd(  # noqa: E731
        cx, cw, kw.get("bias"), kw.get("init"), kw.get("seq"), True)
    seq = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    return [
        ("scan delta", scan(delta=torch.rand(b, d, l // 2)), r"delta must have shape \[1, 2, 16\], got \[1, 2, 8\]"),
        ("scan B", scan(B=r(b, n, l // 2)), r"B must have shape \[1, 4, 16\]"),
        ("scan grouped C", scan(C=r(b, 2, n, l - 1)), r"C must have shape \[1, 2, 4, 16\]"),
        ("scan constant B", scan(B=r(d, n + 1)), r"B must have shape \[2, 4\]"),
        ("scan D", scan(D=r(1)), r"D must have shape \[2\]"),
        ("scan z", scan(z=r(b, d, l - 1)), r"z must have shape"),
        ("scan delta_bias", scan(bias=r(3)), r"delta_bias must have shape"),
        ("scan initial_state", scan(init=r(1, 1, 1)), r"initial_state must have shape \[1, 2, 4\]"),
        ("scan seq_idx", scan(seq=seq(b, 1)), r"seq_idx must have shape \[1, 16\]"),
        ("step x", step(x=r(b, d + 1)), r"x must have shape \[1, 2\]"),
        ("step dt", step(dt=r(b, 1)), r"dt must have shape"),
        ("step B", step(B=r(b, 1), C=r(b, 1)), r"B must have shape \[1, 4\]"),
        ("step D", step(D=r(5)), r"D must have shape"),
        ("step z", step(z=r(b, 1)), r"z must have shape"),
        ("step dt_bias", step(bias=r(1)), r"dt_bias must have shape"),
        ("conv bias", conv(bias=r(1)), r"bias must have shape \[2\]"),
        ("conv initial_states", conv(init=r(b, d, 1)), r"initial_states must have shape \[1, 2, 3\]"),
        ("conv seq_idx", conv(seq=seq(b, 3)), r"seq_idx must have shape \[1, 16\]"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_shape_calls())))
def test_cuda_entry_points_refuse_a_mis_shaped_argument(emu, case):
    """The CUDA binding's own checks (emma_mamba._C.<op>_cuda and torch.ops.emma_mamba reach the kernels without
    the ops layer's): an argument whose size does not follow from the others is named, never read past its end."""
    what, call, message = _bad_shape_calls()[case]
    with pytest.raises(RuntimeError, match=message):
        call(emu)


@pytest.mark.parametrize("kernel,message", [
    ("shuffle_after_exit", r"warp 0: lanes 0-2,4-31 wait at a shuffle \(line \d+\) with the full mask, but "
                           r"lanes 3 have exited"),
    ("split_warp", r"warp 0: lanes 0-15 wait at a shuffle \(line \d+\) while lanes 16-31 wait at "
                   r"__syncthreads"),
    ("partial_mask", r"partial mask is not emulated"),
])
def test_undefined_behaviour_is_an_error(emu, kernel, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(kernel, 64)


def test_selftest_rejects_an_unknown_kernel(emu):
    with pytest.raises(ValueError, match="no self-test kernel named 'nope'"):
        emu.selftest("nope", 32)


def test_unknown_schedule_is_rejected(emu):
    with pytest.raises(ValueError, match="forward, reverse or random"):
        emu.set_schedule("sideways", 0)


def _all_kernels(seed=0):
    """Every CUDA kernel once on small inputs that cross their chunk edges: the scan forward and
    (deterministic) backward with grouped B/C, seq_idx and an initial state, the state-sequential forward and
    backward,
    the conv forward/backward, and both decode steps -> a flat list of result tensors."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    b, d, n, l = 2, 16, 4, 600
    x = _scan_inputs(EMU, b, d, n, l, torch.float32, ("g2", "var"), seed=seed)
    leaf = {k: v.requires_grad_() for k, v in x.items() if k != "seq_idx"}
    dout = r(b, d, l)
    with ops.use_backend("cuda-emu"):
        out, last = ops.selective_scan(**x, delta_softplus=True, return_last_state=True, deterministic=True)
        grads = torch.autograd.grad((out * dout).sum() + last.sum(), list(leaf.values()))
        with cuda_forward("seq"):  # 16 channels in a block of 128 threads: 4 warps around the B/C staging
            seq_out = ops.selective_scan(**{**x, "B": x["C"]}, delta_softplus=True)
        with cuda_backward("seq"):  # 16 channels in a block of 32 rows: 2 warps idle at every barrier
            sx = {**x, "B": leaf["C"]}
            o2 = ops.selective_scan(**sx, delta_softplus=True, deterministic=True)
            seq_grads = torch.autograd.grad((o2 * dout).sum(), [leaf[k] for k in ("u", "delta", "C", "A")])
        x, w = r(b, d, 1100).requires_grad_(), r(d, 4).requires_grad_()
        y = ops.causal_conv1d(x, w, None, "silu", seq_idx=segments(b, 1100, gen, {1024}))
        cgrads = torch.autograd.grad((y * r(b, d, 1100)).sum(), [x, w])
        state, conv = r(b, d, n), r(b, d, 4)
        step = ops.selective_state_update(state, r(b, d), torch.rand(b, d, generator=gen), leaf["A"].detach(),
                                          r(b, n), r(b, n), None, r(b, d), None, True)
        cstep = ops.causal_conv1d_update(r(b, d), conv, w.detach(), None, "silu")
    return [out, last, *grads, seq_out, *seq_grads, y, *cgrads, state, conv, step, cstep]



def test_cuda_kernels_do_not_depend_on_the_schedule(emu, forward_after):
    """Threads of a block run in forward, reverse and two random orders (blocks too): every output and
    gradient is bitwise the same, so no result hangs on an ordering the GPU does not guarantee."""
    emu.set_schedule("forward", 0)
    base = _all_kernels()
    for order, seed in (("reverse", 0), ("random", 1), ("random", 2)):
        emu.set_schedule(order, seed)
        for i, (a, b) in enumerate(zip(base, _all_kernels())):
            assert torch.equal(a, b), f"result {i} differs under the {order} schedule (seed {seed})"


# every kernel over odd and aligned shapes (vectorised and scalar paths, partial lanes, chunk and tile edges)
_SCAN_GRID = [  # b, d, n, l, dtype, B layout, C layout, inputs put off 16-byte alignment (or "z-view": z a view)
    (1, 4, 5, 1, torch.float32, "var", "var", ()),
    (2, 4, 8, 7, torch.bfloat16, "g2", "const", ()),
    (2, 8, 16, 37, torch.float16, "var", "g2", ()),
    (1, 4, 40, 300, torch.float32, "const", "var", ()),
    (1, 4, 8, 256, torch.float32, "var", "var", ()),
    (1, 4, 8, 256, torch.float32, "var", "var", ("u",)),
    (1, 4, 8, 256, torch.float32, "var", "var", ("delta",)),
    (1, 4, 8, 256, torch.float32, "var", "var", ("z",)),
    (2, 8, 16, 64, torch.bfloat16, "g2", "var", ("B",)),
    (2, 8, 16, 64, torch.bfloat16, "var", "g2", ("C",)),
    (2, 8, 4, 513, torch.bfloat16, "var32", "var", ()),
    (1, 4, 8, 1032, torch.float16, "g4", "g4", ()),
    (2, 8, 16, 64, torch.bfloat16, "var", "var", ("z-view",)),
    (2, 4, 8, 300, torch.float32, "var", "g2", ("z-view",)),
    # "A-shared": every lane of a channel has the same A (Mamba-2's heads: the cpu kernels' shared-decay paths,
    # 3 lane blocks in one loop across a chunk edge, and a single block)
    (2, 4, 40, 300, torch.float32, "var", "g2", ("A-shared",)),
    (1, 4, 16, 7, torch.bfloat16, "const", "const", ("A-shared",)),
]


def _second_half(t):
    """t's values as the second half of a tensor twice as wide along dim 1 (the mixer's z of in_proj's output): a
    view the kernels read in place, whose last row ends where its buffer ends (an over-read leaves the
    allocation)."""
    buf = torch.empty(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype)
    v = buf[:, t.shape[1]:]
    v.copy_(t)
    assert not v.is_contiguous() and v.stride(-1) == 1
    return v


def _misaligned(t):
    """t's values in a contiguous tensor whose data pointer is one element past a 16-byte boundary (the
    kernels must then fall back from 16-byte vector accesses)."""
    buf = torch.empty(t.numel() + 16 // t.element_size(), dtype=t.dtype)
    v = buf[1:1 + t.numel()].view(t.shape)
    v.copy_(t)
    assert v.is_contiguous() and v.data_ptr() % 16 != 0
    return v


def exercise_every_kernel(backend="cuda-emu", seed=0, scan_only=False) -> int:
    """Runs each kernel of ``backend`` (through the ops) over _SCAN_GRID and (unless ``scan_only``) the conv and
    decode-step grids, every flag on and off, both backward modes; checks that results are finite and returns how
    many op calls ran. The sanitiser tests run it in a sanitised process (the CUDA kernels here, the CPU kernels
    in test_cpu_backend)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    calls = 0
    with ops.use_backend(backend):
        for b, d, n, l, dtype, lb, lc, off in _SCAN_GRID:
            for flags, det in ((True, False), (False, True)):
                x = _scan_inputs(EMU, b, d, n, l, dtype, (lb, lc), z=flags, D=flags, bias=flags, init=flags,
                                 seq=flags, seed=seed)
                x = {k: (_misaligned(v) if k in off else _second_half(v) if f"{k}-view" in off else v)
                     if v is not None else v for k, v in x.items()}
                if "A-shared" in off:
                    x["A"] = x["A"][:, :1].expand(-1, n).contiguous()
                leaves = [v.requires_grad_() for k, v in x.items() if v is not None and k != "seq_idx"]
                out, last = ops.selective_scan(**x, delta_softplus=flags, return_last_state=True, deterministic=det)
                grads = torch.autograd.grad(out.float().sum() + last.sum(), leaves)
                assert all(torch.isfinite(g).all() for g in (out, last, *grads))
                calls += 2
        if scan_only:
            return calls
        for w in (2, 3, 4):
            for l, dtype, flags in ((1, torch.float32, True), (7, torch.bfloat16, False), (1030, torch.float32, True),
                                    (1024, torch.float16, False)):
                xx = r(2, 4, l).to(dtype)
                xx = (_misaligned(xx) if l == 1024 else _second_half(xx) if l == 7 else xx).requires_grad_()
                wt = r(4, w).requires_grad_()
                bias = r(4).requires_grad_() if flags else None
                init = r(2, 4, w - 1).to(dtype).requires_grad_() if flags else None
                seq = segments(2, l, gen, {1, 1024}) if flags else None
                y = ops.causal_conv1d(xx, wt, bias, "silu" if flags else None, initial_states=init, seq_idx=seq)
                leaves = [t for t in (xx, wt, bias, init) if t is not None]
                grads = torch.autograd.grad(y.float().sum(), leaves)
                assert all(torch.isfinite(g).all() for g in (y, *grads))
                state = r(2, 4, w).to(dtype)
                cb = None if bias is None else bias.detach()
                xs = r(2, 4).to(dtype)
                assert torch.isfinite(ops.causal_conv1d_update(_second_half(xs) if flags else xs, state, wt.detach(),
                                                               cb, "silu")).all()
                calls += 3
        for n in (5, 16, 64):
            for groups, sdt in ((0, torch.float32), (2, torch.bfloat16), (0, torch.float16)):
                shape = (3, groups, n) if groups else (3, n)
                state = r(3, 8, n).to(sdt)
                view = _second_half if groups else (lambda t: t)  # x, z, B, C as views of wider outputs
                y = ops.selective_state_update(state, view(r(3, 8)), torch.rand(3, 8, generator=gen),
                                               -torch.rand(8, n), view(r(*shape)), view(r(*shape)), r(8),
                                               view(r(3, 8)), torch.rand(8), True)
                assert torch.isfinite(y).all() and torch.isfinite(state).all()
                calls += 1
    return calls


def test_exercise_grid_runs(emu):
    """The grid the ASan test runs, here without the sanitiser (so a failure is not an ASan artefact)."""
    assert exercise_every_kernel() == 2 * 2 * len(_SCAN_GRID) + 3 * 4 * 3 + 9


ASAN_SCRIPT = """
from emma_mamba.ops import cuda_emulator
cuda_emulator._module = cuda_emulator.load(sanitize=True)  # the cuda-emu backend now runs the sanitised build
from emma_mamba.bench.kernels_gpu import cuda_backward, cuda_forward
from tests.ops.test_cuda_emulator import exercise_every_kernel
calls = exercise_every_kernel()
with cuda_forward("seq"), cuda_backward("seq"):  # the state-sequential scan kernels where they apply
    calls += exercise_every_kernel(scan_only=True)
print("ASAN-CLEAN", calls)
"""


def run_sanitized(script: str):
    """Runs ``script`` in a child process with the ASan runtime preloaded and Triton hidden
    (:func:`cuda_emulator.sanitized_child`), from the repository root; asserts it printed ASAN-CLEAN (a sanitiser
    error aborts it with its report, which the assertion shows)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    child = cuda_emulator.sanitized_child(script, PYTHONPATH=str(root))
    if child is None:
        pytest.skip(f"the compiler has no ASan runtime ({cuda_emulator.asan_environment()['LD_PRELOAD']!r})")
    cmd, env = child
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0 and "ASAN-CLEAN" in r.stdout, (r.stdout[-2000:] + r.stderr[-6000:])


def test_cuda_kernels_stay_in_bounds_under_address_sanitizer():
    """Every kernel over the grid in a process with AddressSanitizer and UBSan: any read or write outside
    torch's allocations (a tensor's end, a missing `valid` guard, a wrong stride) or a misaligned vector access
    aborts with the sanitiser's report."""
    run_sanitized(ASAN_SCRIPT)
