"""GPU timings of the triton backend (emma_mamba.kernels), for tuning its launch shapes.

Times, with ``triton.testing.do_bench`` (CUDA events, median of repeated runs after warm-up):

* the selective scan forward at mamba-2.8b shapes (b=8, d=5120, n=16, L=2048, bf16, with z, D,
  delta_bias and softplus as the Mamba mixer calls it) for several (CHUNK, tile, warps) launch shapes, and
  forward + backward for the default one; the compiled CUDA backend's forward when emma_mamba._C has it;
  and the memory floor (bytes that must move / 3.0 TB/s, the copy bandwidth seen on the H100 here);
* the decode step (selective_state_update, d=5120, n=16, fp32 state, bf16 inputs) against mamba-ssm's
  Triton ``selective_state_update`` when ``mamba_ssm.ops.triton.selective_state_update`` is importable;
* the causal conv1d forward (w=4, silu) at the same shape.

``do_bench`` clears L2 with a 256 MB ``zero_()`` before each call and does not synchronise between calls: a
call whose host launch is shorter than that kernel is timed as device time (cold L2), a longer one with its host
launch. The decode-step times are therefore not comparable between implementations whose launch costs differ
(ours 14 us vs mamba-ssm's 147 us at b=1 on an H100 were such different quantities): compare decode steps on the
``.graph`` column (device time per CUDA-graphed step) of ``python -m emma_mamba.bench.kernels_gpu``.

Usage: ``python benchmarks/gpu/triton_kernels.py [--out results.json] [--quick] [--cuda-only]``.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import triton
from triton.testing import do_bench

import emma_mamba.kernels as K
from emma_mamba.kernels import selective_scan as SS
from emma_mamba.kernels import state_update as SSU

BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy on the H100 of this workplace (read + write)


def ms(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def scan_inputs(b, d, n, l, dtype=torch.bfloat16):
    dev = "cuda"
    u = torch.randn(b, d, l, device=dev, dtype=dtype)
    delta = (0.5 * torch.rand(b, d, l, device=dev)).to(dtype)
    z = torch.randn(b, d, l, device=dev, dtype=dtype)
    A = -0.5 - torch.rand(d, n, device=dev)
    B = torch.randn(b, n, l, device=dev, dtype=dtype)
    C = torch.randn(b, n, l, device=dev, dtype=dtype)
    D = torch.randn(d, device=dev)
    bias = 0.5 * torch.rand(d, device=dev)
    return u, delta, A, B, C, D, z, bias


def bench_scan(results, b, d, n, l, configs, bwd_configs, fwd_only=False):
    u, delta, A, B, C, D, z, bias = scan_inputs(b, d, n, l)
    elt = u.element_size()
    floor_bytes = 4 * b * d * l * elt + 2 * b * n * l * elt  # u, delta, z read; out written; B, C read
    floor = floor_bytes / BANDWIDTH * 1e3
    results["scan_shape"] = dict(b=b, d=d, n=n, l=l, dtype="bfloat16")
    results["scan_fwd_floor_ms"] = floor
    print(f"selective scan b={b} d={d} n={n} L={l} bf16: memory floor {floor:.3f} ms")
    defaults = (SS.CHUNK, SS.FWD_BLOCK_D, SS.FWD_WARPS, SS.BWD_BLOCK_D, SS.BWD_WARPS)
    fwd = {}
    ref_out = None
    for chunk, block_d, warps in configs:
        SS.CHUNK, SS.FWD_BLOCK_D, SS.FWD_WARPS = chunk, block_d, warps
        try:
            out = K.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, None, None)[0]
            if ref_out is None:
                ref_out = out
            err = (out.float() - ref_out.float()).abs().max().item()
            t = ms(lambda: K.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, None, None))
        except Exception as e:  # a launch shape that does not compile (registers, shared memory)
            print(f"  fwd CHUNK={chunk} BLOCK_D={block_d} warps={warps}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        fwd[f"chunk{chunk}_bd{block_d}_w{warps}"] = t
        print(f"  triton fwd CHUNK={chunk:4d} BLOCK_D={block_d} warps={warps}: {t:.3f} ms ({floor / t:.0%} of "
              f"floor speed) max|diff| vs the default {err:.2e}")
    SS.CHUNK, SS.FWD_BLOCK_D, SS.FWD_WARPS, SS.BWD_BLOCK_D, SS.BWD_WARPS = defaults
    results["triton_scan_fwd_ms"] = fwd

    try:
        from emma_mamba import _C
        if getattr(_C, "with_cuda", False):
            out_c = _C.selective_scan_fwd_cuda(u, delta, A, B, C, D, z, bias, True, None, None)[0]
            out_t = K.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, None, None)[0]
            t = ms(lambda: _C.selective_scan_fwd_cuda(u, delta, A, B, C, D, z, bias, True, None, None))
            results["cuda_scan_fwd_ms"] = t
            diff = (out_c.float() - out_t.float()).abs().max().item()
            print(f"  our CUDA fwd: {t:.3f} ms (max|triton - cuda| {diff:.2e})")
        else:
            print("  our CUDA fwd: emma_mamba._C was built without CUDA")
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  our CUDA fwd: unavailable ({type(e).__name__}: {str(e)[:200]})")

    if fwd_only:
        return
    # backward (its CHUNK must be the forward's: the saved states are per chunk)
    dout = torch.randn_like(u)
    bwd = {}
    for chunk, block_d, warps in bwd_configs:
        SS.CHUNK, SS.BWD_BLOCK_D, SS.BWD_WARPS = chunk, block_d, warps
        saved = K.selective_scan_fwd(u, delta, A, B, C, D, z, bias, True, None, None)[2]
        for det in (False, True):
            try:
                t = ms(lambda: K.selective_scan_bwd(u, delta, A, B, C, D, z, bias, True, None, None, saved, dout,
                                                    None, det, False))
            except Exception as e:  # noqa: BLE001
                print(f"  bwd CHUNK={chunk} BLOCK_D={block_d} warps={warps}: failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            bwd[f"chunk{chunk}_bd{block_d}_w{warps}_det{int(det)}"] = t
            print(f"  triton bwd CHUNK={chunk:4d} BLOCK_D={block_d} warps={warps} deterministic={det}: {t:.3f} ms")
    SS.CHUNK, SS.FWD_BLOCK_D, SS.FWD_WARPS, SS.BWD_BLOCK_D, SS.BWD_WARPS = defaults
    results["triton_scan_bwd_ms"] = bwd


def bench_decode(results, d, n, batches, tiles):
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as peer
    except Exception as e:  # noqa: BLE001
        peer = None
        print(f"mamba-ssm selective_state_update not importable ({type(e).__name__}: {e})")
    dev = "cuda"
    out = {}
    for b in batches:
        state = torch.randn(b, d, n, device=dev)
        x, dt, z = (torch.randn(b, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        A = -torch.rand(d, n, device=dev)
        B, C = (torch.randn(b, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
        D, dtb = torch.randn(d, device=dev), torch.rand(d, device=dev)
        row = {}
        s1, s2 = state.clone(), state.clone()
        y1 = K.selective_state_update(s1, x, dt, A, B, C, D, z, dtb, True)
        default_tile = SSU.TILE
        for tile in tiles:
            SSU.TILE = tile
            row[f"triton_tile{tile}_us"] = 1e3 * ms(lambda: K.selective_state_update(state, x, dt, A, B, C, D, z,
                                                                                     dtb, True))
        SSU.TILE = default_tile
        if peer is not None:
            y2 = peer(s2, x, dt, A, B, C, D, z, dtb, True)
            row["max_abs_diff_vs_mamba_ssm"] = (y1.float() - y2.float()).abs().max().item()
            row["mamba_ssm_triton_us"] = 1e3 * ms(lambda: peer(state, x, dt, A, B, C, D, z, dtb, True))
        out[f"b{b}"] = row
        print(f"decode b={b} d={d} n={n}: " + ", ".join(f"{k}={v:.3g}" for k, v in row.items()))
    results["decode"] = out


def bench_conv(results, b, d, l):
    x = torch.randn(b, d, l, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d, 4, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    t = ms(lambda: K.causal_conv1d_fwd(x, w, bias, None, None, True))
    floor = 2 * x.numel() * x.element_size() / BANDWIDTH * 1e3
    results["conv_fwd_ms"] = t
    results["conv_fwd_floor_ms"] = floor
    print(f"causal conv1d fwd b={b} d={d} L={l} w=4 bf16: {t:.3f} ms (floor {floor:.3f} ms)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="only the default launch shapes")
    p.add_argument("--cuda-only", action="store_true",
                   help="only the scan forward: the default triton launch shapes and the compiled CUDA backend")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu/triton_kernels.py needs a CUDA GPU")
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version(),
                   defaults=dict(CHUNK=SS.CHUNK, FWD_BLOCK_D=SS.FWD_BLOCK_D, FWD_WARPS=SS.FWD_WARPS,
                                 BWD_BLOCK_D=SS.BWD_BLOCK_D, BWD_WARPS=SS.BWD_WARPS, decode_TILE=SSU.TILE))
    print(results)
    configs = [(SS.CHUNK, SS.FWD_BLOCK_D, SS.FWD_WARPS)]
    bwd_configs = [(SS.CHUNK, SS.BWD_BLOCK_D, SS.BWD_WARPS)]
    if not (args.quick or args.cuda_only):
        configs += [(128, 4, 4), (128, 8, 4), (256, 2, 2), (512, 4, 4), (256, 8, 8), (512, 8, 8), (128, 2, 2)]
        bwd_configs += [(128, 4, 4), (128, 2, 2)]
    bench_scan(results, 8, 5120, 16, 2048, configs, bwd_configs, fwd_only=args.cuda_only)
    if args.cuda_only:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        return
    bench_decode(results, 5120, 16, (1, 16, 64), (1024,) if args.quick else (512, 1024))
    bench_conv(results, 8, 5120, 2048)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
