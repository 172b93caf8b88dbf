"""The Mamba mixer's path from the in_proj output to the out_proj output as one op that recomputes its cheap
activations in the backward, instead of keeping them (mamba-ssm's ``mamba_inner_fn`` with ``checkpoint_lvl=1``,
without in_proj).

    x, z (b, d, l) -> xc = silu(causal_conv1d(x)) -> x_dbl = x_proj(xc) = [dt_low; B; C] (b, r + 2n, l)
                   -> delta = dt_proj(dt_low) (b, d, l) -> y = selective_scan(xc, delta, ..., z) (b, d, l)
                   -> out = out_proj(y) (b, l, d_model)  (when out_proj_weight is given)

What a training step keeps per layer, in units of one (b, d_inner, l) activation: the same mixer built from the
separate ops keeps x and z (the in_proj output), the conv output xc (for x_proj and the scan), delta (for the
scan) and y (for out_proj's weight gradient): 5, and 6 at batch > 1, where torch.matmul's backward of x_proj
keeps its own copy of xc folded to (b * l, d). Here the backward recomputes xc (a depthwise conv) and delta (a
rank-r GEMM, r = d_model / 16: 1/32 of in_proj's FLOPs) from x and x_dbl, and, with out_proj inside the op, y:
the scan's backward kernels recompute y anyway (the gate's gradient needs it) and return it when asked
(``recompute_out``), as mamba-ssm's backward kernel returns ``out_z``. 2 units (x and z); 3 without out_proj
inside (y kept by out_proj).

The saved chunk-boundary states of the scan are kept (the backward kernels need them; (b, d, n * l / chunk) fp32).
Dispatch: the compiled backends (cpu, cuda, triton, cuda-emu) run :class:`MambaInnerFn` on their kernels, and while
torch.compile traces, the custom op ``torch.ops.emma_mamba.mamba_inner_fwd`` (:mod:`._library`), which keeps the
same tensors (AOTAutograd's partitioner would not recompute a kernel op by itself); the torch reference composes
the public ops, which keep everything (``recompute=False`` does the same on any backend).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from ._autograd import refuse_double_backward


def _fail(msg: str):
    raise _checks.OpInputError(f"emma_mamba.ops.mamba_inner: {msg}")


def no_weight_grad(W: torch.Tensor) -> bool:
    """Whether :func:`gemm_cf` may broadcast W: no gradient for W, and no autocast (which would cast the
    broadcast (b, o, k) view of W, materialising it, where it casts a plain weight once)."""
    return not (W.requires_grad and torch.is_grad_enabled()) and not torch.is_autocast_enabled(W.device.type)


def gemm_cf(W: torch.Tensor, x: torch.Tensor, broadcast: bool | None = None) -> torch.Tensor:
    """W (o, k) @ x (b, k, l) -> (b, o, l), contiguous, without copying x or the result; W cast to x's dtype.

    At batch 1 one 2-D GEMM (it takes a transposed x as it is). At batch > 1 with ``broadcast`` (default:
    :func:`no_weight_grad`) a batched GEMM with W broadcast over the batch (stride 0): torch.matmul would fold
    the batch into the rows, GEMM, and copy the (b, l, o) result into (b, o, l), a copy as large as the output
    (at mamba-130m shapes, batch 8 x 600 tokens, these copies took a quarter of a prefill on the CPU). With a
    weight gradient, torch.matmul: its weight gradient is one GEMM, where the broadcast weight's would be a
    (b, o, k) stack summed over the batch."""
    W = W.to(x.dtype)
    if x.shape[0] == 1:
        return (W @ x[0])[None]
    if no_weight_grad(W) if broadcast is None else broadcast:
        return torch.bmm(W.expand(x.shape[0], -1, -1), x)
    return torch.matmul(W, x)


def _wgrad(dout: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Gradient of W in out = W @ inp (both (b, ., l), any strides): sum over the batch of dout[b] @ inp[b]^T ->
    (o, k), one GEMM per batch row accumulated in place. Each reads its operands as they are; one GEMM over the
    folded batch (einsum) first copied both into (o, b * l) / (b * l, k) layouts, activation-sized copies."""
    g = dout[0] @ inp[0].t()
    for i in range(1, dout.shape[0]):
        g.addmm_(dout[i], inp[i].t())
    return g


def project_out(y: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
                broadcast: bool | None = None) -> torch.Tensor:
    """out_proj of the scan output y (b, d, l) -> (b, l, d_model), reading y through transposed views (no copy).

    At batch 1 one 2-D GEMM; at batch > 1 with ``broadcast`` (default: :func:`no_weight_grad`) a batched GEMM
    with W^T broadcast (see :func:`gemm_cf`), else F.linear (whose weight gradient is one GEMM)."""
    b = y.shape[0]
    if b == 1:  # (l, d_inner) as a transposed view: the GEMM reads it without a copy
        return F.linear(y[0].t(), W.to(y.dtype), None if bias is None else bias.to(y.dtype))[None]
    if no_weight_grad(W) if broadcast is None else broadcast:
        out = torch.bmm(y.transpose(1, 2), W.to(y.dtype).t().expand(b, -1, -1))
        return out if bias is None else out + bias.to(out.dtype)
    return F.linear(y.transpose(1, 2), W.to(y.dtype), None if bias is None else bias.to(y.dtype))


def _scan_inputs(xc, x_dbl, dt_proj_weight, A, D, z, delta_bias, seq_idx):
    """delta and the scan's checked inputs from the conv output and x_dbl (forward and, recomputed bit for bit
    with the same GEMM, backward). The op computes its weight gradients itself, so its GEMMs broadcast the weight
    over the batch (gemm_cf): no activation-sized copies, whatever autograd would do with a weight gradient."""
    r, n = dt_proj_weight.shape[1], A.shape[1]
    dt_low, B, C = torch.split(x_dbl, [r, n, n], dim=1)  # (b, r, l), (b, n, l), (b, n, l)
    delta = gemm_cf(dt_proj_weight, dt_low, True)  # (b, d, l); its bias goes in as delta_bias, under softplus
    return _checks.check_selective_scan(xc, delta, A, B, C, D, z, delta_bias, None, seq_idx)


def inner_fwd(kern, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx,
              out_proj_weight=None, out_proj_bias=None):
    """The forward on a backend's kernels -> (out, x_dbl, saved, z as the scan took it); out is out_proj(y)
    (b, l, d_model) when ``out_proj_weight`` is given, else y (b, d, l)."""
    xc = kern.causal_conv1d_fwd(x, conv_weight, conv_bias, None, seq_idx, True)  # (b, d, l)
    x_dbl = gemm_cf(x_proj_weight, xc, True)  # (b, r + 2n, l)
    u, delta, A_, B, C, D_, z_, db, _, sid = _scan_inputs(xc, x_dbl, dt_proj_weight, A, D, z, delta_bias, seq_idx)
    y, _, saved = kern.selective_scan_fwd(u, delta, A_, B, C, D_, z_, db, True, None, sid)
    if out_proj_weight is not None:
        y = project_out(y, out_proj_weight, out_proj_bias, True)  # (b, l, d_model); y itself is dropped
    return y, x_dbl, saved, z_


def inner_bwd(kern, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx, x_dbl,
              saved, dout, deterministic, out_proj_weight=None, out_proj_bias=None, weight_grads=(True,) * 6):
    """The backward from what :func:`inner_fwd` kept -> (dx, dz, dconv_weight, dconv_bias, dx_proj_weight,
    ddt_proj_weight, dA, dD, ddelta_bias, dout_proj_weight, dout_proj_bias); ``dout`` is the gradient of
    inner_fwd's out. ``weight_grads`` (conv weight, conv bias, x_proj, dt_proj, out_proj weight, out_proj bias):
    False skips that gradient (None). out_proj's weight gradient needs y: the scan's backward recomputes it."""
    b, d, l = x.shape
    r, n = dt_proj_weight.shape[1], A.shape[1]
    fused = out_proj_weight is not None
    want_y = fused and weight_grads[4]
    if fused:
        dout_cf = dout.transpose(1, 2)  # (b, d_model, l), a view
        dy = gemm_cf(out_proj_weight.t(), dout_cf, True)  # (b, d, l) = W^T dout, contiguous
    else:
        dy = dout.contiguous()
    # recompute the two (b, d, l) activations the forward dropped, bit for bit
    xc = kern.causal_conv1d_fwd(x, conv_weight, conv_bias, None, seq_idx, True)
    u, delta, A_, B, C, D_, z_, db, _, sid = _scan_inputs(xc, x_dbl, dt_proj_weight, A, D, z, delta_bias, seq_idx)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, _, y = kern.selective_scan_bwd(
        u, delta, A_, B, C, D_, z_, db, True, None, sid, saved, dy, None, deterministic, want_y)
    out_grad = _wgrad(dout_cf, y) if want_y else None  # (d_model, d)
    out_bias_grad = dout.sum((0, 1)) if fused and out_proj_bias is not None and weight_grads[5] else None
    dt_low = x_dbl[:, :r]
    dt_proj_grad = _wgrad(ddelta, dt_low) if weight_grads[3] else None  # (d, r)
    # d x_dbl = [dt_proj^T ddelta; dB; dC]  (b, r + 2n, l)
    dx_dbl = torch.cat([gemm_cf(dt_proj_weight.t(), ddelta, True), dB.to(x.dtype).reshape(b, n, l),
                        dC.to(x.dtype).reshape(b, n, l)], dim=1)
    x_proj_grad = _wgrad(dx_dbl, xc) if weight_grads[2] else None  # (r + 2n, d)
    dxc = du + gemm_cf(x_proj_weight.t(), dx_dbl, True)  # (b, d, l)
    dx, dconv_weight, dconv_bias, _ = kern.causal_conv1d_bwd(x, conv_weight, conv_bias, None, seq_idx,
                                                             dxc.contiguous(), True)
    return (dx, dz, dconv_weight if weight_grads[0] else None, dconv_bias if weight_grads[1] else None,
            x_proj_grad, dt_proj_grad, dA, dD, ddelta_bias, out_grad, out_bias_grad)


class MambaInnerFn(torch.autograd.Function):
    """Keeps x, z, x_dbl, the weights and the scan's chunk states; recomputes xc and delta (and y, with out_proj
    inside) in the backward. (Under torch.compile the custom op ``emma_mamba::mamba_inner_fwd`` of
    :mod:`._library` does the same.)"""

    @staticmethod
    def forward(ctx, kern, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias,
                seq_idx, out_proj_weight, out_proj_bias, deterministic):
        out, x_dbl, saved, z_ = inner_fwd(kern, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D,
                                          delta_bias, seq_idx, out_proj_weight, out_proj_bias)
        ctx.set_materialize_grads(False)
        ctx.kern, ctx.deterministic = kern, deterministic
        ctx.save_for_backward(x, z_, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias,
                              seq_idx, x_dbl, saved, out_proj_weight, out_proj_bias)
        return out

    @staticmethod
    @refuse_double_backward("mamba_inner")
    def backward(ctx, dout):
        if dout is None:
            return (None,) * 14
        (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx, x_dbl, saved,
         out_proj_weight, out_proj_bias) = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = inner_bwd(ctx.kern, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias,
                          seq_idx, x_dbl, saved, dout, ctx.deterministic, out_proj_weight, out_proj_bias,
                          weight_grads=need[3:7] + need[11:13])
        return (None, *grads[:9], None, *grads[9:], None)


def _check(x, z, conv_weight, x_proj_weight, dt_proj_weight, A, out_proj_weight=None, out_proj_bias=None):
    """Shapes the separate ops cannot check, because they only see what this op computes from them."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        _fail(f"x must be a 3-D tensor (batch, dim, seqlen), got "
              f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    d = x.shape[1]
    if not isinstance(z, torch.Tensor) or z.shape != x.shape:
        _fail(f"z must have x's shape {tuple(x.shape)}, got "
              f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d:
        _fail(f"A must have shape (dim={d}, dstate), got "
              f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    n = A.shape[1]
    if not isinstance(dt_proj_weight, torch.Tensor) or dt_proj_weight.dim() != 2 or dt_proj_weight.shape[0] != d:
        _fail(f"dt_proj_weight must have shape (dim={d}, dt_rank), got "
              f"{tuple(dt_proj_weight.shape) if isinstance(dt_proj_weight, torch.Tensor) else dt_proj_weight!r}")
    r = dt_proj_weight.shape[1]
    if not isinstance(x_proj_weight, torch.Tensor) or tuple(x_proj_weight.shape) != (r + 2 * n, d):
        # dt_rank is read from dt_proj_weight and dstate from A: either may be the one that is wrong
        _fail(f"x_proj_weight must have shape (dt_rank + 2 * dstate = {r + 2 * n}, dim={d}), with dt_rank = "
              f"dt_proj_weight.shape[1] = {r} and dstate = A.shape[1] = {n}, got "
              f"{tuple(x_proj_weight.shape) if isinstance(x_proj_weight, torch.Tensor) else x_proj_weight!r}")
    if out_proj_weight is not None and (not isinstance(out_proj_weight, torch.Tensor) or out_proj_weight.dim() != 2
                                        or out_proj_weight.shape[1] != d):
        _fail(f"out_proj_weight must have shape (d_model, dim={d}), got "
              f"{tuple(out_proj_weight.shape) if isinstance(out_proj_weight, torch.Tensor) else out_proj_weight!r}")
    if out_proj_bias is not None:
        if out_proj_weight is None:
            _fail("out_proj_bias was given without out_proj_weight")
        if not isinstance(out_proj_bias, torch.Tensor) or tuple(out_proj_bias.shape) != (out_proj_weight.shape[0],):
            _fail(f"out_proj_bias must have shape (d_model={out_proj_weight.shape[0]},), got "
                  f"{tuple(out_proj_bias.shape) if isinstance(out_proj_bias, torch.Tensor) else out_proj_bias!r}")
    for name, t in (("conv_weight", conv_weight), ("x_proj_weight", x_proj_weight),
                    ("dt_proj_weight", dt_proj_weight), ("out_proj_weight", out_proj_weight),
                    ("out_proj_bias", out_proj_bias)):
        if t is not None and t.device != x.device:
            _fail(f"{name} is on {t.device} but x is on {x.device}")
