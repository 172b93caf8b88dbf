"""The CUDA kernels' softplus (csrc/cuda/common.cuh softplus_f, used by the scan forwards and both backwards) over the raw time steps a trained Mamba produces, not only the ~[-0.1, 0.9] of the other tests: dt_bias
is initialised to softplus^-1 of [1e-3, 0.1] (about -7 to -2.3), and large positive steps (2 .. 20, where
softplus(x) - x is still 0.13 .. 2e-9, and past the kernels' x > 20 shortcut) occur. Mutation testing found that
moving the shortcut's threshold from 20 down to 2 passed every test of test_cuda_backend.py (only a mamba_inner
test caught it, through the scan; the decode step's: test_mutation4_decode_steps.py).
Oracle: the fp32 reference ops (torch backend, F.softplus) on the same tensors, under the emulator (backend
``cuda-emu``)."""

import pytest
import torch

from .test_cuda_backend import EMU, _ready, _scan_inputs
from .tolerances import check_scan


@pytest.fixture
def emu():
    return _ready(EMU)  # builds the emulator once; a build error fails here


def _wide_delta(b, d, l, gen):
    """Raw steps spread over [-8, 24] (bias added on top): every regime of softplus."""
    return torch.linspace(-8.0, 24.0, b * d * l)[torch.randperm(b * d * l, generator=gen)].view(b, d, l)


@pytest.mark.parametrize("impl", ["warp", "seq"])
def test_scan_softplus_over_the_whole_range(emu, impl, monkeypatch):
    """Forward and backward (both backward kernels: the seq one takes softplus' derivative from dt itself) with
    raw steps from -8 to 24 against the reference."""
    monkeypatch.setenv("EMMA_CUDA_SCAN_FWD", impl)
    monkeypatch.setenv("EMMA_CUDA_SCAN_BWD", impl)
    gen = torch.Generator().manual_seed(7)
    x = _scan_inputs(emu, 1, 4, 8, 96, torch.float32, seq=False)
    x["delta"] = _wide_delta(1, 4, 96, gen)
    x["delta_bias"] = torch.tensor([-4.0, 0.0, 1.5, 3.0])
    check_scan(x, emu.backend, emu.dev, softplus=True, last_grad=True)
