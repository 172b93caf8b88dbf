"""What the Triton scan kernels compile to on sm_90: registers, shared memory, and the instruction mix of each loop.

    python benchmarks/triton_sass.py [--out FILE]        # no GPU needed; TRITON_INTERPRET must be unset

Each kernel goes through Triton's whole pipeline for sm_90 (as tests/ops/test_triton_compile.py does) with the
launch the host code makes at mamba-2.8b's shapes (b=8, d=5120, n=16, L=2048; bf16 u/delta/z/B/C as the mixer
passes them, D, delta_bias and softplus on, variable B and C, no initial state or seq_idx), including the
specialisations a real launch gets (Triton marks each pointer and each integer argument divisible by 16 as such,
which decides the tiles' layouts and vector widths: compiled without them, the forward's (channel, time) tiles get
one step per thread instead of eight). The cubin is disassembled with ``cuobjdump`` (the toolkit's or the copy in
Triton's wheel) and every loop that runs scan arithmetic (MUFU or SHFL) is reported with its instruction mix:
BAR (block barriers: each one waits for every warp of the program), LDS/STS (shared memory: Triton's layout
conversions go through it), SHFL, MUFU, global loads and stores, and the instructions per (step, state) element
its iteration handles. Static code only, nothing is timed: it says where time can go, a GPU says where it goes.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import add_out, machine, parse_args, run_script, write_result  # noqa: E402

_spec = importlib.util.spec_from_file_location("cuda_sass", ROOT / "benchmarks" / "cuda_sass.py")
cuda_sass = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_sass)

# mamba-2.8b's scan at L=2048: the integer arguments the host passes (their divisibility by 16 is what a launch
# specialises on) and the flags the mixer sets
SHAPE = dict(batch=8, dim=5120, dstate=16, seqlen=2048)
FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_DBIAS=True, SOFTPLUS=True, HAS_H0=False, HAS_SEQ=False, B_VAR=True,
             C_VAR=True, HAS_DLAST=False, ATOMIC_BC=True, HAS_OUT=False)
FP32_PTRS = {"A_ptr", "D_ptr", "dbias_ptr", "dtb_ptr", "h0_ptr", "last_ptr", "saved_ptr", "dlast_ptr", "dA_ptr",
             "dB_ptr", "dC_ptr", "dD_ptr", "ddbias_ptr", "dh0_ptr", "g_ptr", "ck_ptr"}
OPS = ("BAR", "LDS", "STS", "SHFL", "MUFU", "LDG", "STG", "FFMA", "FMUL", "FADD", "FSEL")


def int_args(chunk: int) -> dict:
    d, n, l = SHAPE["dim"], SHAPE["dstate"], SHAPE["seqlen"]
    return dict(dim=d, seqlen=l, dstate=n, nchunks=-(-l // chunk), cpg_B=d, cpg_C=d, sB_b=n * l, sB_g=0,
                sC_b=n * l, sC_g=0, sdB_b=n * l, sdB_g=0, sdC_b=n * l, sdC_g=0,  # dB, dC: fp32 (b, n, l)
                sz_b=2 * d * l, sz_d=l)  # z: a view of in_proj's (b, 2d, l) output


def cases() -> list[tuple]:
    """(name, JITFunction, constexprs, num_warps, (step, state) elements per thread per innermost iteration)."""
    from emma_mamba.kernels import selective_scan as ss

    def per_thread(*sizes, warps):
        out = 1
        for s in sizes:
            out *= s
        return out / (32 * warps)

    n = 16
    return [
        ("scan_fwd_chunked", ss._selective_scan_fwd_kernel, dict(BLOCK_D=ss.FWD_BLOCK_D, BLOCK_N=n, CHUNK=ss.CHUNK),
         ss.FWD_WARPS, per_thread(ss.FWD_BLOCK_D, ss.CHUNK, warps=ss.FWD_WARPS)),
        ("scan_fwd_sequential", ss._selective_scan_fwd_seq_kernel,
         dict(BLOCK_D=ss.SEQ_BLOCK_D, BLOCK_N=n, CHUNK=ss.CHUNK), ss.SEQ_WARPS,
         per_thread(ss.SEQ_BLOCK_D, n, warps=ss.SEQ_WARPS)),
        ("scan_bwd_chunked", ss._selective_scan_bwd_kernel,
         dict(BLOCK_D=ss.BWD_BLOCK_D, BLOCK_N=n, CHUNK=ss.CHUNK, ROW_ATOMICS=ss.BWD_ROW_ATOMICS),
         ss.BWD_WARPS, per_thread(ss.BWD_BLOCK_D, ss.CHUNK, warps=ss.BWD_WARPS)),
    ]


def compile_sm90(kernel, constexprs: dict, num_warps: int, chunk: int):
    """The kernel as a launch at SHAPE compiles it for sm_90 (bf16 data, fp32 parameters and states)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = int_args(chunk)
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = constexprs[p.name] if p.name in constexprs else FLAGS[p.name]
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = "*i32" if p.name == "seq_ptr" else "*fp32" if p.name in FP32_PTRS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        else:
            sig[p.name] = "i32"
            if ints[p.name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def loop_mixes(instrs: list[tuple[int, str]], per_iteration: float) -> list[dict]:
    """cuda_sass.loops() with each loop's instruction mix, innermost (smallest) first."""
    out = []
    for loop in cuda_sass.loops(instrs):
        lo, hi = int(loop["start"], 16), int(loop["end"], 16)
        mix = collections.Counter(opcode(t) for a, t in instrs if lo <= a <= hi)
        out.append({**loop, "mix": {k: mix.get(k, 0) for k in OPS}})
    if out:
        out[0]["instructions_per_element"] = round(out[0]["instructions"] / per_iteration, 2)
    return out


def resources(cubin: Path) -> dict:
    """Registers, shared and local (spill) bytes per thread, from ``cuobjdump -res-usage``."""
    text = subprocess.run([cuda_sass.find_tool("cuobjdump", "nvcc"), "-res-usage", str(cubin)],
                          capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", text)
    return {} if m is None else dict(zip(("registers", "shared_bytes", "local_bytes"), map(int, m.groups())))


def inspect(name, kernel, constexprs, num_warps, per_iteration) -> dict:
    compiled = compile_sm90(kernel, constexprs, num_warps, constexprs["CHUNK"])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([cuda_sass.find_tool("cuobjdump", "nvcc"), "-sass", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        res = resources(cubin)
    instrs = [x for f in cuda_sass.sass_functions(sass).values() for x in f]
    return {"kernel": name, "num_warps": num_warps, **{k: v for k, v in constexprs.items()}, **res,
            "instructions": len(instrs), "elements_per_thread_iteration": per_iteration,
            "spill_instructions": sum(bool(cuda_sass.SPILL.match(t)) for _, t in instrs),
            "hot_loops": loop_mixes(instrs, per_iteration)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="+", default=None, help="a subset of the kernels (default: all)")
    add_out(p, None, "write the report as JSON here")
    args = parse_args(p, argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_sass: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("triton_sass: triton is not installed", file=sys.stderr)
        return 2
    chosen = [c for c in cases() if args.kernels is None or c[0] in args.kernels]
    if args.kernels and len(chosen) != len(set(args.kernels)):
        print(f"triton_sass: --kernels: known are {', '.join(c[0] for c in cases())}", file=sys.stderr)
        return 2
    results = [inspect(*c) for c in chosen]
    print(f"sm_90, triton {triton.__version__}, {SHAPE}, bf16; innermost loop first")
    print(f"  {'kernel':22} {'regs':>4} {'smem B':>6} {'local B':>7}  loop: instructions (per element) "
          + " ".join(OPS[:6]))
    for r in results:
        for i, loop in enumerate(r["hot_loops"]):
            head = (f"  {r['kernel']:22} {r.get('registers', '?'):>4} {r.get('shared_bytes', '?'):>6} "
                    f"{r.get('local_bytes', '?'):>7}" if i == 0 else " " * 46)
            per = f" ({loop['instructions_per_element']})" if "instructions_per_element" in loop else ""
            print(f"{head}  {loop['instructions']}{per} " + " ".join(str(loop["mix"][k]) for k in OPS[:6]))
    write_result({"benchmark": "triton_sass", "arch": "sm_90", "triton": triton.__version__, "shape": SHAPE,
                  "dtype": "bf16", "flags": FLAGS, "machine": machine(None, None), "results": results},
                 args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
