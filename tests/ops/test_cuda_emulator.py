"""The CUDA emulator (csrc/emu) that lets CI run csrc/cuda's kernels on the CPU: its warp shuffles against the
CUDA programming guide's definitions (hand-computed here), its schedule orders exposing a shared-memory race,
the undefined behaviour it must report rather than run, and the CUDA kernels' results not depending on the
schedule (bitwise, in the deterministic mode)."""

import pytest
import torch

from emma_mamba import ops
from emma_mamba.ops import cuda_emulator

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
    (deterministic) backward with grouped B/C, seq_idx and an initial state, the conv forward/backward, and
    both decode steps -> a flat list of result tensors."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    b, d, n, l = 2, 16, 4, 600
    leaf = dict(u=r(b, d, l), delta=0.5 * torch.rand(b, d, l, generator=gen), A=-0.5 - torch.rand(d, n, generator=gen),
                B=r(b, 2, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=torch.rand(d, generator=gen),
                initial_state=r(b, d, n))
    leaf = {k: v.requires_grad_() for k, v in leaf.items()}
    seq = segments(b, l, gen, {255, 256, 512})
    dout = r(b, d, l)
    with ops.use_backend("cuda-emu"):
        out, last = ops.selective_scan(**leaf, delta_softplus=True, return_last_state=True, seq_idx=seq,
                                       deterministic=True)
        grads = torch.autograd.grad((out * dout).sum() + last.sum(), list(leaf.values()))
        x, w = r(b, d, 1100).requires_grad_(), r(d, 4).requires_grad_()
        y = ops.causal_conv1d(x, w, None, "silu", seq_idx=segments(b, 1100, gen, {1024}))
        cgrads = torch.autograd.grad((y * r(b, d, 1100)).sum(), [x, w])
        state, conv = r(b, d, n), r(b, d, 4)
        step = ops.selective_state_update(state, r(b, d), torch.rand(b, d, generator=gen), leaf["A"].detach(),
                                          r(b, n), r(b, n), None, r(b, d), None, True)
        cstep = ops.causal_conv1d_update(r(b, d), conv, w.detach(), None, "silu")
    return [out, last, *grads, y, *cgrads, state, conv, step, cstep]


def test_cuda_kernels_do_not_depend_on_the_schedule(emu, forward_after):
    """Threads of a block run in forward, reverse and two random orders (blocks too): every output and
    gradient is bitwise the same, so no result hangs on an ordering the GPU does not guarantee."""
    emu.set_schedule("forward", 0)
    base = _all_kernels()
    for order, seed in (("reverse", 0), ("random", 1), ("random", 2)):
        emu.set_schedule(order, seed)
        for i, (a, b) in enumerate(zip(base, _all_kernels())):
            assert torch.equal(a, b), f"result {i} differs under the {order} schedule (seed {seed})"
