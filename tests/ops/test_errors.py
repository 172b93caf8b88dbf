"""Every input a user can get wrong in the four public ops raises emma_mamba.ops.OpInputError naming the
argument and what was expected (shapes, dtypes, devices, layouts, d_conv, activation, non-tensors), on the
cpu backend and on the torch reference alike (the checks run before dispatch)."""

from __future__ import annotations

import pytest
import torch

import emma_mamba.ops as ops
from emma_mamba.ops import OpInputError

b, d, n, l, w = 2, 4, 3, 6, 4


@pytest.fixture(params=["cpu", "torch"])
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def scan_args(**over):
    args = dict(u=torch.randn(b, d, l), delta=torch.rand(b, d, l), A=-torch.rand(d, n), B=torch.randn(b, n, l),
                C=torch.randn(b, n, l), D=torch.randn(d), z=torch.randn(b, d, l), delta_bias=torch.rand(d),
                initial_state=torch.randn(b, d, n), seq_idx=torch.zeros(b, l, dtype=torch.int32))
    args.update(over)
    return args


META = torch.device("meta")

SCAN_BAD = [
    ("u as a list", dict(u=[[1.0]]), r"u must be a 3-D tensor .* got list"),
    ("u 2-D", dict(u=torch.randn(d, l)), r"u must be a 3-D tensor .* got \(4, 6\)"),
    ("u int", dict(u=torch.ones(b, d, l, dtype=torch.int64)), r"u must be float32, float16 or bfloat16"),
    ("zero length", dict(u=torch.randn(b, d, 0), delta=torch.rand(b, d, 0)), r"seqlen .* at least 1"),
    ("delta shape", dict(delta=torch.rand(b, d, l + 1)), r"delta must have shape \(2, 4, 6\), got \(2, 4, 7\)"),
    ("delta dtype", dict(delta=torch.rand(b, d, l, dtype=torch.float64)), r"delta must have dtype in \(float32\)"),
    ("delta on meta", dict(delta=torch.rand(b, d, l, device=META)), r"delta is on meta but the other inputs are on cpu"),
    ("A rows", dict(A=-torch.rand(d + 1, n)), r"A must have shape \(dim=4, dstate\)"),
    ("A fp16", dict(A=-torch.rand(d, n).half()), r"A must have dtype in \(float32\)"),
    ("no states", dict(A=-torch.rand(d, 0), B=torch.randn(b, 0, l), C=torch.randn(b, 0, l),
                       initial_state=torch.randn(b, d, 0)), r"dstate \(A\.shape\[1\]\) must be at least 1"),
    ("B 5-D", dict(B=torch.randn(b, 1, 1, n, l)), r"B must be \(dim, dstate\), \(batch, dstate, seqlen\)"),
    ("B groups", dict(B=torch.randn(b, 3, n, l)), r"B has 3 groups, which must divide dim=4"),
    ("C dstate", dict(C=torch.randn(b, n + 1, l)), r"C must have shape \(2, 3, 6\)"),
    ("C constant bf16", dict(C=torch.randn(d, n).bfloat16()), r"C must have dtype in \(float32\)"),
    ("C on meta", dict(C=torch.randn(b, n, l, device=META)), r"C is on meta"),
    ("B not a tensor", dict(B=3.0), r"B must be a torch.Tensor"),
    ("D shape", dict(D=torch.randn(d + 1)), r"D must have shape \(4,\)"),
    ("D not a tensor", dict(D=1.0), r"D must be a torch.Tensor, got float"),
    ("z dtype", dict(z=torch.randn(b, d, l).bfloat16()), r"z must have dtype in \(float32\)"),
    ("delta_bias shape", dict(delta_bias=torch.rand(1)), r"delta_bias must have shape \(4,\)"),
    ("initial_state shape", dict(initial_state=torch.randn(b, d)), r"initial_state must have shape \(2, 4, 3\)"),
    ("initial_state bf16", dict(initial_state=torch.randn(b, d, n).bfloat16()), r"initial_state must have dtype"),
    ("seq_idx int64", dict(seq_idx=torch.zeros(b, l, dtype=torch.int64)), r"seq_idx must have dtype in \(int32\)"),
    ("seq_idx shape", dict(seq_idx=torch.zeros(b, l - 1, dtype=torch.int32)), r"seq_idx must have shape \(2, 6\)"),
]


@pytest.mark.parametrize("what,over,msg", SCAN_BAD, ids=[c[0] for c in SCAN_BAD])
def test_selective_scan_bad_inputs(backend, what, over, msg):
    with pytest.raises(OpInputError, match=r"emma_mamba\.ops\.selective_scan: .*" + msg):
        ops.selective_scan(**scan_args(**over))


def conv_args(**over):
    args = dict(x=torch.randn(b, d, l), weight=torch.randn(d, w), bias=torch.randn(d),
                initial_states=torch.randn(b, d, w - 1), seq_idx=torch.zeros(b, l, dtype=torch.int32),
                activation="silu")
    args.update(over)
    return args


CONV_BAD = [
    ("x not a tensor", dict(x="x"), r"x must be a 3-D tensor .* got str"),
    ("x int", dict(x=torch.ones(b, d, l, dtype=torch.int32)), r"x must be float32, float16 or bfloat16"),
    ("d_conv 1", dict(weight=torch.randn(d, 1)), r"d_conv\) must be 2, 3 or 4, got 1"),
    ("d_conv 5", dict(weight=torch.randn(d, 5)), r"d_conv\) must be 2, 3 or 4, got 5"),
    ("weight rows", dict(weight=torch.randn(d + 1, w)), r"weight must have shape \(dim=4, width\)"),
    ("weight on meta", dict(weight=torch.randn(d, w, device=META)), r"weight is on meta"),
    ("bias shape", dict(bias=torch.randn(d, 1)), r"bias must have shape \(4,\)"),
    ("initial_states width", dict(initial_states=torch.randn(b, d, w)), r"initial_states must have shape \(2, 4, 3\)"),
    ("seq_idx float", dict(seq_idx=torch.zeros(b, l)), r"seq_idx must have dtype in \(int32\)"),
    ("activation", dict(activation="relu"), r"activation must be None, 'silu' or 'swish', got 'relu'"),
    ("activation bool", dict(activation=True), r"activation must be None, 'silu' or 'swish', got True"),
    ("seq_idx where activation is (causal-conv1d's order)", dict(activation=torch.zeros(b, l, dtype=torch.int32)),
     r"activation must be None, 'silu' or 'swish', got a tensor of shape \(2, 6\): this op's order is \(x, "
     r"weight, bias, activation, initial_states, seq_idx\)"),
    ("weight bf16 with fp32 x", dict(weight=torch.randn(d, w).bfloat16()),
     r"weight must have dtype in \(float32\), got bfloat16"),
]


@pytest.mark.parametrize("what,over,msg", CONV_BAD, ids=[c[0] for c in CONV_BAD])
def test_causal_conv1d_bad_inputs(backend, what, over, msg):
    with pytest.raises(OpInputError, match=r"emma_mamba\.ops\.causal_conv1d: .*" + msg):
        ops.causal_conv1d(**conv_args(**over))


def step_args(**over):
    args = dict(state=torch.randn(b, d, n), x=torch.randn(b, d), dt=torch.rand(b, d), A=-torch.rand(d, n),
                B=torch.randn(b, n), C=torch.randn(b, n), D=torch.randn(d), z=torch.randn(b, d),
                dt_bias=torch.rand(d), dt_softplus=True)
    args.update(over)
    return args


STEP_BAD = [
    ("state non-contiguous", dict(state=torch.randn(b, n, d).transpose(1, 2)),
     r"state is updated in place and must be contiguous"),
    ("state 2-D", dict(state=torch.randn(b, d)), r"state must be a 3-D tensor"),
    ("state int", dict(state=torch.zeros(b, d, n, dtype=torch.int32)), r"state must be float32"),
    ("no states", dict(state=torch.randn(b, d, 0), A=-torch.rand(d, 0), B=torch.randn(b, 0), C=torch.randn(b, 0)),
     r"dstate \(state\.shape\[2\]\) must be at least 1"),
    ("x shape", dict(x=torch.randn(b, d + 1)), r"x must have shape \(2, 4\)"),
    ("x not a tensor", dict(x=1.0), r"x must be a float32, float16 or bfloat16 tensor"),
    ("dt dtype", dict(dt=torch.rand(b, d).half()), r"dt must have dtype in \(float32\)"),
    ("A shape", dict(A=-torch.rand(d, n + 1)), r"A must have shape \(4, 3\)"),
    ("B groups", dict(B=torch.randn(b, 3, n)),
     r"B must have shape \(batch=2, dstate=3\) or \(batch=2, groups, dstate=3\) with groups dividing dim=4, got "
     r"\(2, 3, 3\)"),
    # a scan's (b, n, l) B at one step, l = 1: named with its expected shapes (it read as 3 groups of 1 state)
    ("B with a time axis", dict(B=torch.randn(b, n, 1)), r"B must have shape \(batch=2, dstate=3\) or .*got "
                                                          r"\(2, 3, 1\) \(one step: no time axis\)"),
    ("C shape", dict(C=torch.randn(b, 2, n + 1)), r"C must have shape \(batch=2, dstate=3\) or .*got \(2, 2, 4\)"),
    ("C on meta", dict(C=torch.randn(b, n, device=META)), r"C is on meta"),
    ("D dtype", dict(D=torch.randn(d).double()), r"D must have dtype in \(float32\)"),
    ("dt_bias shape", dict(dt_bias=torch.rand(d, 1)), r"dt_bias must have shape \(4,\)"),
]


@pytest.mark.parametrize("what,over,msg", STEP_BAD, ids=[c[0] for c in STEP_BAD])
def test_selective_state_update_bad_inputs(backend, what, over, msg):
    with pytest.raises(OpInputError, match=r"emma_mamba\.ops\.selective_state_update: .*" + msg):
        ops.selective_state_update(**step_args(**over))


def conv_step_args(**over):
    args = dict(x=torch.randn(b, d), conv_state=torch.randn(b, d, w), weight=torch.randn(d, w),
                bias=torch.randn(d), activation="silu")
    args.update(over)
    return args


CONV_STEP_BAD = [
    ("conv_state non-contiguous", dict(conv_state=torch.randn(b, w, d).transpose(1, 2)),
     r"conv_state is updated in place and must be contiguous"),
    ("d_conv 5", dict(conv_state=torch.randn(b, d, 5), weight=torch.randn(d, 5)), r"d_conv\) must be 2, 3 or 4, got 5"),
    ("conv_state list", dict(conv_state=[0.0]), r"conv_state must be a 3-D tensor .* got list"),
    ("weight width", dict(weight=torch.randn(d, w - 1)),
     r"conv_state \(2, 4, 4\) and weight \(4, 3\) disagree on the conv width: conv_state holds the last width "
     r"inputs, \(batch, dim, width\) = \(2, 4, 3\) for this weight"),
    ("conv_state of width - 1 (causal-conv1d's)", dict(conv_state=torch.randn(b, d, w - 1)),
     r"conv_state \(2, 4, 3\) and weight \(4, 4\) disagree on the conv width: .* \(not causal-conv1d's width - 1\)"),
    ("weight rows", dict(weight=torch.randn(d + 1, w)), r"weight must have shape \(4, 4\)"),
    ("x shape (b, d, 1)", dict(x=torch.randn(b, d, 1)),
     r"x must have shape \(batch, dim\) = \(2, 4\), one step, got \(2, 4, 1\) \(causal-conv1d's"),
    ("x shape", dict(x=torch.randn(b, d + 1)), r"x must have shape \(2, 4\)"),
    ("x on meta", dict(x=torch.randn(b, d, device=META)), r"x is on meta"),
    ("bias dtype", dict(bias=torch.randn(d).double()), r"bias must have dtype in"),
    ("activation", dict(activation="gelu"), r"activation must be None, 'silu' or 'swish', got 'gelu'"),
]


@pytest.mark.parametrize("what,over,msg", CONV_STEP_BAD, ids=[c[0] for c in CONV_STEP_BAD])
def test_causal_conv1d_update_bad_inputs(backend, what, over, msg):
    with pytest.raises(OpInputError, match=r"emma_mamba\.ops\.causal_conv1d_update: .*" + msg):
        ops.causal_conv1d_update(**conv_step_args(**over))


def test_good_inputs_pass(backend):
    """The fixtures above are valid as they stand, so each failure above is caused by its one change."""
    ops.selective_scan(**scan_args())
    ops.causal_conv1d(**conv_args())
    ops.selective_state_update(**step_args())
    ops.causal_conv1d_update(**conv_step_args())


@pytest.mark.parametrize("bb,dd", [(0, d), (b, 0)])
def test_an_empty_batch_or_channel_dimension_gives_empty_results_and_gradients(backend, bb, dd):
    """Nothing to compute: every backend returns the empty outputs and, for the scan and the conv, gradients of
    every input's shape (the compiled cpu kernels once returned None for some: an empty tensor's null data
    pointer read as an absent optional input)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    scan_in = dict(u=r(bb, dd, l), delta=r(bb, dd, l), A=r(dd, n), B=r(bb, n, l), C=r(bb, n, l), D=r(dd),
                   z=r(bb, dd, l), delta_bias=r(dd), initial_state=r(bb, dd, n))
    out, last = ops.selective_scan(**scan_in, delta_softplus=True, return_last_state=True)
    assert out.shape == (bb, dd, l) and last.shape == (bb, dd, n)
    grads = torch.autograd.grad((out.sum() + last.sum()), list(scan_in.values()), allow_unused=False)
    assert [x.shape for x in grads] == [x.shape for x in scan_in.values()]
    conv_in = dict(x=r(bb, dd, l), weight=r(dd, w), bias=r(dd), initial_states=r(bb, dd, w - 1))
    y = ops.causal_conv1d(**conv_in, activation="silu")
    grads = torch.autograd.grad(y.sum(), list(conv_in.values()))
    assert y.shape == (bb, dd, l) and [x.shape for x in grads] == [x.shape for x in conv_in.values()]
    state, conv_state = torch.zeros(bb, dd, n), torch.zeros(bb, dd, w)
    with torch.no_grad():
        assert ops.selective_state_update(state, torch.randn(bb, dd), torch.rand(bb, dd), -torch.rand(dd, n),
                                          torch.randn(bb, n), torch.randn(bb, n)).shape == (bb, dd)
        assert ops.causal_conv1d_update(torch.randn(bb, dd), conv_state, torch.randn(dd, w)).shape == (bb, dd)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ops.BackendUnavailableError, match=r"unknown backend 'gpu'"):
        with ops.use_backend("gpu"):
            pass


@pytest.mark.parametrize("archs,cc,ok", [
    ("80;90", (8, 0), True), ("80;90", (8, 6), True), ("80;90", (8, 9), True), ("80;90", (9, 0), True),
    ("80;90", (7, 5), False),  # a T4: no SASS of its major, and the PTX (9.0) is newer than the GPU
    ("80;90", (10, 0), True), ("80;90", (12, 0), True),  # Blackwell: the driver compiles the 9.0 PTX
    ("90", (8, 0), False), ("80", (9, 0), True), ("86", (8, 0), False),
    ("90a", (9, 0), True), ("90a", (10, 0), False),  # arch-specific code: that GPU only, no PTX
])
def test_cuda_archs_cover_by_hand(archs, cc, ok):
    """Which GPUs a build's kernels run on (setup.py: SASS for each listed arch, PTX of the newest plain one): CUDA's
    rules, by hand (SASS runs on the same major at an equal or higher minor; PTX on any GPU at least as new)."""
    assert ops.cuda_archs_cover(archs, cc) is ok


def test_a_build_for_other_gpus_falls_back_with_a_clear_reason(monkeypatch):
    """The cuda backend on a GPU its build does not cover (here a T4, sm_75, faked) is unavailable, naming the
    build's architectures, the GPU and the rebuild; automatic selection then runs CUDA tensors on triton."""
    from emma_mamba import _C

    if not getattr(_C, "with_cuda", False):
        pytest.skip("emma_mamba._C was built without the CUDA kernels")
    assert all(a.rstrip("a").isdigit() for a in _C.cuda_archs.split(";")), _C.cuda_archs  # recorded at build time
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ops.BackendUnavailableError, match=r"built for sm_.* cannot run on this GPU \(Tesla T4, "
                                                           r"sm_75\); rebuild with EMMA_CUDA_ARCHS=75"):
        ops._load_compiled("cuda")
    monkeypatch.setattr(ops, "_kernel_cache", {})
    monkeypatch.setattr(ops, "_unavailable", {})
    monkeypatch.setattr(ops, "_default", {})
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.delenv("EMMA_MAMBA_BACKEND", raising=False)
    assert ops.get_backend("cuda") in ("triton", "torch")


def test_a_machine_with_one_uncovered_gpu_among_covered_ones_falls_back(monkeypatch):
    """The choice of backend holds for every CUDA tensor of the process, so every visible GPU must be covered: an
    H100 (covered by any build with sm_90 or older PTX) beside a T4 (sm_75, not covered by 80;90) makes the cuda
    backend unavailable, naming the T4 and the archs of both GPUs to rebuild for."""
    from emma_mamba import _C

    if not getattr(_C, "with_cuda", False):
        pytest.skip("emma_mamba._C was built without the CUDA kernels")
    if ops.cuda_archs_cover(_C.cuda_archs, (7, 5)):
        pytest.skip(f"this build ({_C.cuda_archs}) runs on sm_75")
    gpus = {0: ((9, 0), "NVIDIA H100"), 1: ((7, 5), "Tesla T4")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpus[i][1])
    with pytest.raises(ops.BackendUnavailableError,
                       match=r"cannot run on cuda:1 \(Tesla T4, sm_75\); rebuild with EMMA_CUDA_ARCHS=\"75;90\"") as e:
        ops._load_compiled("cuda")
    assert "H100" not in str(e.value)
    gpus[1] = ((8, 6), "NVIDIA A10")  # an A10 beside it: available where the build covers both (80;90 does)
    if ops.cuda_archs_cover(_C.cuda_archs, (8, 6)) and ops.cuda_archs_cover(_C.cuda_archs, (9, 0)):
        assert ops._load_compiled("cuda") is not None


def test_the_build_embeds_ptx_of_its_newest_arch():
    """setup.py's newest listed architecture is also embedded as PTX (cuobjdump of the built extension)."""
    import glob
    import os
    import shutil
    import subprocess

    from emma_mamba import _C

    if not getattr(_C, "with_cuda", False):
        pytest.skip("emma_mamba._C was built without the CUDA kernels")
    tool = shutil.which("cuobjdump") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))), None)
    if tool is None:
        try:  # triton's wheel ships one
            import triton

            tool = next(iter(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "cuobjdump"))), None)
        except ImportError:
            pass
    if tool is None:
        pytest.skip("cuobjdump (CUDA toolkit or triton) not found")
    listed = subprocess.run([tool, "--list-ptx", "--list-elf", _C.__file__], capture_output=True, text=True).stdout
    newest = max((a for a in _C.cuda_archs.split(";") if a.isdigit()), key=int)
    assert f"sm_{newest}" in listed and ".ptx" in listed, listed[:2000]
    assert all(f"sm_{a}" in listed for a in _C.cuda_archs.split(";")), os.path.basename(_C.__file__)


def test_torch_func_transforms_over_a_compiled_backend_are_a_clear_error():
    """torch.func.grad / vmap over the ops on a compiled backend failed with PyTorch's own message (the autograd
    Functions' ctx form, "must override the setup_context staticmethod"): it names the op and the way out now, and
    on the torch backend the transform runs and equals plain autograd."""
    from emma_mamba.ops import reference as ref

    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 2, 5, generator=g), torch.rand(1, 2, 5, generator=g)
    A, B, C = -torch.rand(2, 3, generator=g), torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    x, w = torch.randn(1, 2, 6, generator=g), torch.randn(2, 4, generator=g)

    def scan_loss(a):
        return ops.selective_scan(u, delta, a, B, C).square().sum()

    def conv_loss(weight):
        return ops.causal_conv1d(x, weight, activation="silu").sum()

    if ops.available_backends()["cpu"] == "available":
        with ops.use_backend("cpu"):
            with pytest.raises(RuntimeError, match=r"emma_mamba\.ops\.selective_scan: torch\.func transforms .* "
                                                   r"backend 'cpu'; run under emma_mamba\.ops\.use_backend\('torch'\)"):
                torch.func.grad(scan_loss)(A)
            with pytest.raises(RuntimeError, match=r"emma_mamba\.ops\.causal_conv1d: torch\.func transforms"):
                torch.func.vmap(lambda xi: ops.causal_conv1d(xi[None], w).sum())(x.expand(3, 2, 6))
    with ops.use_backend("torch"):
        got = torch.func.grad(scan_loss)(A)
        gw = torch.func.grad(conv_loss)(w)
    a = A.clone().requires_grad_()
    ref.selective_scan_ref(u, delta, a, B, C).square().sum().backward()
    wr = w.clone().requires_grad_()
    ref.causal_conv1d_ref(x, wr, None, "silu").sum().backward()
    torch.testing.assert_close(got, a.grad)
    torch.testing.assert_close(gw, wr.grad)
