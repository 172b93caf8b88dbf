"""Depthwise causal conv1d (the short convolution of the Mamba block) forward, backward and decode step.

``out_t = act(sum_k w[k] * x_{t-(W-1)+k} + bias)`` with ``W`` in 2..4 and ``act`` identity or SiLU.
``initial_states (b, d, W-1)`` stands in for the inputs before ``t = 0``; with ``seq_idx`` a tap that reaches
into another packed sequence reads zero (the initial states belong to the row's first sequence), as in
emma_mamba/ops/reference.py.

x is read with its own batch and channel strides (unit stride in time: the mixer passes a view of its in_proj
output); the outputs are contiguous. The forward is one program per (sequence block, channel block, batch)
reading the ``W`` shifted input tiles (they hit L1/L2; the conv is memory bound). The backward runs two such
kernels: the first recomputes the pre-activation, writes ``g = dout * act'(pre)`` in fp32 and per-(batch,
sequence block) partials of dweight and dbias (summed by torch in a fixed order: deterministic, no atomics); the
second gathers ``dx_t = sum_k w[k] * g_{t+(W-1)-k}`` (and the initial states' gradient) from ``g``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import launch_kwargs

BLOCK_L = 256
BLOCK_D = 16
WARPS = 4


@triton.jit
def _tap(x_ptr, init_ptr, seq_ptr, xrow, init_row, seq_row, s_t, p, m2, mt,
         WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Input at positions ``p`` (1, BL) as fp32 (BD, BL): x (rows at ``xrow``), the initial states before 0, zero
    across sequence boundaries."""
    xv = tl.load(x_ptr + xrow + p, mask=m2 & (p >= 0), other=0.0).to(tl.float32)
    if HAS_INIT:
        iv = tl.load(init_ptr + init_row + (p + (WIDTH - 1)), mask=m2 & (p < 0), other=0.0).to(tl.float32)
        xv = tl.where(p < 0, iv, xv)
    if HAS_SEQ:
        # positions before 0 belong to the row's first sequence: read seq_idx[0] for them
        s_p = tl.load(seq_ptr + seq_row + tl.maximum(p, 0), mask=mt, other=0)  # p <= t
        xv = tl.where(s_p == s_t, xv, 0.0)
    return xv


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, out_ptr,
    dim, seqlen, sx_b, sx_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]  # (1, BL)
    mask_d = offs_d < dim
    mt = t < seqlen
    m2 = mask_d[:, None] & mt
    row = pid_b * dim * seqlen + offs_d[:, None] * seqlen  # (BD, 1) into the contiguous output
    xrow = pid_b * sx_b + offs_d[:, None] * sx_d  # (BD, 1) into x
    init_row = (pid_b * dim + offs_d[:, None]) * (WIDTH - 1)
    seq_row = pid_b * seqlen
    if HAS_SEQ:
        s_t = tl.load(seq_ptr + seq_row + t, mask=t < seqlen, other=0)
    else:
        s_t = 0
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        xv = _tap(x_ptr, init_ptr, seq_ptr, xrow, init_row, seq_row, s_t, t - (WIDTH - 1) + k, m2, mt,
                  WIDTH, HAS_INIT, HAS_SEQ)
        acc += wk[:, None] * xv
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + row + t, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _conv_bwd_g_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dout_ptr, g_ptr, dw_part_ptr, db_part_ptr,
    dim, seqlen, nblocks_l, sx_b, sx_d,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]
    mask_d = offs_d < dim
    mt = t < seqlen
    m2 = mask_d[:, None] & mt
    row = pid_b * dim * seqlen + offs_d[:, None] * seqlen  # into dout and g (contiguous)
    xrow = pid_b * sx_b + offs_d[:, None] * sx_d
    init_row = (pid_b * dim + offs_d[:, None]) * (WIDTH - 1)
    seq_row = pid_b * seqlen
    if HAS_SEQ:
        s_t = tl.load(seq_ptr + seq_row + t, mask=t < seqlen, other=0)
    else:
        s_t = 0
    dout = tl.load(dout_ptr + row + t, mask=m2, other=0.0).to(tl.float32)
    if SILU:  # recompute the pre-activation
        pre = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
            pre += wk[:, None] * _tap(x_ptr, init_ptr, seq_ptr, xrow, init_row, seq_row, s_t,
                                      t - (WIDTH - 1) + k, m2, mt, WIDTH, HAS_INIT, HAS_SEQ)
        if HAS_BIAS:
            pre += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        sg = tl.sigmoid(pre)
        g = dout * sg * (1.0 + pre * (1.0 - sg))
    else:
        g = dout
    g = tl.where(m2, g, 0.0)
    tl.store(g_ptr + row + t, g, mask=m2)
    part = (pid_b * nblocks_l + pid_l) * dim + offs_d  # (BD,) into (b * nblocks_l, d)
    for k in tl.static_range(WIDTH):
        xv = _tap(x_ptr, init_ptr, seq_ptr, xrow, init_row, seq_row, s_t, t - (WIDTH - 1) + k, m2, mt,
                  WIDTH, HAS_INIT, HAS_SEQ)
        tl.store(dw_part_ptr + part * WIDTH + k, tl.sum(g * xv, axis=1), mask=mask_d)
    if HAS_BIAS:
        tl.store(db_part_ptr + part, tl.sum(g, axis=1), mask=mask_d)


@triton.jit
def _conv_bwd_dx_kernel(
    w_ptr, seq_ptr, g_ptr, dx_ptr, dinit_ptr,
    dim, seqlen,
    WIDTH: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t = (pid_l * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]
    mask_d = offs_d < dim
    m2 = mask_d[:, None] & (t < seqlen)
    row = pid_b * dim * seqlen + offs_d[:, None] * seqlen
    seq_row = pid_b * seqlen
    if HAS_SEQ:
        s_t = tl.load(seq_ptr + seq_row + t, mask=t < seqlen, other=0)
    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        # input t feeds output t + (W-1) - k through tap k
        wk = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        q = t + (WIDTH - 1 - k)
        mq = m2 & (q < seqlen)
        gq = tl.load(g_ptr + row + q, mask=mq, other=0.0)
        if HAS_SEQ:
            s_q = tl.load(seq_ptr + seq_row + q, mask=q < seqlen, other=0)
            gq = tl.where(s_q == s_t, gq, 0.0)
        dx += wk[:, None] * gq
    tl.store(dx_ptr + row + t, dx.to(dx_ptr.dtype.element_ty), mask=m2)
    if HAS_INIT:
        if pid_l == 0:
            # initial state j is input position j - (W-1); it feeds output q = j - k for k <= j
            zero = offs_d * 0  # (BD,) positions as tensors, so that masks are tensors
            if HAS_SEQ:
                s0 = tl.load(seq_ptr + seq_row + zero)
            for j in tl.static_range(WIDTH - 1):
                acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for k in tl.static_range(j + 1):
                    # (fresh names: a runtime `if` may not change the type of the loop's variables)
                    qj = zero + (j - k)
                    wj = tl.load(w_ptr + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
                    gj = tl.load(g_ptr + pid_b * dim * seqlen + offs_d * seqlen + qj,
                                 mask=mask_d & (qj < seqlen), other=0.0)
                    if HAS_SEQ:
                        sj = tl.load(seq_ptr + seq_row + qj, mask=qj < seqlen, other=0)
                        gj = tl.where(sj == s0, gj, 0.0)
                    acc += wj * gj
                tl.store(dinit_ptr + (pid_b * dim + offs_d) * (WIDTH - 1) + j,
                         acc.to(dinit_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr,
    dim, sx_b,
    WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)[None, :]  # (1, BW)
    mask_d = offs_d < dim
    st_row = (pid_b * dim + offs_d[:, None]) * WIDTH  # (BD, 1) into (b, d, W)
    x = tl.load(x_ptr + pid_b * sx_b + offs_d, mask=mask_d, other=0.0)
    # shift left by one: slot k takes slot k+1, the last slot takes x (rounded to the state's dtype)
    shifted = tl.load(state_ptr + st_row + offs_w + 1, mask=mask_d[:, None] & (offs_w < WIDTH - 1), other=0.0)
    new = tl.where(offs_w == WIDTH - 1, x.to(state_ptr.dtype.element_ty)[:, None], shifted)
    tl.store(state_ptr + st_row + offs_w, new, mask=mask_d[:, None] & (offs_w < WIDTH))
    w = tl.load(w_ptr + offs_d[:, None] * WIDTH + offs_w, mask=mask_d[:, None] & (offs_w < WIDTH),
                other=0.0).to(tl.float32)
    acc = tl.sum(new.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * dim + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


# ---------------------------------------------------------------------------------------------------------
# host side


def _grid(b, d, l):
    return (triton.cdiv(l, BLOCK_L), triton.cdiv(d, BLOCK_D), b)


def causal_conv1d_fwd(x, weight, bias, initial_states, seq_idx, silu):
    """Kernel-module protocol: returns out (b, d, l) in x's dtype."""
    b, d, l = x.shape
    W = weight.shape[1]
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, whatever x's strides
    _conv_fwd_kernel[_grid(b, d, l)](
        x, weight, bias if bias is not None else x, initial_states if initial_states is not None else x,
        seq_idx if seq_idx is not None else x, out, d, l, x.stride(0), x.stride(1),
        WIDTH=W, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
        SILU=bool(silu), BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, **launch_kwargs(WARPS))
    return out


def causal_conv1d_bwd(x, weight, bias, initial_states, seq_idx, dout, silu):
    """Kernel-module protocol: returns ``(dx, dweight, dbias, dinitial_states)`` in their inputs' dtypes."""
    b, d, l = x.shape
    W = weight.shape[1]
    nbl = triton.cdiv(l, BLOCK_L)
    g = torch.empty(b, d, l, device=x.device, dtype=torch.float32)
    dw_part = torch.empty(b * nbl, d, W, device=x.device, dtype=torch.float32)
    db_part = torch.empty(b * nbl, d, device=x.device, dtype=torch.float32) if bias is not None else None
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dinit = torch.empty_like(initial_states) if initial_states is not None else None
    common = dict(WIDTH=W, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None,
                  BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L, **launch_kwargs(WARPS))
    _conv_bwd_g_kernel[_grid(b, d, l)](
        x, weight, bias if bias is not None else x, initial_states if initial_states is not None else x,
        seq_idx if seq_idx is not None else x, dout, g, dw_part, db_part if db_part is not None else g,
        d, l, nbl, x.stride(0), x.stride(1), HAS_BIAS=bias is not None, SILU=bool(silu), **common)
    _conv_bwd_dx_kernel[_grid(b, d, l)](
        weight, seq_idx if seq_idx is not None else x, g, dx, dinit if dinit is not None else g, d, l, **common)
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, dinit


def causal_conv1d_update(x, conv_state, weight, bias, silu):
    """Kernel-module protocol: one decode step, ``conv_state (b, d, W)`` updated in place; returns (b, d)."""
    b, d, W = conv_state.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    block_d = min(triton.next_power_of_2(d), 128)
    _conv_update_kernel[(triton.cdiv(d, block_d), b)](
        x, conv_state, weight, bias if bias is not None else x, out, d, x.stride(0),
        WIDTH=W, BLOCK_W=triton.next_power_of_2(W), HAS_BIAS=bias is not None, SILU=bool(silu),
        BLOCK_D=block_d, **launch_kwargs(WARPS))
    return out
