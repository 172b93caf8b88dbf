"""Selective scan (Mamba's S6, Gu & Dao 2023, Algorithm 2) forward and backward as Triton kernels.

Per batch ``b``, channel ``d`` and state ``n`` the recurrence is ``h_t = a_t * h_{t-1} + b_t`` with
``a_t = exp(delta_t * A)`` and ``b_t = delta_t * B_t * u_t``; ``y_t = <C_t, h_t> + D * u_t``, gated by
``silu(z_t)``. A linear recurrence is a scan over the pairs ``(a_t, b_t)`` with the associative operator

    (a1, b1) o (a2, b2) = (a1 * a2, a2 * b1 + b2)

(Blelloch 1990; the formulation of the Mamba paper's parallel scan). One program owns one batch row and a
block of ``BLOCK_D`` channels and walks the sequence in chunks of ``CHUNK`` steps, the fp32 state entering each
chunk kept in the saved-states buffer below. Inside a chunk it loops over the state index and scans
``(BLOCK_D, CHUNK)`` tiles along time with ``tl.associative_scan``, the state entering the chunk folded into its
first ``b``. The
tiles keep time contiguous as in memory, so loads are vectorised and Triton gives each thread a run of
consecutive steps: the scan is sequential in registers with warp shuffles only for per-thread aggregates,
and ``<C_t, h_t>`` accumulates over the state loop in-thread (the layout of mamba-ssm's CUDA kernel).

Forward saves only the state entering every chunk, fp32 ``(b, d, nchunks, n)``; the backward walks the
chunks in reverse, recomputes the chunk's states from that boundary, and runs the adjoint recurrence

    dh_t = C_t * dy_t + a_{t+1} * dh_{t+1}

as a scan over ``(a_{t+1}, C_t * dy_t)`` from the chunk's last step (a forward scan over tiles whose steps are
reversed), carrying ``a_{t0} * dh_{t0}`` (the gradient of the state before the chunk) to the previous chunk. No
``(b, d, l, n)`` tensor is ever stored. The weight gradients take ``a_t * h_{t-1}`` from the recomputed states
shifted one step (``h_t - b_t`` cancels where ``a_t`` is small); ``y`` (for the gate's gradient) is summed from
the same recomputed states.

``seq_idx`` (packed sequences): where a new sequence starts the recurrence restarts from zero and, in the
backward, no gradient crosses the boundary; the scans carry a sequence-start flag and select on it rather than
multiplying by ``a_t = 0`` (0 * NaN is NaN: a NaN of one sequence would reach the next). The initial state
therefore reaches the first segment only, as in the reference.

Reductions over the sequence (dA, dD, ddelta_bias, and dB/dC of a constant B/C) go to per-batch fp32
partials summed by torch: deterministic. dB/dC of variable or grouped B/C are sums over the channels of a
group: ``deterministic=False`` adds them with fp32 atomics (the chunked backward one row per channel, as
mamba-ssm's CUDA kernel does, rather than summing its block's channels across warps first);
``deterministic=True`` writes one fp32 partial per channel block and sums them in a fixed order (more memory).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._tiles import channel_state_tile, launch_kwargs, softplus

# Launch shapes, the fastest measured on an H100 (triton 3.6) at mamba-2.8b shapes, b=8, d=5120, n=16,
# L=2048, bf16 (benchmarks/gpu/triton_kernels.py): forward 2.29 ms, backward 33-36 ms, both measured before the
# kernels' loops lost their barriers and shared-memory round trips (benchmarks/triton_sass.py), untimed since.
# Module-level so a benchmark can try others; the backward must run with the forward's CHUNK (the saved states are
# per chunk). With CHUNK=128 the backward took 19.5-25.5 ms instead of 33-36 ms (BLOCK_D=2, 2 warps) and the
# forward 2.87 ms (also before).
CHUNK = 256
FWD_BLOCK_D = 8
FWD_WARPS = 8
BWD_BLOCK_D = 4
BWD_WARPS = 4
# deterministic=False: the chunked backward adds dB / dC of a variable B / C one row per channel (each warp its own:
# 4x the fp32 atomics of one row per channel block, mamba-ssm's count; no barrier in the loop over states) or, with
# False, sums its block's channels across warps first (a reduction through shared memory: 10 barriers per state
# index per chunk on sm_90). Untimed both: a GPU benchmark decides.
BWD_ROW_ATOMICS = True

# The forward has two implementations that write the same outputs and the same saved states, so either feeds
# the one backward: "chunked" (the kernel above: tl.associative_scan over (channel, time) tiles, one state
# index at a time) and "sequential" (one thread group per channel holds all its states in registers and walks
# the time steps one by one, only b * d * 4 threads; statically its step is the costlier, ~44 instructions per
# (t, n) element against ~21: benchmarks/triton_sass.py). "chunked" is the default because it is the one measured
# on a GPU; "sequential" is tested on the interpreter and timed side by side by the GPU benchmark
# (emma_mamba/bench/kernels_gpu.py), which is where the default should be decided. EMMA_TRITON_SCAN_FWD
# overrides this at import.
FWD_IMPL = os.environ.get("EMMA_TRITON_SCAN_FWD", "chunked")
SEQ_BLOCK_D = 32
SEQ_WARPS = 4
# Likewise two backwards: "chunked" (associative scans per state index) and "sequential" (the adjoint
# one step at a time, states in registers; each chunk walked forwards from its saved state with checkpoints
# every SEQ_BWD_TILE steps in a small per-program scratch). EMMA_TRITON_SCAN_BWD overrides at import.
BWD_IMPL = os.environ.get("EMMA_TRITON_SCAN_BWD", "chunked")
SEQ_BWD_BLOCK_D = 32
SEQ_BWD_TILE = 16
SEQ_BWD_WARPS = 4


@triton.jit
def _decay_rate2(A):
    """A log2(e), A = -inf (a state that forgets at once) as the most negative float: a masked step's dt = 0 must
    give the identity decay exp2(0 * A2) = 1, and 0 * -inf is NaN (a NaN A stays NaN)."""
    a2 = A * 1.4426950408889634
    return tl.where(a2 == float("-inf"), -3.4028234663852886e38, a2)


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 * (a1 * h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _combine_reset(a1, b1, r1, a2, b2, r2):
    # as _combine, where r marks a step that starts a new sequence (seq_idx): it takes nothing from before it. A
    # select, not a = 0: 0 * NaN is NaN, and a NaN or inf of one packed sequence would reach the next
    return a1 * a2, tl.where(r2 != 0, b2, a2 * b1 + b2), r1 | r2


@triton.jit
def _chunk_scan(a, b, reset, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """x_t of x_t = a_t x_{t-1} + b_t along a chunk's steps (axis 1; from the last step backwards with REVERSE),
    the carry already folded into ``b``; with seq_idx, the steps where ``reset`` (1, T) is set take nothing from
    their predecessor."""
    if HAS_SEQ:
        r = tl.where(reset, 1, 0) + tl.zeros(a.shape, dtype=tl.int32)
        _, x, _ = tl.associative_scan((a, b, r), axis=1, combine_fn=_combine_reset, reverse=REVERSE)
    else:
        _, x = tl.associative_scan((a, b), axis=1, combine_fn=_combine, reverse=REVERSE)
    return x


@triton.jit
def _chunk_states(a, b, h_in, first, reset, HAS_SEQ: tl.constexpr):
    """h_t over a chunk's steps from the state ``h_in`` (BD, 1) entering it: a_t h_in folded into the first
    step's b (unless a sequence starts there), then the scan."""
    return _chunk_scan(a, tl.where(first & ~reset, b + a * h_in, b), reset, False, HAS_SEQ)


@triton.jit
def _delta_of(raw, bias, SOFTPLUS: tl.constexpr):
    dt = raw + bias
    if SOFTPLUS:
        dt = softplus(dt)
    return dt


@triton.jit
def _halves(x, BD: tl.constexpr, T: tl.constexpr):
    """A (BD, T) tile as two (BD, T // 8, 4) tiles: steps 8 j + k and 8 j + 4 + k, k < 4 (register renaming: each
    thread's two runs of 4 of its 8 steps)."""
    return tl.split(tl.permute(tl.reshape(x, (BD, T // 8, 2, 4)), (0, 1, 3, 2)))


@triton.jit
def _put_halves(base, t3, on3, seqlen, lo, hi, ATOMIC: tl.constexpr):
    """Adds (fp32 atomics) or stores _halves' tiles at base + step (t3: the steps of lo), where on3 holds. In the scan
    tiles' layout, 16 bytes a thread: a (BD, T) pointer tile got a layout of its own (4 steps a thread, the widest
    fp32 vector) and the values went to it through shared memory."""
    if ATOMIC:
        tl.atomic_add(base + t3, lo, mask=on3 & (t3 < seqlen), sem="relaxed")
        tl.atomic_add(base + t3 + 4, hi, mask=on3 & (t3 + 4 < seqlen), sem="relaxed")
    else:
        tl.store(base + t3, lo, mask=on3 & (t3 < seqlen))
        tl.store(base + t3 + 4, hi, mask=on3 & (t3 + 4 < seqlen))


@triton.jit
def _put_block_sum(base, x, t3, first3, seqlen, zero3, ATOMIC: tl.constexpr, BD: tl.constexpr, T: tl.constexpr):
    """The (BD, T) tile ``x`` summed over its channels (one reduction across the program's warps), added or stored
    by its first channel's threads (_put_halves)."""
    lo, hi = _halves(x, BD, T)
    lo, hi = tl.reduce((lo, hi), 0, _add2, keep_dims=True)
    _put_halves(base, t3, first3, seqlen, lo + zero3, hi + zero3, ATOMIC)


@triton.jit
def _sum_into(ptr, x, lane0, accumulate):
    """ptr += x (BD,), or ptr = x unless accumulate, by the lane-0 threads of a (BD, T // 8) tile (see the chunked
    backward)."""
    x = x[:, None] + tl.zeros(ptr.shape, dtype=tl.float32)
    tl.store(ptr, tl.load(ptr, mask=lane0 & accumulate, other=0.0) + x, mask=lane0)


@triton.jit
def _steps8(x, BD: tl.constexpr, T: tl.constexpr):
    """A (BD, T) tile's steps 8 j + k as 8 (BD, T // 8) tiles x_k. Where each thread holds 8 consecutive steps (the
    layout of the chunked backward's bf16 tiles on sm_90: one warp a channel, 256 steps), a renaming of registers;
    in any other layout the same values, at the cost of layout conversions. So for _tile8, _reverse8, _prev_step and
    _halves."""
    y = tl.reshape(x, (BD, T // 8, 2, 2, 2))  # step 8 j + 4 k2 + 2 k1 + k0
    s0, s1 = tl.split(y)  # k0
    s00, s01 = tl.split(s0)  # k1
    s10, s11 = tl.split(s1)
    x0, x4 = tl.split(s00)  # k2
    x2, x6 = tl.split(s01)
    x1, x5 = tl.split(s10)
    x3, x7 = tl.split(s11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _tile8(x0, x1, x2, x3, x4, x5, x6, x7, BD: tl.constexpr, T: tl.constexpr):
    """_steps8's inverse."""
    q0 = tl.join(tl.join(x0, x4), tl.join(x2, x6))  # k2, then k1
    q1 = tl.join(tl.join(x1, x5), tl.join(x3, x7))
    return tl.reshape(tl.join(q0, q1), (BD, T))  # then k0


@triton.jit
def _reverse8(x, BD: tl.constexpr, T: tl.constexpr):
    """Each thread's 8 steps in reverse order (register renaming)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _steps8(x, BD, T)
    return _tile8(x7, x6, x5, x4, x3, x2, x1, x0, BD, T)


@triton.jit
def _prev_step(x, x_first, BD: tl.constexpr, T: tl.constexpr):
    """x one step later along axis 1: column j holds x[:, j - 1], column 0 x_first (BD, 1). Within a thread's 8
    steps a renaming of registers; the step before a thread's first comes from the previous lane (one shuffle)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _steps8(x, BD, T)
    lane = tl.arange(0, T // 8)[None, :] + tl.zeros((BD, T // 8), dtype=tl.int32)
    p = tl.gather(x7, tl.maximum(lane - 1, 0), axis=1)
    p = tl.where(lane == 0, x_first, p)
    return _tile8(p, x0, x1, x2, x3, x4, x5, x6, BD, T)


@triton.jit
def _add4(a1, b1, c1, d1, a2, b2, c2, d2):
    return a1 + a2, b1 + b2, c1 + c2, d1 + d2


@triton.jit
def _add2(a1, b1, a2, b2):
    return a1 + a2, b1 + b2


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, seq_ptr,
    out_ptr, last_ptr, saved_ptr,
    dim, seqlen, dstate, nchunks, cpg_B, cpg_C,
    sB_b, sB_g, sC_b, sC_g, sz_b, sz_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # Tiles are (channel, time), time contiguous as in memory, so loads are vectorised and Triton keeps
    # runs of consecutive steps in each thread: the scan is sequential in registers, with warp shuffles
    # only for the per-thread aggregates. The state index is a loop, so <C_t, h_t> accumulates in-thread.
    # The state entering chunk c is kept where the backward reads it, saved[b, d, c, :]: each state index's
    # iteration loads its h_in from there ((BD,) loads) and the thread holding the chunk's last step stores the
    # chunk-end state to chunk c + 1's slot (the last chunk's to last_state); one barrier per chunk makes those
    # visible to the other threads. Pulling a column out of a carried (channel, state) register tile and writing
    # one back, and B/C rows loaded as (1, T), were layout conversions through shared memory (four barriers per
    # state index per chunk on sm_90), and a reduction over the lanes for the chunk-end state 5 shuffles.
    pid_d, pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn = channel_state_tile(dim, dstate, BLOCK_D, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)  # (T,)
    # every channel of a program is in one group of B and of C (the host picks BLOCK_D so)
    B_base = B_ptr + pid_b * sB_b + ((pid_d * BLOCK_D) // cpg_B) * sB_g
    C_base = C_ptr + pid_b * sC_b + ((pid_d * BLOCK_D) // cpg_C) * sC_g
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)[:, None]  # (BD, 1)
    if HAS_DBIAS:
        bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0)[:, None]
    else:
        bias = 0.0
    row = pid_b * dim * seqlen + offs_d[:, None] * seqlen  # (BD, 1) into (b, d, l)
    zrow = pid_b * sz_b + offs_d[:, None] * sz_d  # (BD, 1) into z (its own strides: a view of in_proj's output)
    state_row = (pid_b * dim + offs_d) * dstate  # (BD,) into (b, d, n)
    saved_row = (pid_b * dim + offs_d) * nchunks * dstate  # (BD,) into (b, d, nchunks, n): chunk 0
    if HAS_H0:
        h = tl.load(h0_ptr + state_row[:, None] + offs_n[None, :], mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    tl.store(saved_ptr + saved_row[:, None] + offs_n[None, :], h, mask=mask_dn)
    tl.debug_barrier()  # the states are read back by other threads
    first = (offs_c == 0)[None, :]
    zero_d = (offs_d * 0)[:, None]  # (BD, 1)
    # the chunk-end state of each state index is its thread's last step in the last lane: _steps8's eighth tile
    # (BD, T // 8), stored from there by that thread (no reduction across the lanes)
    lane = tl.arange(0, CHUNK // 8)[None, :] + zero_d  # (BD, T // 8)
    last_lane = (lane == CHUNK // 8 - 1) & mask_d[:, None]

    for c in range(nchunks):
        t = c * CHUNK + offs_c  # (T,)
        mask_t = t < seqlen
        m2 = mask_d[:, None] & mask_t[None, :]  # (BD, T)
        u = tl.load(u_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        dt = tl.where(m2, _delta_of(dt, bias, SOFTPLUS), 0.0)  # padding: a = 1, b = 0
        dtu = dt * u
        if HAS_SEQ:
            s_cur = tl.load(seq_ptr + pid_b * seqlen + t, mask=mask_t, other=0)
            s_prev = tl.load(seq_ptr + pid_b * seqlen + t - 1, mask=mask_t & (t > 0), other=0)
            reset = ((t > 0) & (s_cur != s_prev))[None, :]
        else:
            reset = (offs_c < 0)[None, :]  # never
        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        h_at = saved_ptr + saved_row + c * dstate  # (BD,): the state entering this chunk
        if c + 1 < nchunks:
            h_end = saved_ptr + saved_row + (c + 1) * dstate  # (BD,): the state entering the next chunk
        else:
            h_end = last_ptr + state_row
        h_end = h_end[:, None] + lane * 0  # (BD, T // 8)
        t_bd = t[None, :] + zero_d  # (BD, T): B's and C's steps, the same for every channel
        m_bd = mask_t[None, :] & (zero_d == 0)
        for n in range(dstate):
            A_n = _decay_rate2(tl.load(A_ptr + offs_d * dstate + n, mask=mask_d, other=0.0))
            # a variable B / C row is loaded as a (BD, T) tile (every channel's row the same addresses: L1 hits)
            # in the layout of the scan's tiles; a (1, T) load got a layout of its own and went through shared
            # memory with two barriers to reach them
            if B_VAR:
                B_n = tl.load(B_base + n * seqlen + t_bd, mask=m_bd, other=0.0).to(tl.float32)  # (BD, T)
            else:
                B_n = tl.load(B_ptr + offs_d * dstate + n, mask=mask_d, other=0.0)[:, None]  # (BD, 1)
            if C_VAR:
                C_n = tl.load(C_base + n * seqlen + t_bd, mask=m_bd, other=0.0).to(tl.float32)
            else:
                C_n = tl.load(C_ptr + offs_d * dstate + n, mask=mask_d, other=0.0)[:, None]
            a = tl.exp2(dt * A_n[:, None])  # (BD, T)
            h_in = tl.load(h_at + n, mask=mask_d, other=0.0)[:, None]  # (BD, 1)
            hs = _chunk_states(a, dtu * B_n, h_in, first, reset, HAS_SEQ)  # h_t, state n
            y += hs * C_n
            # padding carries h unchanged to the chunk end
            tl.store(h_end + n, _steps8(hs, BLOCK_D, CHUNK)[7], mask=last_lane)
        tl.debug_barrier()  # the chunk-end states, read by other threads in the next chunk
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            z = tl.load(z_ptr + zrow + t[None, :], mask=m2, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(out_ptr + row + t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _selective_scan_fwd_seq_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, seq_ptr,
    out_ptr, last_ptr, saved_ptr,
    dim, seqlen, dstate, nchunks, cpg_B, cpg_C,
    sB_b, sB_g, sC_b, sC_g, sz_b, sz_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # The recurrence as written, one time step per iteration: the (channel, state) tile h lives in registers
    # (a few threads per channel, each holding some of its states), y_t = <C_t, h_t> is a reduction over the
    # state axis within those threads. Per step the program reads one column of u, delta, z (strided in
    # memory: the other steps of each 32-byte sector are L1 hits over the next iterations) and one row of B, C.
    pid_d, pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn = channel_state_tile(dim, dstate, BLOCK_D, BLOCK_N)
    B_base = B_ptr + pid_b * sB_b + ((pid_d * BLOCK_D) // cpg_B) * sB_g
    C_base = C_ptr + pid_b * sC_b + ((pid_d * BLOCK_D) // cpg_C) * sC_g
    # log2(e) folded into A: exp(dt * A) = exp2(dt * A * log2 e); padded states get A = 0, B = C = 0
    A2 = _decay_rate2(tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0))
    if not B_VAR:
        B_t = tl.load(B_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0)
    if not C_VAR:
        C_t = tl.load(C_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_DBIAS:
        bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        bias = 0.0
    row = pid_b * dim * seqlen + offs_d * seqlen  # (BD,) into (b, d, l)
    zrow = pid_b * sz_b + offs_d * sz_d  # (BD,) into z
    state_off = (pid_b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    saved_off = ((pid_b * dim + offs_d[:, None]) * nchunks) * dstate + offs_n[None, :]
    # y_t is stored from a (BD, QN) tile, y broadcast over QN columns (QN: the threads a channel's states are spread
    # over, each holding 4), column 0 stored: the tile has the layout the reduction over the states leaves y in. As
    # a (BD,) store it got a layout of its own (one thread a channel) and y went to it through shared memory, two
    # barriers per step.
    QN: tl.constexpr = (BLOCK_N + 3) // 4
    col = tl.arange(0, QN)[None, :] + (offs_d * 0)[:, None]  # (BD, QN)
    y_on = mask_d[:, None] & (col == 0)
    for c in range(nchunks):
        tl.store(saved_ptr + saved_off + c * dstate, h, mask=mask_dn)  # the state entering chunk c
        t_end = tl.minimum(c * CHUNK + CHUNK, seqlen)
        for t in range(c * CHUNK, t_end):
            u = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = _delta_of(tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32), bias, SOFTPLUS)
            if B_VAR:
                B_t = tl.load(B_base + offs_n * seqlen + t, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if C_VAR:
                C_t = tl.load(C_base + offs_n * seqlen + t, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            bx = (dt * u)[:, None] * B_t
            if HAS_SEQ:  # a new sequence starts from zero (selected: 0 * a NaN of the previous one is NaN)
                h = tl.where(_starts_at(seq_ptr, pid_b * seqlen, t, seqlen), bx, tl.exp2(dt[:, None] * A2) * h + bx)
            else:
                h = tl.exp2(dt[:, None] * A2) * h + bx
            y = tl.sum(h * C_t, axis=1)
            if HAS_D:
                y += Dv * u
            if HAS_Z:
                zt = tl.load(z_ptr + zrow + t, mask=mask_d, other=0.0).to(tl.float32)
                y *= zt * tl.sigmoid(zt)
            y = y[:, None] + tl.zeros((BLOCK_D, QN), dtype=tl.float32)
            tl.store(out_ptr + row[:, None] + t + col * 0, y.to(out_ptr.dtype.element_ty), mask=y_on)
    tl.store(last_ptr + state_off, h, mask=mask_dn)


@triton.jit
def _store_bwd_sums(dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr, dh0_ptr, dA_acc, dB_acc, dC_acc, dD_acc, dbias_acc,
                    dh0, state_off, bd_off, mask_d, mask_dn, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_DBIAS: tl.constexpr, HAS_H0: tl.constexpr):
    """A backward's per-(batch, channel) sums: partials (b, d, n) / (b, d) that the host sums over the batch,
    and the gradient of the initial state."""
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    if not B_VAR:
        tl.store(dB_ptr + state_off, dB_acc, mask=mask_dn)
    if not C_VAR:
        tl.store(dC_ptr + state_off, dC_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + bd_off, dD_acc, mask=mask_d)
    if HAS_DBIAS:
        tl.store(ddbias_ptr + bd_off, dbias_acc, mask=mask_d)
    if HAS_H0:
        tl.store(dh0_ptr + state_off, dh0, mask=mask_dn)


@triton.jit
def _put_channel_sum(ptr, vals, mask, ATOMIC_BC: tl.constexpr):
    """A program's dB or dC (summed over its channels) into the atomic accumulator, or its own partial."""
    if ATOMIC_BC:
        tl.atomic_add(ptr, vals, mask=mask, sem="relaxed")  # acq_rel (the default) fenced each one
    else:
        tl.store(ptr, vals, mask=mask)


@triton.jit
def _bwd_bases(B_ptr, C_ptr, dB_ptr, dC_ptr, pid_b, pid_d, cpg_B, cpg_C, sB_b, sB_g, sC_b, sC_g,
               sdB_b, sdB_g, sdC_b, sdC_g, BLOCK_D: tl.constexpr, ATOMIC_BC: tl.constexpr):
    """The program's rows of B and C (its channels lie in one group of each), and where its dB/dC go: fp32
    atomics into (b, g, n, l), or one partial per channel block (b, nblocks, n, l)."""
    grp_B = (pid_d * BLOCK_D) // cpg_B
    grp_C = (pid_d * BLOCK_D) // cpg_C
    B_base = B_ptr + pid_b * sB_b + grp_B * sB_g
    C_base = C_ptr + pid_b * sC_b + grp_C * sC_g
    if ATOMIC_BC:
        dB_base = dB_ptr + pid_b * sdB_b + grp_B * sdB_g
        dC_base = dC_ptr + pid_b * sdC_b + grp_C * sdC_g
    else:
        dB_base = dB_ptr + pid_b * sdB_b + pid_d * sdB_g
        dC_base = dC_ptr + pid_b * sdC_b + pid_d * sdC_g
    return B_base, C_base, dB_base, dC_base


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, seq_ptr, saved_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr, dh0_ptr, out_ptr,
    dim, seqlen, dstate, nchunks, cpg_B, cpg_C,
    sB_b, sB_g, sC_b, sC_g, sdB_b, sdB_g, sdC_b, sdC_g, sz_b, sz_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    HAS_DLAST: tl.constexpr, ATOMIC_BC: tl.constexpr, HAS_OUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ROW_ATOMICS: tl.constexpr,
):
    pid_d, pid_b, offs_d, _, mask_d, _, _ = channel_state_tile(dim, dstate, BLOCK_D, BLOCK_N)
    offs_c = tl.arange(0, CHUNK)
    zero_d = (offs_d * 0)[:, None]  # (BD, 1)
    B_base, C_base, dB_base, dC_base = _bwd_bases(B_ptr, C_ptr, dB_ptr, dC_ptr, pid_b, pid_d, cpg_B, cpg_C, sB_b,
                                                  sB_g, sC_b, sC_g, sdB_b, sdB_g, sdC_b, sdC_g, BLOCK_D, ATOMIC_BC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)[:, None]
    if HAS_DBIAS:
        bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0)[:, None]
    else:
        bias = 0.0
    row = pid_b * dim * seqlen + offs_d[:, None] * seqlen
    zrow = pid_b * sz_b + offs_d[:, None] * sz_d
    state_row = (pid_b * dim + offs_d) * dstate  # (BD,) into (b, d, n)
    saved_row = state_row * nchunks  # (BD,) into (b, d, nchunks, n): chunk 0
    # The (channel, state) sums (dA, dB / dC of a constant B / C, and the gradient carried into the previous chunk,
    # kept in dh0 whether or not it is returned) live in their (b, d, n) buffers: each state index's iteration reads
    # and writes its element with one load and one store of the same (BD, T // 8) pointer tile, masked to column 0,
    # so one thread does both and reads back only what it wrote itself (no barrier). Kept as (channel, state)
    # register tiles, each sum's column was selected out and written back every iteration, a compare and select
    # per register each.
    lane = tl.arange(0, CHUNK // 8)[None, :] + zero_d  # (BD, T // 8): the layout of _steps8's tiles
    lane0 = (lane == 0) & mask_d[:, None]
    sums_row = state_row[:, None] + lane * 0  # (BD, T // 8)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = (offs_c == 0)[None, :]
    rev_idx = (CHUNK - 1 - offs_c)[None, :] + tl.zeros((BLOCK_D, CHUNK), dtype=tl.int32)  # step T - 1 - j
    next_idx = (CHUNK - offs_c) % CHUNK + tl.zeros((BLOCK_D, CHUNK), dtype=tl.int32)  # then one step on
    # each thread's 8 steps as in _steps8, from the mirrored lane (loads in order, then _reverse8)
    mirror = (CHUNK - 8 - (offs_c // 8) * 8 + offs_c % 8)[None, :] + zero_d
    # the steps of _halves' first tile, for dB / dC rows
    off3 = (tl.arange(0, CHUNK // 8)[:, None] * 8 + tl.arange(0, 4)[None, :])[None, :, :] + zero_d[:, :, None]
    on3 = mask_d[:, None, None] & (off3 >= 0)
    first3 = on3 & (offs_d == pid_d * BLOCK_D)[:, None, None]  # the block's first channel: its channel sums
    zero3 = tl.zeros((BLOCK_D, CHUNK // 8, 4), dtype=tl.float32)

    for i in range(nchunks):
        c = nchunks - 1 - i
        t = c * CHUNK + offs_c
        mask_t = t < seqlen
        m2 = mask_d[:, None] & mask_t[None, :]
        u = tl.load(u_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        dt_raw = tl.load(delta_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        dt = tl.where(m2, _delta_of(dt_raw, bias, SOFTPLUS), 0.0)  # 0 past the end: a = 1, b = 0
        dy = tl.load(dout_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + zrow + t[None, :], mask=m2, other=0.0).to(tl.float32)
            dy = dy * z * tl.sigmoid(z)  # the gate's; dz needs y, which the state loop sums
        dtu = dt * u
        # the adjoint scan's inputs with the chunk's steps reversed (column j: step T - 1 - j): dy, and delta_{t+1}
        # (for a_{t+1}), delta one step on, the next chunk's first step in column 0
        dy_r = tl.gather(dy, rev_idx, axis=1)
        t_next = c * CHUNK + CHUNK + zero_d  # (BD, 1)
        on_next = mask_d[:, None] & (t_next < seqlen)
        dt_next = tl.load(delta_ptr + row + t_next, mask=on_next, other=0.0).to(tl.float32)
        dt_next = tl.where(on_next, _delta_of(dt_next, bias, SOFTPLUS), 0.0)
        dtn_r = tl.where(first, dt_next, tl.gather(dt, next_idx, axis=1))
        # a variable B / C row is loaded as a (BD, T) tile in the scan tiles' layout (every channel's row the same
        # addresses: L1 hits); as a (1, T) tile it got a layout of its own and reached them through shared memory
        t_bd = t[None, :] + zero_d
        m_bd = mask_t[None, :] & (zero_d == 0)
        t_mr = c * CHUNK + mirror
        m_mr = (t_mr < seqlen) & (zero_d == 0)
        if HAS_SEQ:  # the sequence-start flags likewise, as (BD, T) tiles
            seq_row = seq_ptr + pid_b * seqlen
            s_prev = tl.load(seq_row + t_bd - 1, mask=m_bd & (t_bd > 0), other=0)
            reset = (t_bd > 0) & (tl.load(seq_row + t_bd, mask=m_bd, other=0) != s_prev)
            s_next = tl.load(seq_row + t_mr + 1, mask=(t_mr + 1) < seqlen, other=0)
            starts_next = ((t_mr + 1) < seqlen) & (s_next != tl.load(seq_row + t_mr, mask=m_mr, other=0))
            reset_next_r = _reverse8(starts_next, BLOCK_D, CHUNK)  # step t + 1 starts one
            cut = _starts_at(seq_ptr, pid_b * seqlen, c * CHUNK, seqlen)  # nothing flows back out of the chunk
        else:
            reset = (offs_c < 0)[None, :]  # never
            reset_next_r = reset
            cut = False
        h_at = saved_ptr + saved_row + c * dstate  # (BD,): the state entering this chunk
        t3 = c * CHUNK + off3
        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n <C, h>, for dz and the recomputed output
        ddt = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n dh a_t h_{t-1} A
        dBsum = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # sum_n dh B
        for n in range(dstate):
            A_n = tl.load(A_ptr + offs_d * dstate + n, mask=mask_d, other=0.0)[:, None]
            A2_n = _decay_rate2(A_n)
            if B_VAR:
                B_n = tl.load(B_base + n * seqlen + t_bd, mask=m_bd, other=0.0).to(tl.float32)  # (BD, T)
            else:
                B_n = tl.load(B_ptr + offs_d * dstate + n, mask=mask_d, other=0.0)[:, None]
            a = tl.exp2(dt * A2_n)  # a_t
            h_in = tl.load(h_at + n, mask=mask_d, other=0.0)[:, None]  # (BD, 1): the state entering the chunk
            hs = _chunk_states(a, dtu * B_n, h_in, first, reset, HAS_SEQ)  # recomputed h_t
            # dh_t = C_t dy_t + a_{t+1} dh_{t+1}: a forward scan over the reversed steps, reversed back (Triton's
            # reverse scan reversed each input and its output across the lanes with 5 shuffles per element)
            if C_VAR:
                if HAS_Z or HAS_OUT:
                    C_n = tl.load(C_base + n * seqlen + t_bd, mask=m_bd, other=0.0).to(tl.float32)
                C_r = _reverse8(tl.load(C_base + n * seqlen + t_mr, mask=m_mr, other=0.0).to(tl.float32),
                                BLOCK_D, CHUNK)
            else:
                C_n = tl.load(C_ptr + offs_d * dstate + n, mask=mask_d, other=0.0)[:, None]
                C_r = C_n
            if HAS_Z or HAS_OUT:
                y += hs * C_n
            # the gradient reaching the chunk's last step from later steps (column 0 reversed): the previous
            # chunk's a_{t0} dh_{t0} (below), or dlast into the last chunk
            carry_at = dh0_ptr + sums_row + n
            carry = tl.load(carry_at, mask=lane0 & (i > 0), other=0.0)
            if HAS_DLAST:
                carry += tl.load(dlast_ptr + sums_row + n, mask=lane0 & (i == 0), other=0.0)
            g0, g1, g2, g3, g4, g5, g6, g7 = _steps8(C_r * dy_r, BLOCK_D, CHUNK)
            g_r = _tile8(g0 + carry, g1, g2, g3, g4, g5, g6, g7, BLOCK_D, CHUNK)
            dh_r = _chunk_scan(tl.exp2(dtn_r * A2_n), g_r, reset_next_r, False, HAS_SEQ)
            dh = tl.gather(dh_r, rev_idx, axis=1)  # dh_t
            # the gradient of the state before the chunk, a_{t0} dh_{t0}, for the previous chunk: stored where it
            # was read, by the same thread (the same pointer tile), read back by it in the next iteration
            ga0 = _steps8(a * dh, BLOCK_D, CHUNK)[0]  # (BD, T // 8): lane 0 holds step 0
            tl.store(carry_at, tl.where(cut, 0.0, ga0), mask=lane0)
            # a_t h_{t-1} from h_{t-1} itself (hs one step back; h_in at the first step): as h_t - b_t it cancelled
            # where a_t is small (fast-decaying states, large dt), leaving dA with errors ~ eps |b_t|
            hprev = _prev_step(hs, h_in, BLOCK_D, CHUNK)
            dha = dh * tl.where(reset, 0.0, a * hprev)
            ddt += dha * A_n
            dBsum += dh * B_n
            _sum_into(dA_ptr + sums_row + n, tl.sum(dha * dt, axis=1), lane0, i > 0)
            if not B_VAR:
                _sum_into(dB_ptr + sums_row + n, tl.sum(dh * dtu, axis=1), lane0, i > 0)
            if not C_VAR:
                _sum_into(dC_ptr + sums_row + n, tl.sum(hs * dy, axis=1), lane0, i > 0)
            # dB / dC of a variable B / C: sums over the channels of a group
            if ATOMIC_BC and ROW_ATOMICS:  # each warp adds its channel's row: no sum across the warps
                if B_VAR:
                    lo, hi = _halves(dh * dtu, BLOCK_D, CHUNK)
                    _put_halves(dB_base + n * seqlen, t3, on3, seqlen, lo, hi, True)
                if C_VAR:
                    lo, hi = _halves(hs * dy, BLOCK_D, CHUNK)
                    _put_halves(dC_base + n * seqlen, t3, on3, seqlen, lo, hi, True)
            elif B_VAR and C_VAR:  # the block's sums (one reduction across its warps): its partial, or atomics
                bl, bh = _halves(dh * dtu, BLOCK_D, CHUNK)
                cl, ch = _halves(hs * dy, BLOCK_D, CHUNK)
                bl, bh, cl, ch = tl.reduce((bl, bh, cl, ch), 0, _add4, keep_dims=True)
                _put_halves(dB_base + n * seqlen, t3, first3, seqlen, bl + zero3, bh + zero3, ATOMIC_BC)
                _put_halves(dC_base + n * seqlen, t3, first3, seqlen, cl + zero3, ch + zero3, ATOMIC_BC)
            elif B_VAR:
                _put_block_sum(dB_base + n * seqlen, dh * dtu, t3, first3, seqlen, zero3, ATOMIC_BC, BLOCK_D, CHUNK)
            elif C_VAR:
                _put_block_sum(dC_base + n * seqlen, hs * dy, t3, first3, seqlen, zero3, ATOMIC_BC, BLOCK_D, CHUNK)
        if (HAS_Z or HAS_OUT) and HAS_D:
            y += Dv * u
        if HAS_Z:
            z = tl.load(z_ptr + zrow + t[None, :], mask=m2, other=0.0).to(tl.float32)  # again: fewer registers
            sz = tl.sigmoid(z)
            dout = tl.load(dout_ptr + row + t[None, :], mask=m2, other=0.0).to(tl.float32)
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + row + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
            if HAS_OUT:
                y *= z * sz  # the gate, as the forward applies it
        if HAS_OUT:
            tl.store(out_ptr + row + t[None, :], y.to(out_ptr.dtype.element_ty), mask=m2)
        du = dBsum * dt
        ddt += dBsum * u  # sum_n dh (B u + a_t h_{t-1} A)
        if HAS_D:
            du += Dv * dy
            dD_acc += tl.sum(tl.where(m2, dy * u, 0.0), axis=1)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(dt_raw + bias)
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + row + t[None, :], ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)

    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d)
    if HAS_DBIAS:
        tl.store(ddbias_ptr + pid_b * dim + offs_d, dbias_acc, mask=mask_d)


@triton.jit
def _starts_at(seq_ptr, base, t, seqlen):
    """Whether a new sequence starts at step t (seq_idx changes there; never at 0 or past the end)."""
    tc = tl.minimum(t, seqlen - 1)
    cur = tl.load(seq_ptr + base + tc)
    prev = tl.load(seq_ptr + base + tl.maximum(tc - 1, 0))
    return (t > 0) & (t < seqlen) & (cur != prev)


@triton.jit
def _seq_step(h, t, seqlen, row, mask_d, mask_n, zero_d, zero_n, offs_n, u_ptr, delta_ptr, B_base, B_const,
              seq_ptr, seq_base, A2, bias, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, B_VAR: tl.constexpr):
    """The recurrence's step t (a no-op past the end): returns (h_t, u_t)."""
    on_d = mask_d & ((zero_d + t) < seqlen)  # channels in range, step in range
    u = tl.load(u_ptr + row + t, mask=on_d, other=0.0).to(tl.float32)
    dt = _delta_of(tl.load(delta_ptr + row + t, mask=on_d, other=0.0).to(tl.float32), bias, SOFTPLUS)
    dt = tl.where(on_d, dt, 0.0)
    if B_VAR:
        on_n = mask_n & ((zero_n + t) < seqlen)
        B_t = tl.load(B_base + offs_n * seqlen + t, mask=on_n, other=0.0).to(tl.float32)[None, :]
    else:
        B_t = B_const
    bx = (dt * u)[:, None] * B_t
    if HAS_SEQ:  # selected, not a = 0 (see _combine_reset)
        return tl.where(_starts_at(seq_ptr, seq_base, t, seqlen), bx, tl.exp2(dt[:, None] * A2) * h + bx), u
    return tl.exp2(dt[:, None] * A2) * h + bx, u


@triton.jit
def _selective_scan_bwd_seq_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, seq_ptr, saved_ptr, dout_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr, dh0_ptr, out_ptr, ck_ptr,
    dim, seqlen, dstate, nchunks, cpg_B, cpg_C,
    sB_b, sB_g, sC_b, sC_g, sdB_b, sdB_g, sdC_b, sdC_g, sz_b, sz_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
    HAS_DLAST: tl.constexpr, ATOMIC_BC: tl.constexpr, HAS_OUT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
):
    # The adjoint walked one time step at a time with the (channel, state) tile in registers, as the
    # sequential forward walks the recurrence. It runs backwards, so per chunk pass 1 walks forwards from the
    # saved state and writes a checkpoint every TILE steps (scratch ck, per program), and pass 2, tile by
    # tile from the last, recomputes the tile's states into scratch, then walks them backwards:
    #   g_t = a_{t+1} g_{t+1} + C_t dy_t,  dA += g_t a_t h_{t-1} dt_t, ...
    # with h_{t-1} read back from the scratch (not h_t - b_t, which cancels where a_t is small); a_t is recomputed
    # in the backward walk and carried one step as a_{t+1}.
    pid_d, pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn = channel_state_tile(dim, dstate, BLOCK_D, BLOCK_N)
    B_base, C_base, dB_base, dC_base = _bwd_bases(B_ptr, C_ptr, dB_ptr, dC_ptr, pid_b, pid_d, cpg_B, cpg_C, sB_b,
                                                  sB_g, sC_b, sC_g, sdB_b, sdB_g, sdC_b, sdC_g, BLOCK_D, ATOMIC_BC)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0)
    A2 = _decay_rate2(A)
    if not B_VAR:
        B_t = tl.load(B_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0)
        B_const = B_t
    else:
        B_const = A2  # unused: each step loads its row of B
    if not C_VAR:
        C_t = tl.load(C_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        Dv = 0.0
    if HAS_DBIAS:
        bias = tl.load(dbias_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        bias = 0.0
    row = pid_b * dim * seqlen + offs_d * seqlen  # (BD,) into (b, d, l)
    zrow = pid_b * sz_b + offs_d * sz_d  # (BD,) into z
    state_off = (pid_b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    saved_off = ((pid_b * dim + offs_d[:, None]) * nchunks) * dstate + offs_n[None, :]
    NT: tl.constexpr = CHUNK // TILE
    zero_d = tl.zeros((BLOCK_D,), dtype=tl.int32)
    zero_n = tl.zeros((BLOCK_N,), dtype=tl.int32)
    ck_off = ((pid_b * dim + offs_d[:, None]) * (NT + TILE)) * dstate + offs_n[None, :]  # slot 0
    if HAS_DLAST:
        g = tl.load(dlast_ptr + state_off, mask=mask_dn, other=0.0)
    else:
        g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    alpha = tl.full((BLOCK_D, BLOCK_N), 1.0, dtype=tl.float32)  # a_{t+1}: 1 after the last step
    cut = seqlen < 0  # whether step t + 1 starts a sequence (seq_idx): g_t then takes nothing from g_{t+1}
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dB_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # constant B/C only
    dC_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)

    for i in range(nchunks):
        c = nchunks - 1 - i
        cs = c * CHUNK
        ntiles = tl.cdiv(tl.minimum(CHUNK, seqlen - cs), TILE)
        # pass 1: checkpoints
        h = tl.load(saved_ptr + saved_off + c * dstate, mask=mask_dn, other=0.0)
        for tile in range(ntiles):
            tl.store(ck_ptr + ck_off + tile * dstate, h, mask=mask_dn)
            for s in range(TILE):
                h, u = _seq_step(h, cs + tile * TILE + s, seqlen, row, mask_d, mask_n, zero_d, zero_n, offs_n,
                                 u_ptr, delta_ptr, B_base, B_const, seq_ptr, pid_b * seqlen, A2, bias,
                                 SOFTPLUS, HAS_SEQ, B_VAR)
        tl.debug_barrier()
        # pass 2: tiles from the last
        for j in range(ntiles):
            tile = ntiles - 1 - j
            t0 = cs + tile * TILE
            h = tl.load(ck_ptr + ck_off + tile * dstate, mask=mask_dn, other=0.0)
            for s in range(TILE):  # recompute the tile's states into the scratch slots NT ... NT + TILE - 1
                t = t0 + s
                h, u = _seq_step(h, t, seqlen, row, mask_d, mask_n, zero_d, zero_n, offs_n,
                                 u_ptr, delta_ptr, B_base, B_const, seq_ptr, pid_b * seqlen, A2, bias,
                                 SOFTPLUS, HAS_SEQ, B_VAR)
                tl.store(ck_ptr + ck_off + (NT + s) * dstate, h, mask=mask_dn)
                if HAS_Z or HAS_OUT:  # the gate's gradient and the recomputed output need y_t = <C_t, h_t> + D u_t
                    on_d = mask_d & ((zero_d + t) < seqlen)
                    on_n = mask_n & ((zero_n + t) < seqlen)
                    if C_VAR:
                        C_t = tl.load(C_base + offs_n * seqlen + t, mask=on_n, other=0.0).to(tl.float32)[None, :]
                    y = tl.sum(h * C_t, axis=1)
                    if HAS_D:
                        y += Dv * u
                    if HAS_Z:
                        zt = tl.load(z_ptr + zrow + t, mask=on_d, other=0.0).to(tl.float32)
                        do = tl.load(dout_ptr + row + t, mask=on_d, other=0.0).to(tl.float32)
                        sz = tl.sigmoid(zt)
                        dz = do * y * sz * (1.0 + zt * (1.0 - sz))
                        tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=on_d)
                        if HAS_OUT:
                            y *= zt * sz  # the gate, as the forward applies it
                    if HAS_OUT:
                        tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=on_d)
            tl.debug_barrier()
            for s in range(TILE):  # backwards through the tile
                k = TILE - 1 - s
                t = t0 + k
                on_d = mask_d & ((zero_d + t) < seqlen)  # channels in range, step in range
                on_n = mask_n & ((zero_n + t) < seqlen)
                u = tl.load(u_ptr + row + t, mask=on_d, other=0.0).to(tl.float32)
                xs = tl.load(delta_ptr + row + t, mask=on_d, other=0.0).to(tl.float32) + bias
                dt = tl.where(on_d, _delta_of(xs, 0.0, SOFTPLUS), 0.0)
                if B_VAR:
                    B_t = tl.load(B_base + offs_n * seqlen + t, mask=on_n, other=0.0).to(tl.float32)[None, :]
                if C_VAR:
                    C_t = tl.load(C_base + offs_n * seqlen + t, mask=on_n, other=0.0).to(tl.float32)[None, :]
                dy = tl.load(dout_ptr + row + t, mask=on_d, other=0.0).to(tl.float32)
                if HAS_Z:
                    zt = tl.load(z_ptr + zrow + t, mask=on_d, other=0.0).to(tl.float32)
                    dy = dy * zt * tl.sigmoid(zt)
                h = tl.load(ck_ptr + ck_off + (NT + k) * dstate, mask=mask_dn, other=0.0)
                # h_{t-1}: the tile's previous step, or the tile's checkpoint before its first step
                hp = tl.load(ck_ptr + ck_off + tl.where(k > 0, NT + k - 1, tile) * dstate, mask=mask_dn, other=0.0)
                dtu = dt * u
                a_t = tl.exp2(dt[:, None] * A2)
                if HAS_SEQ:  # selects, not a = 0 (see _combine_reset)
                    start = _starts_at(seq_ptr, pid_b * seqlen, t, seqlen)
                    hprev_a = tl.where(start, 0.0, a_t * hp)
                    g = tl.where(cut, 0.0, alpha * g) + C_t * dy[:, None]
                    cut = start
                else:
                    hprev_a = a_t * hp
                    g = alpha * g + C_t * dy[:, None]
                ga = g * hprev_a
                dA_acc += ga * dt[:, None]
                gB = tl.sum(g * B_t, axis=1)
                ddt = u * gB + tl.sum(ga * A, axis=1)
                du = dt * gB
                if HAS_D:
                    du += Dv * dy
                    dD_acc += tl.where(on_d, dy * u, 0.0)
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(xs)
                ddt = tl.where(on_d, ddt, 0.0)
                dbias_acc += ddt
                tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=on_d)
                tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=on_d)
                if B_VAR:
                    dB_t = tl.sum(g * dtu[:, None], axis=0)  # (BN,): summed over the block's channels
                    _put_channel_sum(dB_base + offs_n * seqlen + t, dB_t, on_n, ATOMIC_BC)
                else:
                    dB_acc += g * dtu[:, None]
                if C_VAR:
                    dC_t = tl.sum(h * dy[:, None], axis=0)
                    _put_channel_sum(dC_base + offs_n * seqlen + t, dC_t, on_n, ATOMIC_BC)
                else:
                    dC_acc += h * dy[:, None]
                alpha = a_t  # the next (earlier) step's a_{t+1}
            tl.debug_barrier()

    # alpha * g: the adjoint of the state before step 0
    _store_bwd_sums(dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr, dh0_ptr, dA_acc, dB_acc, dC_acc, dD_acc, dbias_acc,
                    alpha * g, state_off, pid_b * dim + offs_d, mask_d, mask_dn, B_VAR, C_VAR, HAS_D, HAS_DBIAS, HAS_H0)


# ---------------------------------------------------------------------------------------------------------
# host side


def _chunk(l: int) -> int:
    """Steps per chunk: CHUNK, or less for short sequences (padding steps cost as much as real ones)."""
    return min(CHUNK, max(16, triton.next_power_of_2(l)))


def _pow2_divisor(x: int) -> int:
    return x & (-x)


def _layout(X: torch.Tensor, d: int):
    """(is_variable, groups, stride over batch, stride over group) of a B or C input (already contiguous)."""
    if X.dim() == 2:  # constant (d, n)
        return False, 1, 0, 0
    if X.dim() == 3:  # (b, n, l): one group
        return True, 1, X.stride(0), 0
    return True, X.shape[1], X.stride(0), X.stride(1)


def _blocks(d: int, n: int, B, C, block_d: int):
    """BLOCK_N and BLOCK_D; with groups, BLOCK_D divides the group size so a program sees one B/C row."""
    block_n = triton.next_power_of_2(n)
    block_d = max(1, min(triton.next_power_of_2(d), block_d))
    for X in (B, C):
        if _ngroups(X) > 1:
            block_d = min(block_d, _pow2_divisor(d // _ngroups(X)))
    return block_d, block_n


def _ngroups(X) -> int:
    return X.shape[1] if X.dim() == 4 else 1


def _z_strides(z):
    """z's batch and channel strides (z is read in place with its own: the mixer's is a view of in_proj's output)."""
    return (0, 0) if z is None else (z.stride(0), z.stride(1))


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
    """Kernel-module protocol: returns ``(out, last_state, saved)``; see emma_mamba/ops/_autograd.py."""
    b, d, l = u.shape
    n = A.shape[1]
    chunk = _chunk(l)
    nchunks = triton.cdiv(l, chunk)
    out = torch.empty_like(u)
    last_state = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    saved = torch.empty(b, d, nchunks, n, device=u.device, dtype=torch.float32)  # state entering each chunk
    B_var, _, sB_b, sB_g = _layout(B, d)
    C_var, _, sC_b, sC_g = _layout(C, d)
    if FWD_IMPL == "sequential":
        kernel, block_d, warps = _selective_scan_fwd_seq_kernel, SEQ_BLOCK_D, SEQ_WARPS
    elif FWD_IMPL == "chunked":
        kernel, block_d, warps = _selective_scan_fwd_kernel, FWD_BLOCK_D, FWD_WARPS
    else:
        raise ValueError(f"emma_mamba.kernels.selective_scan.FWD_IMPL must be 'chunked' or 'sequential' "
                         f"(EMMA_TRITON_SCAN_FWD), got {FWD_IMPL!r}")
    block_d, block_n = _blocks(d, n, B, C, block_d)
    grid = (triton.cdiv(d, block_d), b)
    dummy = u
    kernel[grid](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, initial_state if initial_state is not None else dummy,
        seq_idx if seq_idx is not None else dummy,
        out, last_state, saved,
        d, l, n, nchunks, d // _ngroups(B), d // _ngroups(C),
        sB_b, sB_g, sC_b, sC_g, *_z_strides(z),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DBIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_H0=initial_state is not None, HAS_SEQ=seq_idx is not None,
        B_VAR=B_var, C_VAR=C_var, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
        **launch_kwargs(warps),
    )
    return out, last_state, saved


def deterministic_partial_budget() -> int:
    """Bytes the deterministic backward may hold in dB / dC partials at once (EMMA_DETERMINISTIC_PARTIAL_MB,
    default 4096 MB; the CUDA kernels read the same variable)."""
    env = os.environ.get("EMMA_DETERMINISTIC_PARTIAL_MB", "").strip()
    if not env:
        return 4096 << 20
    try:
        mb = int(env)
    except ValueError:
        mb = -1
    if mb < 0:
        raise RuntimeError(f"EMMA_DETERMINISTIC_PARTIAL_MB must be a number of MB >= 0, got {env!r}")
    return mb << 20


def _bwd_in_batch_slices(rows, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, saved,
                         dout, dlast_state, recompute_out):
    """The deterministic backward over batch slices of ``rows``: per-row gradients concatenated, those of the
    shared parameters (A, D, delta_bias, a constant B or C) summed over the slices in order, in fp32."""
    b = u.shape[0]

    def cut(t, b0, m):
        return None if t is None else t[b0:b0 + m]

    parts = []
    for b0 in range(0, b, rows):
        m = min(rows, b - b0)
        parts.append(selective_scan_bwd(
            u[b0:b0 + m], delta[b0:b0 + m], A, B if B.dim() == 2 else B[b0:b0 + m],
            C if C.dim() == 2 else C[b0:b0 + m], D, cut(z, b0, m), delta_bias, delta_softplus,
            cut(initial_state, b0, m), cut(seq_idx, b0, m), saved[b0:b0 + m], dout[b0:b0 + m],
            cut(dlast_state, b0, m), True, recompute_out))
    # (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state, out): which are per row, which are summed
    per_row = (True, True, False, B.dim() > 2, C.dim() > 2, False, True, False, True, True)
    out = []
    for k, rowwise in enumerate(per_row):
        xs = [p[k] for p in parts]
        if xs[0] is None:
            out.append(None)
        elif rowwise:
            out.append(torch.cat(xs, 0))
        else:
            acc = xs[0].float()
            for x in xs[1:]:
                acc = acc + x.float()
            out.append(acc.to(xs[0].dtype))
    return tuple(out)


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, saved,
                       dout, dlast_state, deterministic, recompute_out):
    """Kernel-module protocol: returns ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state, out)``;
    ``out`` (with ``recompute_out``, else None) is the forward's output, recomputed."""
    b, d, l = u.shape
    n = A.shape[1]
    chunk = _chunk(l)
    nchunks = triton.cdiv(l, chunk)
    if saved.shape != (b, d, nchunks, n):
        raise RuntimeError(f"emma_mamba.kernels.selective_scan_bwd: saved states have shape {tuple(saved.shape)}, "
                           f"expected {(b, d, nchunks, n)} (forward and backward used different CHUNK)")
    dev = u.device
    f32 = torch.float32
    if BWD_IMPL not in ("chunked", "sequential"):
        raise ValueError(f"emma_mamba.kernels.selective_scan.BWD_IMPL must be 'chunked' or 'sequential' "
                         f"(EMMA_TRITON_SCAN_BWD), got {BWD_IMPL!r}")
    sequential = BWD_IMPL == "sequential"
    block_d, block_n = _blocks(d, n, B, C, SEQ_BWD_BLOCK_D if sequential else BWD_BLOCK_D)
    nblk = triton.cdiv(d, block_d)
    n_var = (B.dim() > 2) + (C.dim() > 2)
    if deterministic and b > 1 and n_var:
        # the deterministic dB / dC partials are (b, nblk, n, l) fp32 each: above the budget, batch slices
        per_row = nblk * n * l * 4 * n_var
        budget = deterministic_partial_budget()
        if per_row * b > budget:
            return _bwd_in_batch_slices(max(1, budget // per_row), u, delta, A, B, C, D, z, delta_bias,
                                        delta_softplus, initial_state, seq_idx, saved, dout, dlast_state,
                                        recompute_out)
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty(z.shape, device=dev, dtype=z.dtype) if z is not None else None  # contiguous
    out = torch.empty_like(u) if recompute_out else None
    dA_part = torch.empty(b, d, n, device=dev, dtype=f32)
    dD_part = torch.empty(b, d, device=dev, dtype=f32) if D is not None else None
    dbias_part = torch.empty(b, d, device=dev, dtype=f32) if delta_bias is not None else None
    # the chunked backward carries the gradient between chunks in dh0: allocated either way
    dh0 = torch.empty(b, d, n, device=dev, dtype=f32) if initial_state is not None or not sequential else None
    atomic = not deterministic

    def grad_buffer(X):
        """fp32 buffer for dB/dC and its (batch, group-or-block) strides."""
        if X.dim() == 2:
            buf = torch.empty(b, d, n, device=dev, dtype=f32)  # per-batch partial
            return buf, 0, 0
        g = _ngroups(X)
        if atomic:
            buf = torch.zeros(b, g, n, l, device=dev, dtype=f32)
        else:  # channel blocks of a group are consecutive: (b, g * blocks_per_group, n, l)
            buf = torch.empty(b, nblk, n, l, device=dev, dtype=f32)
        return buf, buf.stride(0), buf.stride(1)

    dB_buf, sdB_b, sdB_g = grad_buffer(B)
    dC_buf, sdC_b, sdC_g = grad_buffer(C)
    B_var, _, sB_b, sB_g = _layout(B, d)
    C_var, _, sC_b, sC_g = _layout(C, d)
    dummy = u
    args = [
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy, saved,
        dout, dlast_state if dlast_state is not None else dummy,
        du, ddelta, dz if dz is not None else dummy, dA_part, dB_buf, dC_buf,
        dD_part if dD_part is not None else dummy, dbias_part if dbias_part is not None else dummy,
        dh0 if dh0 is not None else dummy, out if out is not None else dummy,
    ]
    sizes = [d, l, n, nchunks, d // _ngroups(B), d // _ngroups(C), sB_b, sB_g, sC_b, sC_g, sdB_b, sdB_g, sdC_b, sdC_g,
             *_z_strides(z)]
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DBIAS=delta_bias is not None,
                 SOFTPLUS=bool(delta_softplus), HAS_H0=initial_state is not None, HAS_SEQ=seq_idx is not None,
                 B_VAR=B_var, C_VAR=C_var, HAS_DLAST=dlast_state is not None, ATOMIC_BC=atomic,
                 HAS_OUT=out is not None, BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk)
    if sequential:
        tile = min(SEQ_BWD_TILE, chunk)  # both powers of two: the tile divides the chunk
        # per (b, d): chunk // tile checkpoints, then tile slots for the states of the tile being walked
        ck = torch.empty(b, d, chunk // tile + tile, n, device=dev, dtype=f32)
        _selective_scan_bwd_seq_kernel[(nblk, b)](*args, ck, *sizes, **flags, TILE=tile,
                                                  **launch_kwargs(SEQ_BWD_WARPS))
    else:
        _selective_scan_bwd_kernel[(nblk, b)](*args, *sizes, **flags, ROW_ATOMICS=BWD_ROW_ATOMICS,
                                              **launch_kwargs(BWD_WARPS))

    def finish(X, buf):
        if X.dim() == 2:
            return buf.sum(0).to(X.dtype)
        if not atomic:
            g = _ngroups(X)
            buf = buf.view(b, g, nblk // g, n, l).sum(2)  # fixed order: deterministic
        return buf.view(X.shape).to(X.dtype)

    dA = dA_part.sum(0)
    dB = finish(B, dB_buf)
    dC = finish(C, dC_buf)
    dD = dD_part.sum(0) if D is not None else None
    ddelta_bias = dbias_part.sum(0) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 if initial_state is not None else None, out
