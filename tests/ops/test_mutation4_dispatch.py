"""Mutation round 4 (the op layer's dispatch): the backend order per device, which forcing wins, and how the
``deterministic`` default reaches the kernels. The rules are the module docstring's and
:func:`emma_mamba.ops.forced_backend`'s; the kernels' availability is faked through ops' own load cache, so the
checks hold on any machine (no GPU needed, nothing compiled)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from emma_mamba import ops


@pytest.fixture
def dispatch(monkeypatch):
    """ops' selection state emptied for the test (restored after it), nothing forced: returns
    (kernel cache, unavailable reasons, per-device choice), the dicts ops reads."""
    cache, unavailable, default = {}, {}, {}
    monkeypatch.setattr(ops, "_kernel_cache", cache)
    monkeypatch.setattr(ops, "_unavailable", unavailable)
    monkeypatch.setattr(ops, "_default", default)
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.setattr(ops._forced_local, "name", None, raising=False)
    monkeypatch.delenv("EMMA_MAMBA_BACKEND", raising=False)
    return cache, unavailable, default


def test_backend_order_per_device_type(dispatch):
    """CUDA tensors run on cuda, else triton, else torch; CPU tensors on cpu, else torch (first available,
    chosen once per device type)."""
    cache, unavailable, default = dispatch
    cache.update(cuda=object(), triton=object(), cpu=object())
    assert ops.get_backend("cuda") == "cuda" and ops.get_backend("cpu") == "cpu"
    default.clear()
    del cache["cuda"]
    unavailable["cuda"] = "not built here"
    assert ops.get_backend("cuda") == "triton"
    default.clear()
    del cache["triton"], cache["cpu"]
    unavailable.update(triton="no triton", cpu="not built here")
    assert ops.get_backend("cuda") == "torch" and ops.get_backend("cpu") == "torch"


def test_use_backend_beats_set_backend_beats_the_environment(dispatch, monkeypatch):
    """forced_backend's order: use_backend (this thread), else set_backend, else EMMA_MAMBA_BACKEND."""
    cache, _, _ = dispatch
    cache.update(cpu=object())
    monkeypatch.setenv("EMMA_MAMBA_BACKEND", "torch")
    assert ops.get_backend("cpu") == "torch"
    assert ops.forced_backend() == ("torch", "EMMA_MAMBA_BACKEND=torch")
    try:
        ops.set_backend("cpu")
        assert ops.get_backend("cpu") == "cpu"
        with ops.use_backend("torch"):
            assert ops.get_backend("cpu") == "torch"
            assert ops.forced_backend() == ("torch", "ops.use_backend (this thread)")
        assert ops.get_backend("cpu") == "cpu"
    finally:
        ops.set_backend(None)
    monkeypatch.delenv("EMMA_MAMBA_BACKEND")
    assert ops.forced_backend() == (None, None)


@pytest.fixture
def spy_kernels(dispatch):
    """The cpu backend's kernels with selective_scan_bwd recording the ``deterministic`` flag it is given."""
    try:
        real = ops._load_compiled("cpu")
    except ops.BackendUnavailableError as e:
        pytest.skip(f"the cpu kernels are not built: {e}")
    seen = []

    def bwd(*args):
        seen.append(args[-2])  # (..., dout, dlast_state, deterministic, recompute_out)
        return real.selective_scan_bwd(*args)

    cache, _, _ = dispatch
    cache["cpu"] = SimpleNamespace(**{**vars(real), "selective_scan_bwd": bwd})
    return seen


def _scan_backward(deterministic=None):
    torch.manual_seed(0)
    u = torch.randn(1, 2, 5, requires_grad=True)
    delta = torch.rand(1, 2, 5)
    A, B, C = -torch.rand(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    with ops.use_backend("cpu"):
        ops.selective_scan(u, delta, A, B, C, deterministic=deterministic).sum().backward()


def test_deterministic_default_is_the_environment_or_torchs_setting(spy_kernels, monkeypatch):
    """deterministic=None: EMMA_MAMBA_DETERMINISTIC (1/true/yes/on), else torch.are_deterministic_algorithms_enabled();
    an explicit value wins over both."""
    monkeypatch.delenv("EMMA_MAMBA_DETERMINISTIC", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    _scan_backward()
    for v in ("1", "true", "YES", "on"):
        monkeypatch.setenv("EMMA_MAMBA_DETERMINISTIC", v)
        _scan_backward()
    _scan_backward(deterministic=False)
    monkeypatch.setenv("EMMA_MAMBA_DETERMINISTIC", "0")
    _scan_backward()
    monkeypatch.delenv("EMMA_MAMBA_DETERMINISTIC")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _scan_backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert spy_kernels == [False, True, True, True, True, False, False, True]


_LATE_INTERPRET = """
import os, sys, torch
{before}
import emma_mamba.kernels  # triton's and our kernels decorated now, in the mode the variable has now
{after}
from emma_mamba import ops
args = (torch.randn(1, 4, 8), torch.rand(1, 4, 8), -torch.rand(4, 3), torch.randn(1, 3, 8), torch.randn(1, 3, 8))
print("interprets", ops.triton_interprets(), "runs_on", ops.runs_on("triton"))
try:
    with ops.use_backend("triton"):
        print("ran", tuple(ops.selective_scan(*args).shape))
except ops.BackendUnavailableError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("when", ["after_import", "cleared_after_import"])
def test_triton_on_cpu_follows_how_triton_was_imported_not_the_variable_now(when):
    """Triton decides interpreted or compiled when its functions are decorated (at import), and reads the variable
    again when they run. TRITON_INTERPRET=1 set after the import (as the old hint said, in a notebook) made
    dispatch send CPU tensors to kernels compiled for a GPU ("0 active drivers"); cleared after an interpreted
    import, triton failed on its own assertion. Now each is refused saying what happened."""
    if when == "after_import":
        code = _LATE_INTERPRET.format(before="os.environ.pop('TRITON_INTERPRET', None)",
                                      after="os.environ['TRITON_INTERPRET'] = '1'")
    else:
        code = _LATE_INTERPRET.format(before="os.environ['TRITON_INTERPRET'] = '1'",
                                      after="os.environ.pop('TRITON_INTERPRET')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    if when == "after_import":
        assert "interprets False runs_on ['cuda']" in out.stdout
        assert "refused: backend 'triton' was requested but cannot run on cpu tensors (TRITON_INTERPRET=1 was set " \
               "after triton was imported" in out.stdout
    else:
        assert "interprets False runs_on ['cuda']" in out.stdout
        assert "(TRITON_INTERPRET was unset after triton was imported in its interpreter mode: keep it at 1" \
            in out.stdout
