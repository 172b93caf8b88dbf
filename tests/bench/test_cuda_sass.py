"""benchmarks/cuda_sass.py's readers, on ptxas and cuobjdump text written by hand: per-kernel registers and spill
bytes, each kernel's instructions, the loops that run MUFU/SHFL with the spill instructions inside them counted
by hand, the short kernel names; and the build flags it takes from a build.ninja."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "cuda_sass", Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_sass.py")
cuda_sass = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_sass)

K1 = "_ZN4emma4cuda50_GLOBAL__N__762a6542_17_selective_scan_cu_875f74f415scan_fwd_kernelIN3c108BFloat16EfEEvNS1_10ScanParamsE"
K2 = "_ZN4emma4cuda48_GLOBAL__N__3d3548c1_15_state_update_cu_fc6175c419state_update_kernelENS1_10StepParamsE"

PTXAS = f"""ptxas info    : Compiling entry function '{K1}' for 'sm_90'
ptxas info    : Function properties for {K1}
    80 bytes stack frame, 156 bytes spill stores, 80 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers, 80 bytes cumulative stack size
ptxas info    : Compiling entry function '{K2}' for 'sm_90'
ptxas info    : Function properties for {K2}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 62 registers, used 0 barriers
"""

SASS = f"""
	code for sm_90
		Function : {K1}
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   STL [R1+0x8], R26 ;                   /* 0x0000081a01007387 */
        /*0020*/                   MUFU.EX2 R3, R4 ;                     /* 0x0000000400037308 */
        /*0030*/                   SHFL.UP PT, R5, R3, 0x1, RZ ;          /* 0x0420000003057989 */
        /*0040*/              @!P0 BRA 0x20 ;                            /* 0xfffffffc00d08947 */
        /*0050*/                   LDL R36, [R1+0x8] ;                   /* 0x0000080001247983 */
        /*0060*/               @P1 STL [R1+0xc], R2 ;                    /* 0x00000c0201007387 */
        /*0070*/                   BRA 0x10 ;                            /* 0x0000000000687947 */
        /*0080*/                   EXIT ;                                /* 0x000000000000794d */
        /*0090*/                   BRA 0x90 ;                            /* 0xfffffffc00fc7947 */
		Function : {K2}
        /*0000*/                   FADD R1, R2, R3 ;                     /* 0x0000000300017221 */
        /*0010*/                   BRA 0x0 ;                             /* 0x0000000000007947 */
"""


def test_ptxas_report_and_sass_loops_by_hand():
    r = cuda_sass.ptxas_report(PTXAS)
    assert r[K1] == {"stack_bytes": 80, "spill_store_bytes": 156, "spill_load_bytes": 80, "registers": 128}
    assert r[K2]["registers"] == 62 and r[K2]["spill_store_bytes"] == 0
    funcs = cuda_sass.sass_functions(SASS)
    assert [a for a, _ in funcs[K1]] == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90]
    assert funcs[K1][1][1] == "STL [R1+0x8], R26"
    # K1: an inner loop 0x20-0x40 (MUFU + SHFL, no spill) inside an outer one 0x10-0x70 (the STL at 0x10, the
    # LDL at 0x50 and the predicated STL at 0x60: 3); the self-loop at 0x90 runs no MUFU/SHFL and is not listed
    assert cuda_sass.loops(funcs[K1]) == [
        {"start": "0x20", "end": "0x40", "instructions": 3, "mufu_shfl": 2, "spill_instructions": 0},
        {"start": "0x10", "end": "0x70", "instructions": 7, "mufu_shfl": 2, "spill_instructions": 3}]
    assert cuda_sass.loops(funcs[K2]) == []  # a loop, but no scan arithmetic in it


def test_short_kernel_names():
    assert cuda_sass.demangle_short(K1) == "scan_fwd_kernel<bf16, fp32>"
    assert cuda_sass.demangle_short(K1.replace("IN3c108BFloat16EfEEv", "IN3c104HalfES4_EEv")) == \
        "scan_fwd_kernel<fp16, fp16>"
    assert cuda_sass.demangle_short(K2) == "state_update_kernel"
    assert cuda_sass.demangle_short("_Z3foov") == "_Z3foov"
    # the scan kernels' bool: the instance for packed sequences (seq_idx) is named so, the other as before
    assert cuda_sass.demangle_short(K1.replace("IN3c108BFloat16EfEEv", "IN3c108BFloat16ES4_Lb1EEEv")) == \
        "scan_fwd_kernel<bf16, bf16, packed>"
    assert cuda_sass.demangle_short(K1.replace("IN3c108BFloat16EfEEv", "IN3c108BFloat16EfLb0EEEv")) == \
        "scan_fwd_kernel<bf16, fp32>"


def test_build_flags_come_from_build_ninja(tmp_path):
    tmp = tmp_path / "build" / "temp.linux-x86_64-cpython-311"
    tmp.mkdir(parents=True)
    (tmp / "build.ninja").write_text(
        "cuda_cflags = -I/t/include -I/usr/local/cuda/include -c\n"
        "cuda_post_cflags = -DX --compiler-options ''\"'\"'-fPIC'\"'\"'' -O3 --threads 2 "
        "-gencode arch=compute_90,code=sm_90 -DTORCH_EXTENSION_NAME=_C\n")
    assert cuda_sass.build_flags(tmp_path) == ["-I/t/include", "-I/usr/local/cuda/include", "-DX", "-O3",
                                               "-DTORCH_EXTENSION_NAME=_C"]
    try:
        cuda_sass.build_flags(tmp_path / "nowhere")
    except FileNotFoundError as e:
        assert "setup.py build_ext" in str(e)
    else:
        raise AssertionError("no build.ninja must be an error naming the build command")
