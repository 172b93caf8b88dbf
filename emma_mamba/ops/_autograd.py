"""Autograd wrappers shared by the compiled backends (cpu, cuda, triton).

A backend is a *kernel module*: any object with the functions below. The wrappers here only save what the
forward returned and call the backend's backward; they contain no math. Inputs come contiguous, except those a
kernel reads in place with their own strides (unit stride in the last dimension): the scan's ``z``, the conv's
``x``, and a decode step's ``x``, ``z``, ``B``, ``C`` (emma_mamba/ops/_checks.py); outputs are contiguous.

``selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx)``
    -> ``(out, last_state, saved)``: ``out`` (b, d, l) in u's dtype (already gated by silu(z) when z is
    given), ``last_state`` (b, d, n) fp32, ``saved`` one backend-private fp32 tensor (the chunk-boundary
    states; never a (b, d, l, n) tensor).
``selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, saved,
    dout, dlast_state, deterministic, recompute_out)``
    -> ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state, out)``; entries for absent optional
    inputs are None. ``dlast_state`` may be None (no gradient flows into the last state). With
    ``recompute_out`` the backward also returns the forward's ``out``, recomputed from the saved states as a
    by-product of the gradients (mamba-ssm's ``out_z``: ``ops.mamba_inner`` uses it for out_proj's weight
    gradient instead of keeping ``out``); else ``out`` is None.
``causal_conv1d_fwd(x, weight, bias, initial_states, seq_idx, silu)`` -> out
``causal_conv1d_bwd(x, weight, bias, initial_states, seq_idx, dout, silu)``
    -> ``(dx, dweight, dbias, dinitial_states)``
``selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)`` -> out (state in place)
``causal_conv1d_update(x, conv_state, weight, bias, silu)`` -> out (conv_state in place)
"""

from __future__ import annotations

import functools

import torch


def refuse_double_backward(op: str):
    """Decorator of a kernel-backed backward: refuses to run with ``create_graph=True`` (grad mode on in the
    backward). The kernels' gradients have no autograd graph, so a gradient of a gradient through the op (a gradient
    penalty, a Hessian-vector product) would silently miss this op's part; torch's own ``once_differentiable`` does
    not catch ``torch.autograd.grad(..., inputs=[w])``, whose engine never reaches its error node."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"emma_mamba.ops.{op}: gradients of gradients (backward with create_graph=True) are not supported "
                    f"by the compiled kernels, whose backward is not differentiable; run the op on the torch backend "
                    f"(emma_mamba.ops.use_backend('torch')), which is differentiable twice")
            return fn(ctx, *grads)
        return wrapper
    return deco


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kern, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                deterministic):
        out, last_state, saved = kern.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                         initial_state, seq_idx)
        ctx.set_materialize_grads(False)
        ctx.kern = kern
        ctx.delta_softplus = delta_softplus
        ctx.deterministic = deterministic
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, saved)
        return out, last_state

    @staticmethod
    @refuse_double_backward("selective_scan")
    def backward(ctx, dout, dlast_state):
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, saved = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        grads = ctx.kern.selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                                            initial_state, seq_idx, saved, dout.contiguous(),
                                            None if dlast_state is None else dlast_state.contiguous(),
                                            ctx.deterministic, False)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit, _ = grads
        return (None, du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, None, dinit, None, None)


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kern, x, weight, bias, initial_states, seq_idx, silu):
        out = kern.causal_conv1d_fwd(x, weight, bias, initial_states, seq_idx, silu)
        ctx.kern = kern
        ctx.silu = silu
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
        return out

    @staticmethod
    @refuse_double_backward("causal_conv1d")
    def backward(ctx, dout):
        x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
        dx, dw, db, dinit = ctx.kern.causal_conv1d_bwd(x, weight, bias, initial_states, seq_idx,
                                                       dout.contiguous(), ctx.silu)
        return None, dx, dw, db, dinit, None, None
