"""Mutation round 4 of the `triton` backend's scan (its decode steps: test_mutation4_decode_steps.py): seq_idx ids
are only compared between neighbouring steps, so a row may well start with sequence 3 (e.g. when the ids continue
from the previous row of a packed batch). Step 0 never restarts the state, so the initial state still feeds the
row's first sequence and gets its gradient from it, in both forwards (chunked and sequential) and both backwards.
The other seq_idx rows of the tests all start at 0. Oracle: the fp32 reference scan (emma_mamba.ops.reference) with
autograd."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (as tests/conftest.py does)

pytest.importorskip("triton")

import emma_mamba.kernels as K  # noqa: E402
from emma_mamba import ops  # noqa: E402

from .tolerances import check_scan  # noqa: E402

DEVICE = "cpu" if not torch.cuda.is_available() else "cuda"


@pytest.fixture(autouse=True)
def _needs_triton():
    if not ops._runs_on("triton", DEVICE):
        pytest.skip("the Triton interpreter is off")


def _scan_inputs(b=2, d=4, n=4, l=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    seq = torch.full((b, l), 3, dtype=torch.int32)
    seq[0, 7:] = 4  # row 0: sequences 3 then 4
    seq[1, :] = 9   # row 1: one sequence, id 9
    return dict(u=r(b, d, l), delta=0.5 * torch.rand(b, d, l, generator=gen), A=-0.5 - torch.rand(d, n, generator=gen),
                B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=0.5 * torch.rand(d, generator=gen),
                initial_state=r(b, d, n), seq_idx=seq)


@pytest.mark.parametrize("fwd,bwd", [("chunked", "chunked"), ("sequential", "sequential")])
def test_a_row_whose_first_sequence_id_is_not_zero(fwd, bwd, monkeypatch):
    monkeypatch.setattr(K.selective_scan, "FWD_IMPL", fwd)
    monkeypatch.setattr(K.selective_scan, "BWD_IMPL", bwd)
    check_scan(_scan_inputs(), "triton", DEVICE, True, True)
