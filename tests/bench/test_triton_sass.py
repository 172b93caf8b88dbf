"""benchmarks/triton_sass.py on the real compiler: the Triton chunked forward's loop over states, compiled for sm_90
as a mamba-2.8b launch compiles it, holds no block barrier and no shared-memory access.

It held four barriers and two shared-memory round trips per state index per chunk: a variable B / C row loaded as a
(1, T) tile got a layout of its own and was converted to the scan tiles' layout through shared memory, and the
carried (channel, state) tile's column was pulled out and written back the same way. Every barrier waits for all
eight warps of the program, 16 times per chunk. The oracle is the disassembler (cuobjdump on the cubin Triton
builds); the loop is found as cuda_sass finds the CUDA kernels' (tests/bench/test_cuda_sass.py checks that on
hand-written SASS). Also checked: the report's per-element figure is the loop's size over the elements each
thread handles per iteration (BLOCK_D x CHUNK over the program's threads)."""

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


@pytest.mark.skipif(not _has_ptxas(), reason="this triton wheel has no NVIDIA backend (ptxas)")
def test_the_chunked_forward_state_loop_has_no_barrier_or_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "sass.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_sass.py"), "--kernels", "scan_fwd_chunked",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (k,) = json.loads(out.read_text())["results"]
    from emma_mamba.kernels import selective_scan as ss

    assert k["elements_per_thread_iteration"] == ss.FWD_BLOCK_D * ss.CHUNK / (32 * ss.FWD_WARPS)
    inner = k["hot_loops"][0]  # innermost: the loop over states
    assert inner["mix"]["MUFU"] >= k["elements_per_thread_iteration"]  # one exp2 per element: the scan's loop
    assert inner["mix"]["BAR"] == inner["mix"]["LDS"] == inner["mix"]["STS"] == 0, inner
    assert inner["instructions_per_element"] == round(inner["instructions"] / k["elements_per_thread_iteration"], 2)
    assert k["local_bytes"] == 0 and k["spill_instructions"] == 0  # no register spills
