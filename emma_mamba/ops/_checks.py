"""Input validation shared by every backend, so each one fails the same way with the same message.

Inputs the kernels read row by row pass as they are when their last dimension has unit stride, whatever their
other strides: the conv's x and the scan's z (b, d, l), and a decode step's x, z (b, d) and B, C (b, [g,] n) -- in
the Mamba mixer these are views of one in_proj or x_proj output, which the kernels read in place instead of
copying them out (mamba-ssm's kernels take the same batch and channel strides). Other non-contiguous inputs are
copied; tensors a decode op updates in place must already be contiguous, since a copy would silently drop the
update.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class OpInputError(ValueError):
    """A tensor passed to an op has the wrong shape, dtype, device or layout."""


def _fail(op: str, msg: str):
    raise OpInputError(f"emma_mamba.ops.{op}: {msg}")


def _check_tensor(op, name, t, shape, dtypes, device):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(dict.fromkeys(str(d).replace("torch.", "") for d in dtypes))  # once each (x's may repeat)
        _fail(op, f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if t.device != device:
        _fail(op, f"{name} is on {t.device} but the other inputs are on {device}")


def _contig(t):
    return None if t is None else t.contiguous()


def _rows(t):
    """An input the kernels read with its own batch (and channel / group) strides: as it is if its last dimension
    has unit stride (a size-1 last dimension counts: only its one element is read), else a contiguous copy."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
    """Validate and return contiguous copies where needed. Returns the (possibly copied) tensors."""
    op = "selective_scan"
    if not isinstance(u, torch.Tensor) or u.dim() != 3:
        _fail(op, f"u must be a 3-D tensor (batch, dim, seqlen), got "
                  f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    b, d, l = u.shape
    dev = u.device
    if l == 0:
        _fail(op, "seqlen (u.shape[2]) must be at least 1")
    if u.dtype not in FLOAT_DTYPES:
        _fail(op, f"u must be float32, float16 or bfloat16, got {u.dtype}")
    _check_tensor(op, "delta", delta, (b, d, l), (u.dtype,), dev)
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != d:
        _fail(op, f"A must have shape (dim={d}, dstate), got "
                  f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    n = A.shape[1]
    if n == 0:
        _fail(op, "dstate (A.shape[1]) must be at least 1")
    _check_tensor(op, "A", A, (d, n), (torch.float32,), dev)
    for name, X in (("B", B), ("C", C)):
        if not isinstance(X, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor")
        if X.dim() == 2:
            _check_tensor(op, name, X, (d, n), (torch.float32,), dev)
        elif X.dim() == 3:
            _check_tensor(op, name, X, (b, n, l), (u.dtype, torch.float32), dev)
        elif X.dim() == 4:
            g = X.shape[1]
            if g < 1 or d % g != 0:
                _fail(op, f"{name} has {g} groups, which must divide dim={d}")
            _check_tensor(op, name, X, (b, g, n, l), (u.dtype, torch.float32), dev)
        else:
            _fail(op, f"{name} must be (dim, dstate), (batch, dstate, seqlen) or "
                      f"(batch, groups, dstate, seqlen), got {tuple(X.shape)}")
    if D is not None:
        _check_tensor(op, "D", D, (d,), (torch.float32,), dev)
    if z is not None:
        _check_tensor(op, "z", z, (b, d, l), (u.dtype,), dev)
    if delta_bias is not None:
        _check_tensor(op, "delta_bias", delta_bias, (d,), (torch.float32,), dev)
    if initial_state is not None:
        _check_tensor(op, "initial_state", initial_state, (b, d, n), (torch.float32,), dev)
    if seq_idx is not None:
        _check_tensor(op, "seq_idx", seq_idx, (b, l), (torch.int32,), dev)
    return (*(_contig(t) for t in (u, delta, A, B, C, D)), _rows(z),
            *(_contig(t) for t in (delta_bias, initial_state, seq_idx)))


def check_causal_conv1d(x, weight, bias, initial_states, seq_idx, activation):
    op = "causal_conv1d"
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        _fail(op, f"x must be a 3-D tensor (batch, dim, seqlen), got "
                  f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    b, d, l = x.shape
    if l == 0:
        _fail(op, "seqlen (x.shape[2]) must be at least 1")
    if x.dtype not in FLOAT_DTYPES:
        _fail(op, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != d:
        conv1d = isinstance(weight, torch.Tensor) and weight.dim() == 3 and weight.shape[1] == 1
        _fail(op, f"weight must have shape (dim={d}, width), got "
                  f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
                  + (" (an nn.Conv1d's weight: pass weight.squeeze(1), as for causal_conv1d_fn)" if conv1d else ""))
    w = weight.shape[1]
    if not 2 <= w <= 4:
        _fail(op, f"conv width (weight.shape[1], d_conv) must be 2, 3 or 4, got {w}")
    _check_tensor(op, "weight", weight, (d, w), (x.dtype, torch.float32), x.device)
    if bias is not None:
        _check_tensor(op, "bias", bias, (d,), (x.dtype, torch.float32), x.device)
    if initial_states is not None:
        _check_tensor(op, "initial_states", initial_states, (b, d, w - 1), (x.dtype, torch.float32), x.device)
    if seq_idx is not None:
        _check_tensor(op, "seq_idx", seq_idx, (b, l), (torch.int32,), x.device)
    check_activation(op, activation)
    return (_rows(x), *(_contig(t) for t in (weight, bias, initial_states, seq_idx)))


def check_activation(op, activation):
    if isinstance(activation, torch.Tensor):  # a tensor passed by position, where causal-conv1d's order has one
        _fail(op, f"activation must be None, 'silu' or 'swish', got a tensor of shape {tuple(activation.shape)}: "
                  f"this op's order is (x, weight, bias, activation, initial_states, seq_idx), where causal-conv1d's "
                  f"causal_conv1d_fn has seq_idx and initial_states 4th and 5th; pass them by name")
    if activation not in (None, "silu", "swish"):
        _fail(op, f"activation must be None, 'silu' or 'swish', got {activation!r}")


def check_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias):
    op = "selective_state_update"
    if not isinstance(state, torch.Tensor) or state.dim() != 3:
        _fail(op, f"state must be a 3-D tensor (batch, dim, dstate), got "
                  f"{tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}")
    b, d, n = state.shape
    dev = state.device
    if n == 0:
        _fail(op, "dstate (state.shape[2]) must be at least 1")
    if state.dtype not in FLOAT_DTYPES:
        _fail(op, f"state must be float32, float16 or bfloat16, got {state.dtype}")
    if not state.is_contiguous():
        _fail(op, "state is updated in place and must be contiguous")
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        _fail(op, "x must be a float32, float16 or bfloat16 tensor")
    _check_tensor(op, "x", x, (b, d), (x.dtype,), dev)
    _check_tensor(op, "dt", dt, (b, d), (x.dtype,), dev)
    _check_tensor(op, "A", A, (d, n), (torch.float32,), dev)
    for name, X in (("B", B), ("C", C)):
        if isinstance(X, torch.Tensor) and X.dim() == 3:
            g = X.shape[1]
            if g < 1 or d % g != 0 or X.shape[2] != n:
                _fail(op, f"{name} must have shape (batch={b}, dstate={n}) or (batch={b}, groups, dstate={n}) with "
                          f"groups dividing dim={d}, got {tuple(X.shape)} (one step: no time axis)")
            _check_tensor(op, name, X, (b, g, n), (x.dtype, torch.float32), dev)
        else:
            _check_tensor(op, name, X, (b, n), (x.dtype, torch.float32), dev)
    # D and dt_bias also in x's dtype, as mamba-ssm's selective_state_update takes them (its Mamba.step passes the
    # module's own D and dt_proj.bias, bf16 in a bf16 model); the kernels read fp32: these (d,) copies are negligible
    if D is not None:
        _check_tensor(op, "D", D, (d,), (torch.float32, x.dtype), dev)
        D = D.float()
    if z is not None:
        _check_tensor(op, "z", z, (b, d), (x.dtype,), dev)
    if dt_bias is not None:
        _check_tensor(op, "dt_bias", dt_bias, (d,), (torch.float32, x.dtype), dev)
        dt_bias = dt_bias.float()
    if B.shape != C.shape:  # e.g. (b, n) and (b, g, n): one layout for both, as every backend's kernel takes
        B, C = _common_groups(B, C)
    return (_rows(x), *(_contig(t) for t in (dt, A)), _rows(B), _rows(C), _contig(D), _rows(z), _contig(dt_bias))


def _common_groups(B, C):
    """B and C of a decode step with different group counts (a (b, n) tensor is one group) as (b, G, n) each,
    G the least common multiple (it divides dim, since both counts do): channel c reads group c * G // dim,
    which lies inside its group of either count. Copies only these small (b, G, n) tensors."""
    b3, c3 = (X[:, None] if X.dim() == 2 else X for X in (B, C))
    G = math.lcm(b3.shape[1], c3.shape[1])
    return b3.repeat_interleave(G // b3.shape[1], dim=1), c3.repeat_interleave(G // c3.shape[1], dim=1)


def check_causal_conv1d_update(x, conv_state, weight, bias, activation):
    op = "causal_conv1d_update"
    if not isinstance(conv_state, torch.Tensor) or conv_state.dim() != 3:
        _fail(op, f"conv_state must be a 3-D tensor (batch, dim, width), got "
                  f"{tuple(conv_state.shape) if isinstance(conv_state, torch.Tensor) else type(conv_state).__name__}")
    b, d, w = conv_state.shape
    if not 2 <= w <= 4:
        _fail(op, f"conv width (conv_state.shape[2], d_conv) must be 2, 3 or 4, got {w}")
    if not conv_state.is_contiguous():
        _fail(op, "conv_state is updated in place and must be contiguous")
    if conv_state.dtype not in FLOAT_DTYPES:
        _fail(op, f"conv_state must be float32, float16 or bfloat16, got {conv_state.dtype}")
    dev = conv_state.device
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        _fail(op, "x must be a float32, float16 or bfloat16 tensor")
    if isinstance(x, torch.Tensor) and x.dim() == 3 and tuple(x.shape) == (b, d, 1):
        _fail(op, f"x must have shape (batch, dim) = {(b, d)}, one step, got {tuple(x.shape)} (causal-conv1d's "
                  f"(batch, dim, seqlen) layout: pass x[..., 0], or run causal_conv1d with initial_states for "
                  f"several steps)")
    _check_tensor(op, "x", x, (b, d), (x.dtype,), dev)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == d and weight.shape[1] != w:
        _fail(op, f"conv_state {tuple(conv_state.shape)} and weight {tuple(weight.shape)} disagree on the conv "
                  f"width: conv_state holds the last width inputs, (batch, dim, width) = {(b, d, weight.shape[1])} "
                  f"for this weight (not causal-conv1d's width - 1)")
    _check_tensor(op, "weight", weight, (d, w), (x.dtype, torch.float32), dev)
    if bias is not None:
        _check_tensor(op, "bias", bias, (d,), (x.dtype, torch.float32), dev)
    check_activation(op, activation)
    return (_rows(x), *(_contig(t) for t in (weight, bias)))
