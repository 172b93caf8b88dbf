"""Every Triton kernel compiles for a GPU, on this machine without one.

The interpreter tests (test_triton_backend.py) run the kernels' Python on the CPU: they check the arithmetic but
never the compiler, so a construct Triton cannot lower (a type mismatch, a dynamic index into a register
tile, an unsupported op) would land unnoticed, as a CUDA kernel that does not compile would without nvcc in
CI. Here each kernel goes through Triton's whole pipeline (ttir, ttgir, LLVM IR, PTX, cubin via the wheel's
ptxas) for sm_90 with the launch parameters the host code uses, once with every optional input on in bf16 and
once with every one off in fp32. Oracle: the compiler itself (an error fails the test); the cubin must exist.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# pointers whose data is fp32 whatever the input dtype (parameters, states, partial sums) or int32
FP32_PTRS = {"A_ptr", "D_ptr", "dbias_ptr", "dtb_ptr", "h0_ptr", "last_ptr", "saved_ptr", "dlast_ptr", "dA_ptr",
             "dB_ptr", "dC_ptr", "dD_ptr", "ddbias_ptr", "dh0_ptr", "dw_part_ptr", "db_part_ptr", "g_ptr",
             "ck_ptr"}
I32_PTRS = {"seq_ptr"}
TARGET = GPUTarget("cuda", 90, 32)


def _kernels():
    """(id, JITFunction, integer constexprs as the host code launches them, num_warps)."""
    from emma_mamba.kernels import causal_conv1d as conv
    from emma_mamba.kernels import selective_scan as ss
    from emma_mamba.kernels import state_update as su

    scan = dict(BLOCK_N=16, CHUNK=ss.CHUNK)
    out = [
        ("scan_fwd_chunked", ss._selective_scan_fwd_kernel, dict(scan, BLOCK_D=ss.FWD_BLOCK_D), ss.FWD_WARPS),
        ("scan_fwd_sequential", ss._selective_scan_fwd_seq_kernel, dict(scan, BLOCK_D=ss.SEQ_BLOCK_D),
         ss.SEQ_WARPS),
        ("scan_bwd", ss._selective_scan_bwd_kernel, dict(scan, BLOCK_D=ss.BWD_BLOCK_D), ss.BWD_WARPS),
        ("state_update", su._selective_state_update_kernel, dict(BLOCK_D=su.TILE // 16, BLOCK_N=16), su.WARPS),
        ("conv_fwd", conv._conv_fwd_kernel, dict(WIDTH=4, BLOCK_D=conv.BLOCK_D, BLOCK_L=conv.BLOCK_L), conv.WARPS),
        ("conv_bwd_g", conv._conv_bwd_g_kernel, dict(WIDTH=4, BLOCK_D=conv.BLOCK_D, BLOCK_L=conv.BLOCK_L),
         conv.WARPS),
        ("conv_bwd_dx", conv._conv_bwd_dx_kernel, dict(WIDTH=4, BLOCK_D=conv.BLOCK_D, BLOCK_L=conv.BLOCK_L),
         conv.WARPS),
        ("conv_update", conv._conv_update_kernel, dict(WIDTH=4, BLOCK_W=4, BLOCK_D=conv.BLOCK_D), conv.WARPS),
    ]
    if hasattr(ss, "_selective_scan_bwd_seq_kernel"):
        out.append(("scan_bwd_sequential", ss._selective_scan_bwd_seq_kernel,
                    dict(BLOCK_N=16, CHUNK=ss.CHUNK, BLOCK_D=ss.SEQ_BWD_BLOCK_D, TILE=ss.SEQ_BWD_TILE),
                    ss.SEQ_BWD_WARPS))
    # a Mamba-2 layer's shapes (lm.ssm_layer mamba2): 128 states per channel, the tiles 8x wider
    n128 = dict(BLOCK_N=128, CHUNK=ss.CHUNK)
    out += [
        ("scan_fwd_chunked_n128", ss._selective_scan_fwd_kernel, dict(n128, BLOCK_D=ss.FWD_BLOCK_D), ss.FWD_WARPS),
        ("scan_fwd_sequential_n128", ss._selective_scan_fwd_seq_kernel, dict(n128, BLOCK_D=ss.SEQ_BLOCK_D),
         ss.SEQ_WARPS),
        ("scan_bwd_n128", ss._selective_scan_bwd_kernel, dict(n128, BLOCK_D=ss.BWD_BLOCK_D), ss.BWD_WARPS),
        ("state_update_n128", su._selective_state_update_kernel, dict(BLOCK_D=su.TILE // 128, BLOCK_N=128),
         su.WARPS),
    ]
    return out


def compile_for_gpu(kernel, ints: dict, flags: bool, dtype: str, num_warps: int):
    """Triton's full pipeline for sm_90 without a GPU: boolean constexprs all ``flags``, data pointers
    ``dtype``; returns the compiled kernel (its ``asm`` holds ttir ... cubin)."""
    sig, constexprs = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = ints[p.name] if p.name in ints else flags
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*i32" if p.name in I32_PTRS else "*fp32" if p.name in FP32_PTRS else f"*{dtype}"
        else:
            sig[p.name] = "i32"
    missing = [k for k in ints if k not in constexprs]
    assert not missing, f"{kernel.fn.__name__} has no constexpr {missing}"
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=TARGET,
                          options={"num_warps": num_warps})


def _has_ptxas() -> bool:
    import triton.backends.nvidia as nv

    return os.path.isfile(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


VARIANTS = {"all-on-bf16": (True, "bf16"), "all-off-fp32": (False, "fp32")}


def compile_all() -> dict:
    """{kernel/variant: "ok" or the error}; must run where TRITON_INTERPRET is off (@triton.jit then builds
    compilable functions; nothing is launched, so no GPU or driver is needed)."""
    results = {}
    for name, kernel, ints, warps in _kernels():
        for variant, (flags, dtype) in VARIANTS.items():
            try:
                ck = compile_for_gpu(kernel, ints, flags, dtype, warps)
                ok = bool(ck.asm.get("cubin")) and ".target sm_90" in ck.asm["ptx"]
                results[f"{name}/{variant}"] = "ok" if ok else "no sm_90 cubin"
            except Exception as e:  # noqa: BLE001 - reported per kernel by the test
                results[f"{name}/{variant}"] = f"{type(e).__name__}: {str(e)[-1500:]}"
    return results


@pytest.fixture(scope="module")
def compiled():
    """compile_all() in a child process without TRITON_INTERPRET (this suite sets it when no GPU exists)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_DEFAULT_FP_FUSION="1")  # fusion: today's default, stated
    code = "import json; from tests.ops.test_triton_compile import compile_all; print('RESULTS', json.dumps(compile_all()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULTS ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.skipif(not _has_ptxas(), reason="this triton wheel has no NVIDIA backend (ptxas)")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", [k[0] for k in _kernels()])
def test_triton_kernel_compiles_for_sm90(compiled, name, variant):
    assert compiled[f"{name}/{variant}"] == "ok", compiled[f"{name}/{variant}"]
