"""Helpers shared by the kernels: index tiles (inlined by Triton into each kernel that calls them) and the host's
launch options."""

import functools
import os

import triton
import triton.language as tl


@functools.cache
def interpreting() -> bool:
    """Whether @triton.jit runs kernels in Triton's interpreter (TRITON_INTERPRET=1, read at decoration time, so
    fixed for the process: cached, as decode steps launch often): ``triton.knobs`` from triton 3.4 on, the
    environment variable itself before that (triton.knobs is absent)."""
    try:
        from triton import knobs  # noqa: PLC0415
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def launch_kwargs(num_warps: int) -> dict:
    """Launch options: num_warps on a GPU; none in the interpreter, which rejects them."""
    return {} if interpreting() else {"num_warps": num_warps}


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


@triton.jit
def softplus(x):
    """torch's softplus (threshold 20) to about an ulp, as max(x, 0) + log1p(exp(-|x|)) with the log1p summed as
    2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = e / (2 + e) <= 1/3 (the terms left out: under 2e-9 of it).
    The plain log(1 + exp(x)) rounds 1 + exp(x) to fp32: it lost exp(x)'s low bits (relative errors ~1e-5 for x
    in [-20, -5]) and returned 0 below x ~ -17; a compensated log1p would lean on the GPU's approximate log
    near 1, this needs only exp."""
    e = tl.exp(-tl.abs(x))
    s = e / (2.0 + e)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return tl.where(x <= 20.0, tl.maximum(x, 0.0) + 2.0 * s * p, x)
