"""The selective scan's numerics at the edges real models reach, on every kernel backend that runs here (``cpu``,
``triton`` through the interpreter, csrc/cuda's under the emulator, ``cuda-emu``; each forward and backward
variant), against float64 oracles written from the recurrence, not against another backend. From a numerical
audit; each case failed on some backend before its fix:

* softplus of a time-step pre-activation far below zero (a trained Mamba's dt bias is softplus^-1 of [1e-3, 0.1],
  about -7 to -2.3, and dt_proj adds to it): Triton's log(1 + exp(x)) lost exp(x)'s low bits (relative errors
  ~1e-5 on [-20, -5]) and returned dt = 0 below x ~ -17;
* dA of fast-decaying states (S4D-real's A = -(1..16), dt of a few units): Triton's backward formed a_t h_{t-1}
  as h_t - b_t, which cancels when a_t is small: relative errors up to 100 % (the absolute error, ~eps |b_t|, stayed
  under the kernel tests' tolerance; Adam's per-parameter normalisation makes such noise a step of full size);
* a NaN or inf in one packed sequence (seq_idx) reached the next one in Triton and CUDA (the reset was a_t = 0,
  and 0 * NaN is NaN), forward and backward, as it does not in the reference.
"""

from __future__ import annotations

import pytest
import torch

from emma_mamba import ops

from .test_cuda_backend import EMU, _ready

F64 = torch.float64

# (backend, variant): the variants are Triton's EMMA_TRITON_SCAN_FWD/BWD module settings and csrc/cuda's
# EMMA_CUDA_SCAN_FWD/BWD environment variables (read per call)
VARIANTS = [("cpu", None), ("triton", "chunked"), ("triton", "sequential"), ("cuda-emu", "warp"),
            ("cuda-emu", "seq")]


@pytest.fixture(params=VARIANTS, ids=[f"{b}-{v}" if v else b for b, v in VARIANTS])
def backend(request, monkeypatch) -> str:
    name, variant = request.param
    if name == "cuda-emu":
        _ready(EMU)  # builds the emulator once; a build error fails here
        monkeypatch.setenv("EMMA_CUDA_SCAN_FWD", variant)
        monkeypatch.setenv("EMMA_CUDA_SCAN_BWD", variant)
        return name
    status = ops.available_backends()[name]
    if status != "available" or not ops._runs_on(name, "cpu"):
        pytest.skip(f"{name} does not run on cpu tensors here ({status})")
    if name == "triton":
        import emma_mamba.kernels.selective_scan as tss

        monkeypatch.setattr(tss, "FWD_IMPL", variant)
        monkeypatch.setattr(tss, "BWD_IMPL", variant)
    return name


def _oracle(u, delta, A, B, C, seq_idx=None):
    """y of the recurrence in float64, one step at a time (softplus with torch's threshold 20)."""
    dt = torch.nn.functional.softplus(delta.to(F64))
    A, B, C, u = A.to(F64), B.to(F64), C.to(F64), u.to(F64)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=F64)
    ys = []
    for t in range(u.shape[2]):
        if seq_idx is not None and t > 0:
            h = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None], torch.zeros_like(h), h)
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1)


def test_softplus_far_below_zero(backend):
    """dt = softplus(x) for x across [-25, 20] (one channel each; L = 1, u = B = C = 1, one state: y = dt), in the
    scan and the decode step, within 4e-6 of float64 (the backends' exp lands ~1e-6 there)."""
    x = torch.cat([torch.linspace(-25.0, -5.0, 48), torch.linspace(-5.0, 20.0, 48)])
    d = x.numel()
    want = torch.nn.functional.softplus(x.to(F64))
    one = torch.ones(1, 1, 1)
    with ops.use_backend(backend):
        y = ops.selective_scan(torch.ones(1, d, 1), x.view(1, d, 1), -torch.ones(d, 1), one, one,
                               delta_softplus=True)
        state = torch.zeros(1, d, 1)
        step = ops.selective_state_update(state, torch.ones(1, d), x.view(1, d), -torch.ones(d, 1),
                                          torch.ones(1, 1), torch.ones(1, 1), dt_softplus=True)
    for name, got in (("scan", y.view(d)), ("decode step", step.view(d))):
        rel = ((got.to(F64) - want).abs() / want).max().item()
        assert rel < 4e-6, f"{backend} {name}: softplus relative error {rel:.2e}"


@pytest.mark.parametrize("mean", [2.0, 4.0])
def test_dA_of_fast_decaying_states(backend, mean):
    """dA against float64 autograd through the oracle, element by element, for S4D-real's A = -(1..16) and
    dt = softplus(mean + N(0, 1)) (about 2.1 and 4): a_t = exp(dt_t A) reaches 1e-15 .. 1e-28. The reference
    (torch, fp32) stays within ~1e-5 here; a_t h_{t-1} formed as h_t - b_t was off by 1e-2 .. 1."""
    b, d, n, L = 1, 2, 16, 80
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, d, L, generator=g)
    delta = mean + torch.randn(b, d, L, generator=g)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    dout = torch.randn(b, d, L, generator=g)

    A64 = A.to(F64).requires_grad_()
    (_oracle(u, delta, A64, B, C) * dout.to(F64)).sum().backward()
    Af = A.clone().requires_grad_()
    with ops.use_backend(backend):
        y = ops.selective_scan(u, delta, Af, B, C, delta_softplus=True)
    (y * dout).sum().backward()
    rel = ((Af.grad.to(F64) - A64.grad).abs() / A64.grad.abs()).max().item()
    assert rel < 1e-4, f"{backend}: dA's largest element-wise relative error {rel:.2e}"


# boundaries where each kernel's carry crosses: the CUDA forward's lane (16 steps) and backward's (8), Triton's
# chunk (its CHUNK, 64 or less), and a one-step sequence
CUTS = [1, 2, 8, 16, 40, 64, 65, 100]


def _packed(L, seed):
    g = torch.Generator().manual_seed(seed)
    b, d, n = 1, 3, 4
    seq = torch.zeros(1, L, dtype=torch.int32)
    for c in CUTS:
        seq[:, c:] += 1
    return dict(u=torch.randn(b, d, L, generator=g), delta=torch.randn(b, d, L, generator=g) - 1.0,
                A=-0.5 - torch.rand(d, n, generator=g), B=torch.randn(b, n, L, generator=g),
                C=torch.randn(b, n, L, generator=g), D=torch.randn(d, generator=g),
                z=torch.randn(b, d, L, generator=g), delta_bias=torch.rand(d, generator=g),
                initial_state=torch.randn(b, d, n, generator=g), seq_idx=seq)


# delta at 45: a sequence that starts on a lane's first step (40, CUDA's backward: 8 steps a lane) after a lane
# without a start, whose adjoint must still stop there
@pytest.mark.parametrize("where", [("u", 20, float("nan")), ("B", 50, float("inf")), ("delta", 70, float("nan")),
                                   ("delta", 45, float("nan"))])
def test_a_nan_or_inf_stays_in_its_packed_sequence(backend, where):
    """A NaN or inf in one packed sequence (u and delta of channel 0, B of every channel) leaves the other
    sequences' outputs and per-step gradients (du, ddelta, dz, dB, dC) and the initial state's gradient as the
    reference computes them, finite; only the sequence that holds it (and what sums over every step: dA, dD,
    d delta_bias) may be non-finite."""
    name, pos, value = where
    L = 120
    inputs = _packed(L, 0)
    if name == "B":
        inputs["B"][:, :, pos] = value
    else:
        inputs[name][:, 0, pos] = value
    seq = inputs["seq_idx"][0]
    other = seq != seq[pos]  # the steps of the other sequences

    def run(be):
        leaf = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in inputs.items()}
        with ops.use_backend(be):
            out, last = ops.selective_scan(**leaf, delta_softplus=True, return_last_state=True)
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            keys = ["u", "delta", "z", "B", "C", "initial_state"]
            grads = torch.autograd.grad((out * dout).sum() + last.sum(), [leaf[k] for k in keys])
        return out.detach(), last.detach(), dict(zip(keys, grads))

    out, last, g = run(backend)
    ref_out, ref_last, ref_g = run("torch")
    assert torch.isfinite(ref_out[..., other]).all()  # the oracle keeps it local
    pairs = [("out", out[..., other], ref_out[..., other]), ("last_state", last, ref_last),
             ("dinitial_state", g["initial_state"], ref_g["initial_state"])]
    pairs += [(f"d{k}", g[k][..., other], ref_g[k][..., other]) for k in ("u", "delta", "z", "B", "C")]
    for what, got, want in pairs:
        assert torch.isfinite(got).all(), f"{backend}: {what} of the other sequences is not finite"
        torch.testing.assert_close(got, want, rtol=6e-4, atol=2e-3, msg=lambda m: f"{backend} {what}: {m}")


def test_packed_and_unpacked_kernels_agree_without_non_finite_values(backend):
    """The select that keeps a NaN in its sequence is compiled into csrc/cuda's packed-sequence kernels only (the
    others keep their plain FMAs): with finite inputs, one packed run equals the same sequences run one by one
    through the unpacked kernels, against the float64 oracle."""
    L = 120
    inputs = _packed(L, 3)
    seq = inputs["seq_idx"]
    keep = ("u", "delta", "A", "B", "C")
    with ops.use_backend(backend):
        packed = ops.selective_scan(**{k: inputs[k] for k in keep}, seq_idx=seq, delta_softplus=True)
        bounds = [0, *CUTS, L]
        parts = [ops.selective_scan(inputs["u"][..., s:e], inputs["delta"][..., s:e], inputs["A"],
                                    inputs["B"][..., s:e], inputs["C"][..., s:e], delta_softplus=True)
                 for s, e in zip(bounds, bounds[1:])]
    want = _oracle(*(inputs[k] for k in keep), seq_idx=seq)
    torch.testing.assert_close(packed.to(F64), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(parts, -1).to(F64), want, rtol=1e-4, atol=1e-5)


def test_a_state_that_forgets_at_once_is_no_nan(backend):
    """A = -inf (exp(dt A) = 0: the state keeps nothing of its past) in one (channel, state) entry: outputs, last
    state and gradients as the reference's (its ddelta is NaN: A exp(dt A) = -inf * 0), no other NaN. The padded
    steps past the sequence's end are identity steps of dt = 0 in the CUDA and Triton kernels, and 2^(0 * -inf)
    was NaN there: a NaN last state, du, dA and dB of the whole channel."""
    g = torch.Generator().manual_seed(0)
    L = 40  # not a multiple of any kernel's lane or chunk: padded steps at the end
    u, delta = torch.randn(1, 3, L, generator=g), torch.rand(1, 3, L, generator=g)
    A = -torch.rand(3, 3, generator=g) - 0.5
    A[1, 2] = -float("inf")
    B, C = torch.randn(1, 3, L, generator=g), torch.randn(1, 3, L, generator=g)

    def run(be):
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C)]
        with ops.use_backend(be):
            out, last = ops.selective_scan(*leaves, delta_softplus=True, return_last_state=True)
            (out.sum() + last.sum()).backward()
        return [out.detach(), last.detach()] + [t.grad for t in leaves]

    names = ["out", "last_state", "du", "ddelta", "dA", "dB", "dC"]
    for name, got, want in zip(names, run(backend), run("torch")):
        assert torch.equal(got.isnan(), want.isnan()), f"{backend}: {name}'s NaNs differ from the reference's"
        ok = ~want.isnan()
        torch.testing.assert_close(got[ok], want[ok], rtol=1e-4, atol=1e-4, msg=lambda m: f"{backend} {name}: {m}")
