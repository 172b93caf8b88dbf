"""One decode step of the selective scan, in place: the recurrent form of Mamba used during generation.

``h = exp(dt * A) * h + dt * B * x``; ``y = <C, h> + D * x``, gated by ``silu(z)``; ``dt`` optionally gets
``dt_bias`` and softplus. The state ``(b, d, n)`` keeps its dtype (the update is computed in fp32 and
rounded once on store); the output is computed from the fp32 state, as the reference does.

One program per (channel block, batch) owns a ``(BLOCK_D, n)`` slice of the state: one read and one write of
the state, the only traffic that grows with the model, so the step is memory bound and the block is sized to
keep enough bytes in flight per SM. B/C may be grouped ``(b, g, n)``: BLOCK_D divides the group size so each
program reads one row. x, z, B and C are read with their own batch (and group) strides: in the mixer they are
views of the in_proj and x_proj outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import channel_state_tile, launch_kwargs, softplus

# elements of state per program and warps; on an H100 at d=5120, n=16, 512 was fastest at batch 1 and equal
# to 1024 at batches 16 and 64 (benchmarks/gpu/triton_kernels.py)
TILE = 512
WARPS = 4


@triton.jit
def _selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, out_ptr,
    dim, dstate, cpg_B, cpg_C, sB_b, sB_g, sC_b, sC_g, sx_b, sz_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d, pid_b, offs_d, offs_n, mask_d, mask_n, mask_dn = channel_state_tile(dim, dstate, BLOCK_D, BLOCK_N)
    st_off = (pid_b * dim + offs_d[:, None]) * dstate + offs_n[None, :]  # (BD, BN) into (b, d, n)
    bd = pid_b * dim + offs_d  # (BD,) into (b, d)
    h = tl.load(state_ptr + st_off, mask=mask_dn, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + pid_b * sx_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + bd, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DTB:
        dt += tl.load(dtb_ptr + offs_d, mask=mask_d, other=0.0)
    if SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0)
    grp_B = (pid_d * BLOCK_D) // cpg_B
    grp_C = (pid_d * BLOCK_D) // cpg_C
    Bv = tl.load(B_ptr + pid_b * sB_b + grp_B * sB_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * sC_b + grp_C * sC_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.exp2(dt[:, None] * A * 1.4426950408889634) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + st_off, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * sz_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + bd, y.to(out_ptr.dtype.element_ty), mask=mask_d)




def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """Kernel-module protocol: updates ``state (b, d, n)`` in place, returns out (b, d) in x's dtype."""
    b, d, n = state.shape
    block_n = triton.next_power_of_2(n)
    block_d = min(triton.next_power_of_2(d), max(1, TILE // block_n))
    gB = B.shape[1] if B.dim() == 3 else 1
    gC = C.shape[1] if C.dim() == 3 else 1
    if gB > 1:
        block_d = min(block_d, (d // gB) & -(d // gB))  # a power of two dividing the group size
    if gC > 1:
        block_d = min(block_d, (d // gC) & -(d // gC))
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, whatever x's strides
    _selective_state_update_kernel[(triton.cdiv(d, block_d), b)](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, out,
        d, n, d // gB, d // gC, B.stride(0), B.stride(1) if gB > 1 else 0, C.stride(0),
        C.stride(1) if gC > 1 else 0, x.stride(0), z.stride(0) if z is not None else 0,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n, **launch_kwargs(WARPS))
    return out
