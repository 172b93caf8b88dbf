"""Index helpers shared by the scan kernels (inlined by Triton into each kernel that calls them)."""

import triton
import triton.language as tl


@triton.jit
def channel_state_tile(dim, dstate, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's (channel, state) tile: grid axis 0 walks blocks of BLOCK_D channels, axis 1 the batch.

    Returns pid_d, pid_b (int64: offsets into (b, d, l) tensors overflow int32 at model scale), the channel and
    state offsets (BD,) and (BN,), and their masks (BD,), (BN,), (BD, BN)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    return pid_d, pid_b, offs_d, offs_n, mask_d, mask_n, mask_d[:, None] & mask_n[None, :]
