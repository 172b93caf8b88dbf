"""benchmarks/triton_sass.py on the real compiler: the Triton scan kernels' hot loops, compiled for sm_90 as a
mamba-2.8b launch compiles them, hold no block barrier and no shared-memory access.

The chunked forward's loop over states held four barriers and two shared-memory round trips per state index per
chunk: a variable B / C row loaded as a (1, T) tile got a layout of its own and was converted to the scan tiles'
layout through shared memory, and the carried (channel, state) tile's column was pulled out and written back the same
way. Every barrier waits for all warps of the program, 16 times per chunk. The chunked backward's loop over states
held 34 (B / C rows and the state entering the chunk converted as in the forward, dB / dC summed over the block's
channels across its warps and converted to the atomics' layout) plus a first pass over the states to recompute y
with 10 more, and 202 shuffles (Triton's reverse scan reverses each input and its output across the lanes, 5
shuffles per element each). The sequential forward's step converted y_t to its store's layout through shared memory
(2 barriers per step). The oracle is the disassembler (cuobjdump on the cubin Triton builds); the loops are found as
cuda_sass finds the CUDA kernels' (tests/bench/test_cuda_sass.py checks that on hand-written SASS). Also checked:
the report's per-element figure is the loop's size over the elements each thread handles per iteration (BLOCK_D x
CHUNK over the program's threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def _has_ptxas() -> bool:
    import triton.backends.nvidia as nv

    return os.path.isfile(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


needs_ptxas = pytest.mark.skipif(not _has_ptxas(), reason="this triton wheel has no NVIDIA backend (ptxas)")


def _report(tmp_path, kernel: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "sass.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_sass.py"), "--kernels", kernel,
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (k,) = json.loads(out.read_text())["results"]
    assert k["local_bytes"] == 0 and k["spill_instructions"] == 0  # no register spills
    return k


def _no_barrier_or_shared_memory(loop):
    assert loop["mix"]["BAR"] == loop["mix"]["LDS"] == loop["mix"]["STS"] == 0, loop


@needs_ptxas
def test_the_chunked_forward_state_loop_has_no_barrier_or_shared_memory(tmp_path):
    k = _report(tmp_path, "scan_fwd_chunked")
    from emma_mamba.kernels import selective_scan as ss

    assert k["elements_per_thread_iteration"] == ss.FWD_BLOCK_D * ss.CHUNK / (32 * ss.FWD_WARPS)
    inner = k["hot_loops"][0]  # innermost: the loop over states
    assert inner["mix"]["MUFU"] >= k["elements_per_thread_iteration"]  # one exp2 per element: the scan's loop
    _no_barrier_or_shared_memory(inner)
    # the shuffles are the warp scan's own, 2 values x 5 levels: the chunk-end state is stored by the thread that
    # holds it, not fetched by a reduction over the lanes
    assert inner["mix"]["SHFL"] <= 10, inner
    assert inner["instructions_per_element"] == round(inner["instructions"] / k["elements_per_thread_iteration"], 2)


@needs_ptxas
def test_the_chunked_backward_loops_have_no_barrier_or_shared_memory(tmp_path):
    k = _report(tmp_path, "scan_bwd_chunked")
    from emma_mamba.kernels import selective_scan as ss

    assert k["elements_per_thread_iteration"] == ss.BWD_BLOCK_D * ss.CHUNK / (32 * ss.BWD_WARPS)
    # one loop over the states inside the loop over chunks (y, for dz, is summed there: no first pass)
    assert len(k["hot_loops"]) == 2, k["hot_loops"]
    inner, chunks = k["hot_loops"]
    assert inner["mix"]["MUFU"] >= 2 * k["elements_per_thread_iteration"]  # a_t and a_{t+1} per element
    _no_barrier_or_shared_memory(inner)
    _no_barrier_or_shared_memory(chunks)
    # the two scans' warp steps, the two reversals, the one-step shift and the sums over steps (was 202)
    assert inner["mix"]["SHFL"] <= 40, inner


@needs_ptxas
def test_the_sequential_forward_step_has_no_barrier_or_shared_memory(tmp_path):
    k = _report(tmp_path, "scan_fwd_sequential")
    inner = k["hot_loops"][0]  # innermost: the loop over steps
    assert inner["mix"]["MUFU"] >= k["elements_per_thread_iteration"]  # one exp2 per (step, state) element
    _no_barrier_or_shared_memory(inner)
