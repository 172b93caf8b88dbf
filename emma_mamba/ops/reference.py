"""Readable fp32 reference implementations of the four Mamba ops.

These are the oracle of every kernel test: sequential loops over time, written for clarity, differentiable
by autograd, never benchmarked as "ours". Every backend (cpu, cuda, triton) must agree with them within the
tolerances of DESIGN.md.

Conventions (shared by all backends):

* ``selective_scan`` computes, per batch ``b``, channel ``d`` and state ``n``::

      delta_t = softplus(delta_t + delta_bias)          (bias / softplus optional)
      h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
      y_t     = <C_t, h_t> + D * u_t
      out_t   = y_t * silu(z_t)                          (if z is given)

  ``h_{-1}`` is ``initial_state`` (or zero). With ``seq_idx`` the state is reset to zero wherever
  ``seq_idx[b, t] != seq_idx[b, t-1]``: the initial state only feeds the first segment of a row.
* ``causal_conv1d`` is a depthwise causal convolution, ``out_t = sum_k w[k] * x_{t-(W-1)+k} + bias``.
  ``initial_states (b, d, W-1)`` stands in for the inputs before ``t = 0`` (first segment only); with
  ``seq_idx`` a tap counts only where ``seq_idx`` equals ``seq_idx[b, t]``, so the window never reaches into a
  previous segment (of another id: a row that returns to an earlier id, unchecked, is no valid packing).
* The decode steps update their state in place and return the step's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_bc(X: torch.Tensor, b: int, d: int, l: int) -> torch.Tensor:
    """B or C in any accepted layout -> fp32 ``(b, d, n, l)`` (readability over memory: this is the oracle)."""
    if X.dim() == 2:  # constant (d, n)
        return X.float()[None, :, :, None].expand(b, d, X.shape[1], l)
    if X.dim() == 3:  # variable (b, n, l), shared by all channels
        return X.float()[:, None].expand(b, d, X.shape[1], l)
    g = X.shape[1]  # grouped (b, g, n, l): channel c uses group c // (d // g)
    return X.float().repeat_interleave(d // g, dim=1)


def _segment_starts(seq_idx: torch.Tensor | None, b: int, l: int, device) -> torch.Tensor:
    """Bool ``(b, l)``: True where a new packed sequence starts (position 0 excluded)."""
    starts = torch.zeros(b, l, dtype=torch.bool, device=device)
    if seq_idx is not None and l > 1:
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, seq_idx=None):
    """Selective scan, one time step at a time.

    u, delta, z: (b, d, l); A: (d, n) fp32; B, C: (d, n) | (b, n, l) | (b, g, n, l);
    D, delta_bias: (d,) fp32; initial_state: (b, d, n); seq_idx: int32 (b, l).
    Returns out (b, d, l) in u's dtype, and the last state (b, d, n) fp32 if ``return_last_state``.
    """
    dtype_in = u.dtype
    b, d, l = u.shape
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx = _expand_bc(B, b, d, l)  # (b, d, n, l)
    Cx = _expand_bc(C, b, d, l)
    A = A.float()
    starts = _segment_starts(seq_idx, b, l, u.device)

    h = (initial_state.float() if initial_state is not None
         else u.new_zeros(b, d, A.shape[1]))  # (b, d, n)
    # unbind once: indexing [..., t] inside the loop would make autograd allocate a full-size gradient per step
    us, deltas, Bs, Cs = u.unbind(-1), delta.unbind(-1), Bx.unbind(-1), Cx.unbind(-1)
    ys = []
    for t in range(l):
        if t > 0:
            h = torch.where(starts[:, t, None, None], torch.zeros_like(h), h)
        dt = deltas[t][..., None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * Bs[t] * us[t][..., None]
        ys.append((h * Cs[t]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_states=None, seq_idx=None):
    """Depthwise causal conv. x: (b, d, l); weight: (d, w); bias: (d,); initial_states: (b, d, w-1).

    activation: None, "silu" or "swish". Returns (b, d, l) in x's dtype.
    """
    dtype_in = x.dtype
    b, d, l = x.shape
    w = weight.shape[1]
    xf = x.float()
    pad = (initial_states.float() if initial_states is not None else xf.new_zeros(b, d, w - 1))
    xp = torch.cat([pad, xf], dim=-1)  # (b, d, w-1+l): xp[..., j] is input position j-(w-1)
    if seq_idx is not None:
        sid = seq_idx.long()
        # segment of every padded position; the padding belongs to the row's first segment
        sidp = torch.cat([sid[:, :1].expand(b, w - 1), sid], dim=-1)  # (b, w-1+l)
    out = xf.new_zeros(b, d, l)
    for k in range(w):
        tap = xp[..., k:k + l]  # input at position t-(w-1)+k
        if seq_idx is not None:
            same = (sidp[:, k:k + l] == sid)[:, None, :]  # (b, 1, l)
            # a select, not a product with 0: a NaN / inf of another sequence stays there (NaN * 0 is NaN), in the
            # backward too (where's gradient is 0 off the mask)
            tap = torch.where(same, tap, tap.new_zeros(()))
        out = out + weight.float()[:, k, None] * tap
    if bias is not None:
        out = out + bias.float()[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(dtype_in)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step of the selective scan, updating ``state (b, d, n)`` in place; differentiable, also over
    several steps (what the backward reads is never the state a later step overwrites).

    x, dt, z: (b, d); A: (d, n); B, C: (b, n) or (b, g, n); D, dt_bias: (d,). Returns (b, d) in x's dtype.
    """
    b, d = x.shape
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    if B.dim() == 3:  # (b, g, n) -> (b, d, n)
        Bx = B.float().repeat_interleave(d // B.shape[1], dim=1)
        Cx = C.float().repeat_interleave(d // C.shape[1], dim=1)
    else:
        Bx, Cx = B.float()[:, None], C.float()[:, None]
    prev = state.float()
    if prev is state and torch.is_grad_enabled():  # saved for the backward: not the tensor overwritten below
        prev = prev.clone()
    h = torch.exp(dtf[..., None] * A.float()) * prev + dtf[..., None] * Bx * x.float()[..., None]
    state.copy_(h.to(state.dtype))
    y = (h * Cx).sum(-1)
    if D is not None:
        y = y + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One decode step of the causal conv. x: (b, d); conv_state: (b, d, w), updated in place.

    The state holds the last w inputs, oldest first: it shifts left by one and x enters at the end.
    Returns (b, d) in x's dtype.
    """
    new = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    conv_state.copy_(new)
    out = (new.float() * weight.float()).sum(-1)  # (new, not the state a next step overwrites, is saved)
    if bias is not None:
        out = out + bias.float()
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(x.dtype)
