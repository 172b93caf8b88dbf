"""DESIGN.md's tolerances against the fp32 reference (those of mamba-ssm's own tests), shared by the backend
tests so the cpu, cuda and triton kernels are held to one standard."""

import torch

# (rtol, atol) of outputs and states per input dtype
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}


def grad_tolerance(name: str, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of the gradient of input ``name`` (u, delta, z, A, B, C, D, delta_bias, initial_state):
    du 2x the output tolerance, ddelta 5x rtol and 10x atol, dz as the output, weight gradients 1e-3 (raised to
    the dtype's tolerance below fp32)."""
    rtol, atol = TOL[dtype]
    if name == "u":
        return rtol * 2, atol * 2
    if name == "delta":
        return rtol * 5, atol * 10
    if name == "z":
        return rtol, atol
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
