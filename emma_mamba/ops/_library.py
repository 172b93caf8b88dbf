"""The compiled backends' kernels as PyTorch custom ops (``torch.ops.emma_mamba.*``), for torch.compile.

A kernel called straight from Python is opaque to TorchDynamo: it breaks the graph around every scan and conv
(two breaks per layer), and ``fullgraph=True`` or ``torch.export`` fail. Registered through
``torch.library.custom_op`` with a fake (shape-only) implementation and an autograd formula, the kernels are
single nodes that Dynamo, AOTAutograd and Inductor pass through, so a whole Mamba model compiles into one
graph, forward and backward, on every backend.

Each op takes the backend's name as its first argument, so one graph calls one backend's kernels; the name is
resolved when the graph is traced (``emma_mamba.ops.get_backend``, baked in as a constant; the graph guards on
the selection of ``set_backend`` / ``use_backend``, so another selection retraces). The ops' contract is the
kernel-module protocol of :mod:`emma_mamba.ops._autograd` (and, for ``mamba_inner_fwd`` / ``_bwd``, of
:mod:`emma_mamba.ops._inner`); a gradient that a kernel leaves out (an absent optional input) crosses the op
boundary as an empty tensor.

torch.compile's on-disk caches (AOTAutograd's and Inductor's, under ``/tmp/torchinductor_$USER``) key a graph on
the Dynamo graph, which names these ops but holds none of their Python: the autograd formulas below are traced
into the cached backward graph, and the fake implementations fix its shapes. So a cached graph from another
version of this package would run that version's formulas (a changed backward op signature failed with "missing
value for argument"; a changed formula with the same signature would run silently). :func:`tag_compile_caches`
therefore adds a hash of this package's ops sources to ``torch.compiler.config.cache_key_tag`` when the ops are
registered (keeping any tag the user set): another version compiles afresh and caches its own graphs.

Eager calls do not go through these ops: the custom-op dispatcher costs tens of microseconds per call, as
much as a whole decode-step kernel. :mod:`emma_mamba.ops` uses them only while ``torch.compiler.is_compiling()``.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

# Steps per saved scan state in every compiled backend's forward (csrc/cpu kSave/kChunk, csrc/cuda kSave,
# kernels.selective_scan.CHUNK): the fake forward must know how many states the real one saves.
SAVE_EVERY_COMPILED = 256


# the oldest torch on which the compiled model was checked to train like eager (tests/ops/test_compile.py)
COMPILE_TESTED_FROM = "2.11"


def ops_source_hash() -> str:
    """A hash of the sources of :mod:`emma_mamba.ops` (the custom ops, their fake implementations, the autograd
    formulas traced into compiled graphs, and what they call)."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def tag_compile_caches() -> str:
    """Adds ``emma_mamba-ops-<ops_source_hash()>`` to torch.compile's cache key tag (once; a tag the user set,
    e.g. with TORCH_COMPILE_CACHE_KEY_TAG, is kept in front). Returns the tag now in force."""
    cfg = getattr(torch.compiler, "config", None)
    if cfg is None or not hasattr(cfg, "cache_key_tag"):  # an old torch: no cache key tag (nor these caches)
        return ""
    mine = f"emma_mamba-ops-{ops_source_hash()}"
    tag = cfg.cache_key_tag or ""
    if mine not in tag.split("|"):
        cfg.cache_key_tag = f"{tag}|{mine}" if tag else mine
    return cfg.cache_key_tag


def require_compile_backend(name: str, key: str) -> None:
    """A ValueError naming ``key`` unless ``name`` is a torch.compile backend (inductor, aot_eager, ...); a warning
    on a torch older than COMPILE_TESTED_FROM (torch 2.6's Inductor gave the LM a wrong tied-embedding gradient
    on one CPU thread, 0.1 off; 2.11 and 2.15 match eager)."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if name not in known:
        raise ValueError(f"{key}: {name!r} is not a torch.compile backend; choose one of {', '.join(sorted(known))}")
    if torch.__version__ < COMPILE_TESTED_FROM:  # a TorchVersion: compares as a version
        logging.getLogger("emma_mamba.ops").warning(
            "%s: torch %s is older than %s, the oldest on which the compiled model was checked against eager "
            "(torch 2.6's Inductor miscompiled its tied-embedding gradient on one CPU thread); upgrade torch or "
            "compare a few steps with eager", key, torch.__version__, COMPILE_TESTED_FROM)


def _kern(backend: str):
    from . import _load  # the package imports this module

    kern = _load(backend)
    if kern is None:
        raise RuntimeError("emma_mamba custom ops run compiled backends only; the torch backend is plain torch ops")
    return kern


def _save_every(backend: str) -> int:
    if backend == "triton":
        from emma_mamba.kernels import selective_scan as tk

        return tk.CHUNK
    return SAVE_EVERY_COMPILED


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """A kernel's gradient as a custom op's output: an empty tensor for None, and a view copied (outputs may not
    alias each other: the CUDA conv backward returns dweight and dbias as views of one reduction buffer)."""
    if t is None:
        return like.new_empty(0)
    return t.clone() if t._base is not None else t


# ---------------------------------------------------------------------------------------------------------
# selective scan


@torch.library.custom_op("emma_mamba::selective_scan_fwd", mutates_args=(), device_types=None)
def selective_scan_fwd(backend: str, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool, initial_state: Optional[Tensor], seq_idx: Optional[Tensor],
                       deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out, last_state, saved). ``deterministic`` is only carried to the backward.

    ``saved`` leaves the op flattened to (b, d, nchunks * n): with (b, d, nchunks, n) a symbolic length would be
    specialised to one side of the first chunk edge (PyTorch's contiguity check asks whether nchunks == 1)."""
    out, last_state, saved = _kern(backend).selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                               delta_softplus, initial_state, seq_idx)
    return out, last_state, saved.reshape(saved.shape[0], saved.shape[1], -1)


@selective_scan_fwd.register_fake
def _(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, deterministic):
    b, d, l = u.shape
    n = A.shape[1]
    every = _save_every(backend)
    f32 = dict(dtype=torch.float32, device=u.device)
    return (torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty((b, d, n), **f32),
            u.new_empty((b, d, (l + every - 1) // every * n), **f32))


@torch.library.custom_op("emma_mamba::selective_scan_bwd", mutates_args=(), device_types=None)
def selective_scan_bwd(backend: str, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool, initial_state: Optional[Tensor], seq_idx: Optional[Tensor],
                       saved: Tensor, dout: Tensor, dlast_state: Optional[Tensor],
                       deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                      Tensor, Tensor]:
    """-> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); empty for an absent input."""
    saved = saved.view(saved.shape[0], saved.shape[1], -1, A.shape[1])
    grads = _kern(backend).selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                              seq_idx, saved, dout, dlast_state, deterministic, False)
    return tuple(_or_empty(g, u) for g in grads[:9])


def _for_present(grads, inputs) -> list:
    """The backward op's gradients as autograd wants them: None for each absent (None) input, whose gradient
    crossed the op boundary as an empty tensor."""
    return [None if t is None else g for g, t in zip(grads, inputs)]


def _like_or_empty(t: Tensor | None, u: Tensor) -> Tensor:
    return u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


@selective_scan_bwd.register_fake
def _(backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, saved, dout,
      dlast_state, deterministic):
    return tuple(_like_or_empty(t, u) for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))


def _scan_setup(ctx, inputs, output):
    (backend, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, deterministic) = inputs
    ctx.backend, ctx.delta_softplus, ctx.deterministic = backend, delta_softplus, deterministic
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, output[2])


def _scan_backward(ctx, dout, dlast_state, _dsaved):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, saved = ctx.saved_tensors
    dout = torch.zeros_like(u) if dout is None else dout.contiguous()
    if dlast_state is not None:
        dlast_state = dlast_state.contiguous()
    grads = selective_scan_bwd(ctx.backend, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                               initial_state, seq_idx, saved, dout, dlast_state, ctx.deterministic)
    du, ddelta, dA, dB, dC, dD, dz, ddb, dinit = _for_present(
        grads, (u, delta, A, B, C, D, z, delta_bias, initial_state))
    return None, du, ddelta, dA, dB, dC, dD, dz, ddb, None, dinit, None, None


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


# ---------------------------------------------------------------------------------------------------------
# causal conv1d


@torch.library.custom_op("emma_mamba::causal_conv1d_fwd", mutates_args=(), device_types=None)
def causal_conv1d_fwd(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      initial_states: Optional[Tensor], seq_idx: Optional[Tensor], silu: bool) -> Tensor:
    return _kern(backend).causal_conv1d_fwd(x, weight, bias, initial_states, seq_idx, silu)


@causal_conv1d_fwd.register_fake
def _(backend, x, weight, bias, initial_states, seq_idx, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("emma_mamba::causal_conv1d_bwd", mutates_args=(), device_types=None)
def causal_conv1d_bwd(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      initial_states: Optional[Tensor], seq_idx: Optional[Tensor], dout: Tensor,
                      silu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias, dinitial_states); empty for an absent input."""
    grads = _kern(backend).causal_conv1d_bwd(x, weight, bias, initial_states, seq_idx, dout, silu)
    return tuple(_or_empty(g, x) for g in grads)


@causal_conv1d_bwd.register_fake
def _(backend, x, weight, bias, initial_states, seq_idx, dout, silu):
    return tuple(_like_or_empty(t, x) for t in (x, weight, bias, initial_states))


def _conv_setup(ctx, inputs, output):
    backend, x, weight, bias, initial_states, seq_idx, silu = inputs
    ctx.backend, ctx.silu = backend, silu
    ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)


def _conv_backward(ctx, dout):
    x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
    grads = causal_conv1d_bwd(ctx.backend, x, weight, bias, initial_states, seq_idx, dout.contiguous(), ctx.silu)
    dx, dw, db, dinit = _for_present(grads, (x, weight, bias, initial_states))
    return None, dx, dw, db, dinit, None, None


causal_conv1d_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---------------------------------------------------------------------------------------------------------
# the mixer's inner path with recompute (ops.mamba_inner): the conv output, delta and scan output are not kept


@torch.library.custom_op("emma_mamba::mamba_inner_fwd", mutates_args=(), device_types=None)
def mamba_inner_fwd(backend: str, x: Tensor, z: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                    x_proj_weight: Tensor, dt_proj_weight: Tensor, A: Tensor, D: Optional[Tensor],
                    delta_bias: Optional[Tensor], seq_idx: Optional[Tensor], out_proj_weight: Optional[Tensor],
                    out_proj_bias: Optional[Tensor], deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (out, x_dbl, saved): out = out_proj(y) (b, l, d_model) with ``out_proj_weight``, else y (b, d, l);
    x_dbl (b, r + 2n, l) and the scan's saved states, flattened as selective_scan_fwd's, for the backward.
    ``deterministic`` is only carried to the backward."""
    from ._inner import inner_fwd

    out, x_dbl, saved, _ = inner_fwd(_kern(backend), x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                     A, D, delta_bias, seq_idx, out_proj_weight, out_proj_bias)
    # x_dbl is a view of a GEMM's result at batch 1 (outputs are returned as their own tensors)
    return (out, x_dbl.clone() if x_dbl._base is not None else x_dbl,
            saved.reshape(saved.shape[0], saved.shape[1], -1))


@mamba_inner_fwd.register_fake
def _(backend, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx,
      out_proj_weight, out_proj_bias, deterministic):
    b, d, l = x.shape
    n, every = A.shape[1], _save_every(backend)
    out = (torch.empty_like(x, memory_format=torch.contiguous_format) if out_proj_weight is None
           else x.new_empty((b, l, out_proj_weight.shape[0])))
    return (out, x.new_empty((b, x_proj_weight.shape[0], l)),
            x.new_empty((b, d, (l + every - 1) // every * n), dtype=torch.float32))


@torch.library.custom_op("emma_mamba::mamba_inner_bwd", mutates_args=(), device_types=None)
def mamba_inner_bwd(backend: str, x: Tensor, z: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                    x_proj_weight: Tensor, dt_proj_weight: Tensor, A: Tensor, D: Optional[Tensor],
                    delta_bias: Optional[Tensor], seq_idx: Optional[Tensor], out_proj_weight: Optional[Tensor],
                    out_proj_bias: Optional[Tensor], x_dbl: Tensor, saved: Tensor, dout: Tensor,
                    deterministic: bool, weight_grads: Sequence[bool]) -> tuple[
                        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> the gradients of (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias,
    out_proj_weight, out_proj_bias), each in its input's dtype; empty for an absent input and for a weight whose
    ``weight_grads`` flag (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight,
    out_proj_bias) is false: a frozen weight's GEMM is skipped, as in eager."""
    from ._inner import inner_bwd

    saved = saved.view(saved.shape[0], saved.shape[1], -1, A.shape[1])
    inputs = (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, out_proj_weight,
              out_proj_bias)
    grads = inner_bwd(_kern(backend), x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D,
                      delta_bias, seq_idx, x_dbl, saved, dout, deterministic, out_proj_weight, out_proj_bias,
                      weight_grads=tuple(bool(w) for w in weight_grads))
    return tuple(_or_empty(None if g is None else g.to(t.dtype), x) for g, t in zip(grads, inputs))


#: positions of (conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, out_proj_bias) among
#: mamba_inner_bwd's 11 gradients
_INNER_WEIGHTS = (2, 3, 4, 5, 9, 10)


@mamba_inner_bwd.register_fake
def _(backend, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx,
      out_proj_weight, out_proj_bias, x_dbl, saved, dout, deterministic, weight_grads):
    inputs = [x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, out_proj_weight,
              out_proj_bias]
    for i, want in zip(_INNER_WEIGHTS, weight_grads):
        if not want:
            inputs[i] = None
    return tuple(_like_or_empty(t, x) for t in inputs)


def _inner_setup(ctx, inputs, output):
    (backend, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx,
     out_proj_weight, out_proj_bias, deterministic) = inputs
    ctx.backend, ctx.deterministic = backend, deterministic
    ctx.save_for_backward(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx,
                          out_proj_weight, out_proj_bias, output[1], output[2])


def _inner_backward(ctx, dout, _dx_dbl, _dsaved):
    if dout is None:
        return (None,) * 14
    (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx, out_proj_weight,
     out_proj_bias, x_dbl, saved) = ctx.saved_tensors
    need = ctx.needs_input_grad  # of mamba_inner_fwd's inputs (backend, x, z, conv_weight, ...)
    weight_grads = list(need[3:7] + need[11:13])
    grads = mamba_inner_bwd(ctx.backend, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D,
                            delta_bias, seq_idx, out_proj_weight, out_proj_bias, x_dbl, saved, dout,
                            ctx.deterministic, weight_grads)
    grads = _for_present(grads, (x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias,
                                 out_proj_weight, out_proj_bias))
    for i, want in zip(_INNER_WEIGHTS, weight_grads):
        if not want:  # crossed the op boundary as an empty tensor
            grads[i] = None
    return (None, *grads[:9], None, *grads[9:], None)


mamba_inner_fwd.register_autograd(_inner_backward, setup_context=_inner_setup)


# ---------------------------------------------------------------------------------------------------------
# decode steps (state updated in place)


@torch.library.custom_op("emma_mamba::selective_state_update", mutates_args=("state",), device_types=None)
def selective_state_update(backend: str, state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                           dt_softplus: bool) -> Tensor:
    return _kern(backend).selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@selective_state_update.register_fake
def _(backend, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("emma_mamba::causal_conv1d_update", mutates_args=("conv_state",), device_types=None)
def causal_conv1d_update(backend: str, x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                         silu: bool) -> Tensor:
    return _kern(backend).causal_conv1d_update(x, conv_state, weight, bias, silu)


@causal_conv1d_update.register_fake
def _(backend, x, conv_state, weight, bias, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


tag_compile_caches()
