"""DESIGN.md's tolerances against the fp32 reference (those of mamba-ssm's own tests), shared by the backend
tests so the cpu, cuda and triton kernels are held to one standard."""

import pytest
import torch

# (rtol, atol) of outputs and states per input dtype
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


def grad_tolerance(name: str, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of the gradient of input ``name`` (u, delta, z, A, B, C, D, delta_bias, initial_state):
    du 2x the output tolerance, ddelta 5x rtol and 10x atol, dz as the output, weight gradients 1e-3 / 1e-3 in
    fp32 (DESIGN), raised to the dtype's output tolerance for fp16 / bf16 inputs (whose rounded activations feed
    the weights' sums)."""
    rtol, atol = TOL[dtype]
    if name == "u":
        return rtol * 2, atol * 2
    if name == "delta":
        return rtol * 5, atol * 10
    if name == "z":
        return rtol, atol
    if dtype is torch.float32:
        return 1e-3, 1e-3
    return max(1e-3, rtol), max(1e-3, atol)


def assert_close(name, got, want, rtol, atol):
    """assert_close that names the tensor and checks presence, dtype, shape and finiteness first."""
    assert got is not None and want is not None, f"{name}: gradient missing"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def conv_on_backends(backends, inputs, dout, device, activation=None, seq_idx=None):
    """Run ``ops.causal_conv1d`` on each backend from fresh leaf copies of ``inputs`` (None entries dropped)
    and return ``{backend: (out, {input name: gradient for dout})}``."""
    from emma_mamba import ops

    res = {}
    for backend in backends:
        leaf = {k: v.to(device).clone().requires_grad_() for k, v in inputs.items() if v is not None}
        with ops.use_backend(backend):
            out = ops.causal_conv1d(**leaf, activation=activation, seq_idx=seq_idx)
            grads = torch.autograd.grad(out, list(leaf.values()), dout)
        res[backend] = (out, dict(zip(leaf, grads)))
    return res


def segments(b, l, gen, cuts):
    """int32 (b, l) seq_idx: row 0 has a boundary at every position of ``cuts`` below l and at 3 random places;
    row 1 (when b > 1) one boundary mid-way, its ids not starting at 0; other rows are one sequence."""
    seq = torch.zeros(b, l, dtype=torch.int32)
    if l > 1:
        cuts = set(cuts) | set(torch.randint(1, l, (3,), generator=gen).tolist())
        for c in sorted(x for x in cuts if x < l):
            seq[0, c:] += 1
        if b > 1:
            seq[1, l // 2:] = 5
    return seq


def scan_on_backend(inputs, softplus, last_grad, backend, device, deterministic=None, seed=1):
    """Forward + backward of ``ops.selective_scan`` on ``backend`` from fresh leaf copies of ``inputs`` moved to
    ``device``, against a seeded random cotangent of the output (and of the last state if ``last_grad``):
    -> (out, last_state, {input name: gradient})."""
    from emma_mamba import ops

    names = [k for k, v in inputs.items() if v is not None and v.is_floating_point()]
    leaf = {k: (None if v is None else v.to(device).clone().requires_grad_() if k in names else v.to(device))
            for k, v in inputs.items()}
    with ops.use_backend(backend):
        out, last = ops.selective_scan(**leaf, delta_softplus=softplus, return_last_state=True,
                                       deterministic=deterministic)
        gen = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=gen).to(out.dtype).to(device)
        loss = (out.float() * dout.float()).sum()
        if last_grad:
            loss = loss + (last * torch.randn(last.shape, generator=gen).to(device)).sum()
        grads = torch.autograd.grad(loss, [leaf[k] for k in names])
    return out.detach(), last.detach(), dict(zip(names, grads))


def check_scan(inputs, backend, device, softplus=True, last_grad=True, deterministic=None):
    """``backend``'s selective scan against the reference (``torch`` backend) on the same inputs: output, last
    state and every gradient within DESIGN's tolerances. Gradients that sum over b*l fp32 products (A, D,
    delta_bias, a constant B or C) are compared relative to their own scale."""
    dtype = inputs["u"].dtype
    rtol, atol = TOL[dtype]
    out, last, g = scan_on_backend(inputs, softplus, last_grad, backend, device, deterministic)
    ref_out, ref_last, ref_g = scan_on_backend(inputs, softplus, last_grad, "torch", device)
    assert_close("out", out, ref_out, rtol, atol)
    assert_close("last_state", last, ref_last, rtol, atol)
    for name in ref_g:
        tol = grad_tolerance(name, dtype)
        if name in ("A", "D", "delta_bias") or (name in ("B", "C") and inputs[name].dim() == 2):
            tol = (tol[0], max(tol[1], tol[0] * ref_g[name].abs().max().item()))
        assert_close(f"d{name}", g[name], ref_g[name], *tol)


def check_state_update(backend, device, b, d, n, dtype, state_dtype, groups, flags):
    """One ``ops.selective_state_update`` step on ``backend`` against the reference step from the same state:
    output (the input dtype's tolerance, or the state's when that is lower) and updated state.
    ``flags`` = (D, z, dt_bias, softplus); ``groups`` 0 means B/C of shape (b, n)."""
    from emma_mamba import ops
    from emma_mamba.ops.reference import selective_state_update_ref

    has_D, has_z, has_bias, softplus = flags
    state = torch.randn(b, d, n, device=device).to(state_dtype)
    ref_state = state.clone()
    x, dt = torch.randn(b, d, device=device).to(dtype), torch.rand(b, d, device=device).to(dtype)
    A = -0.5 - torch.rand(d, n, device=device)
    shape = (b, groups, n) if groups else (b, n)
    B, C = torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)
    D = torch.randn(d, device=device) if has_D else None
    z = torch.randn(b, d, device=device).to(dtype) if has_z else None
    dt_bias = torch.rand(d, device=device) if has_bias else None
    with ops.use_backend(backend):
        y = ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(softplus))
    y_ref = selective_state_update_ref(ref_state, x, dt, A, B, C, D, z, dt_bias, bool(softplus))
    rtol, atol = TOL[dtype if state_dtype == torch.float32 else state_dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(state, ref_state, rtol=TOL[state_dtype][0], atol=TOL[state_dtype][1])


def check_batch_sliced_deterministic(run, check, inputs, monkeypatch):
    """The deterministic backward over batch slices (EMMA_DETERMINISTIC_PARTIAL_MB=0: one row per slice) against
    the unsliced call: per-row gradients bit for bit, the summed ones (A, D, delta_bias, a constant B or C) to
    rounding; ``check(inputs)`` (against the reference) passes sliced, and two sliced runs agree bit for bit.
    ``run(inputs)`` -> scan_on_backend's result with deterministic=True."""
    whole = run(inputs)
    monkeypatch.setenv("EMMA_DETERMINISTIC_PARTIAL_MB", "0")
    check(inputs)
    sliced = [run(inputs) for _ in range(2)]
    for name, g in whole[2].items():
        assert torch.equal(sliced[0][2][name], sliced[1][2][name]), name
        if name in ("A", "D", "delta_bias") or (name in ("B", "C") and inputs[name].dim() == 2):
            torch.testing.assert_close(sliced[0][2][name], g, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(sliced[0][2][name], g), f"d{name} differs when sliced"
    monkeypatch.setenv("EMMA_DETERMINISTIC_PARTIAL_MB", "lots")
    with pytest.raises(RuntimeError, match="EMMA_DETERMINISTIC_PARTIAL_MB must be a number of MB"):
        run(inputs)
