"""selective_state_update (csrc/cuda/state_update.cu) with a low-precision state: the state is stored rounded to
its dtype, but the step's output uses the unrounded new state, as the reference does. The shared checks compare
the output at the state dtype's tolerance (bf16: 3e-2), which let a kernel that computes y from the rounded
(re-read) state pass; here x is fp32 and the output is held to fp32 accuracy. Oracle: the fp32 reference step
(emma_mamba.ops.reference), under the emulator (backend ``cuda-emu``)."""

import pytest
import torch

from emma_mamba import ops
from emma_mamba.ops.reference import selective_state_update_ref

from .test_cuda_backend import EMU, _ready
from .tolerances import TOL


@pytest.fixture
def emu():
    return _ready(EMU)  # builds the emulator once; a build error fails here


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [16, 7])
def test_output_uses_the_unrounded_state(emu, state_dtype, n):
    gen = torch.Generator().manual_seed(5)
    b, d = 2, 8
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    state = r(b, d, n).to(state_dtype)
    want_state = state.clone()
    x, z, B, C, D = r(b, d), r(b, d), r(b, n), r(b, n), r(d)
    dt, dt_bias = torch.rand(b, d, generator=gen), torch.rand(d, generator=gen)
    A = -0.5 - torch.rand(d, n, generator=gen)
    want = selective_state_update_ref(want_state, x, dt, A, B, C, D, z, dt_bias, True)
    with ops.use_backend(emu.backend):
        got = ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 output: fp32 accuracy
    torch.testing.assert_close(state, want_state, rtol=TOL[state_dtype][0], atol=TOL[state_dtype][1])
