"""The op layer: the only place in emma_mamba that picks a kernel.

Four ops with mamba-ssm compatible signatures (plus ``initial_state``/``seq_idx`` extensions):
``selective_scan``, ``causal_conv1d``, ``selective_state_update``, ``causal_conv1d_update``; and
``mamba_inner``, the mixer's conv -> x_proj -> dt_proj -> scan (-> out_proj) path as one op that recomputes the
conv output, delta and the scan output in its backward instead of keeping them (:mod:`._inner`: a training
layer keeps 2 activations of size (b, d_inner, l) instead of 5-6).

Backends, identical in signature:

* ``cuda``   - C++/CUDA kernels in csrc/cuda, compiled into ``emma_mamba._C``;
* ``triton`` - Triton kernels in emma_mamba/kernels/; CPU tensors too under ``TRITON_INTERPRET=1``;
* ``cpu``    - C++ CPU kernels in csrc/cpu, compiled into ``emma_mamba._C``;
* ``torch``  - the fp32 reference of :mod:`emma_mamba.ops.reference` (the test oracle).

The backend is chosen once per device type, on first use: CUDA tensors run on cuda, else triton, else torch;
CPU tensors on cpu, else torch. Falling back logs one line saying which backend runs and why.
``EMMA_MAMBA_BACKEND=cuda|triton|cpu|torch`` forces one backend for every device (an error if it is not
available), and :func:`use_backend` does the same for a ``with`` block (tests).

Under ``torch.compile`` (while Dynamo traces) the compiled backends' kernels are called as the custom ops of
:mod:`emma_mamba.ops._library` (``torch.ops.emma_mamba.*``, with fake implementations and autograd formulas),
so a model compiles into one graph and exports; eager calls go to the kernels directly.

One more backend exists for kernel development and CI and is never chosen automatically: ``cuda-emu``, the
CUDA kernels of csrc/cuda compiled for the CPU against an emulator (:mod:`emma_mamba.ops.cuda_emulator`;
needs a source checkout and a C++ compiler), run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, overload

import torch
from torch import Tensor

from . import _checks, _inner, _library
from ._autograd import CausalConv1dFn, SelectiveScanFn
from ._checks import OpInputError
from .reference import (causal_conv1d_ref, causal_conv1d_update_ref, selective_scan_ref,
                        selective_state_update_ref)

__all__ = [
    "selective_scan", "causal_conv1d", "selective_state_update", "causal_conv1d_update", "mamba_inner",
    "get_backend", "use_backend", "set_backend", "available_backends", "BackendUnavailableError",
    "OpInputError", "BACKENDS", "step_kernels", "selective_state_update_unchecked", "causal_conv1d_update_unchecked",
]

log = logging.getLogger("emma_mamba.ops")

BACKENDS = ("cuda", "triton", "cpu", "torch")
DEV_BACKENDS = ("cuda-emu",)  # selectable by name only (use_backend / set_backend / EMMA_MAMBA_BACKEND)
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend was requested that is not built or cannot run here."""


# ---------------------------------------------------------------------------------------------------------
# backend loading

_kernel_cache: dict[str, object] = {}
_unavailable: dict[str, str] = {}
_lock = threading.Lock()

_PROTOCOL = ("selective_scan_fwd", "selective_scan_bwd", "causal_conv1d_fwd", "causal_conv1d_bwd",
             "selective_state_update", "causal_conv1d_update")


def kernels_of(module, suffix: str = ""):
    """The six kernel entry points of ``module`` (named ``<op><suffix>``) as a backend's kernel namespace."""
    return SimpleNamespace(**{f: getattr(module, f"{f}{suffix}") for f in _PROTOCOL})


def _load_compiled(suffix: str):
    try:
        from emma_mamba import _C  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(import_error_message(e)) from e
    warn_if_stale(_C)
    if suffix == "cuda" and not getattr(_C, "with_cuda", False):
        raise BackendUnavailableError("emma_mamba._C was built without the CUDA kernels "
                                      "(no nvcc or CUDA torch at build time, or EMMA_SKIP_CUDA_BUILD=1)")
    if suffix == "cuda" and torch.cuda.is_available():
        # every visible GPU, not only the current one: the choice holds for all CUDA tensors of the process, and a
        # machine mixing GPU generations would run the kernels on one they cannot run on
        archs = getattr(_C, "cuda_archs", None)
        ccs = [(i, torch.cuda.get_device_capability(i)) for i in range(max(1, torch.cuda.device_count()))]
        bad = [(i, cc) for i, cc in ccs if archs is not None and not cuda_archs_cover(archs, cc)]
        if bad:
            if len(ccs) == 1:
                cc = bad[0][1]
                where = f"this GPU ({torch.cuda.get_device_name(0)}, sm_{cc[0]}{cc[1]})"
            else:
                where = "; ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)}, sm_{cc[0]}{cc[1]})" for i, cc in bad)
            need = ";".join(sorted({f"{cc[0]}{cc[1]}" for _, cc in ccs}, key=int))  # every GPU here
            var = f'EMMA_CUDA_ARCHS="{need}"' if ";" in need else f"EMMA_CUDA_ARCHS={need}"
            raise BackendUnavailableError(
                f"emma_mamba._C's CUDA kernels were built for sm_{archs.replace(';', ', sm_')} and cannot run on "
                f"{where}; rebuild with {var}")
    return kernels_of(_C, f"_{suffix}")


def build_freshness(ext, csrc=None) -> tuple[bool | None, str]:
    """Whether the compiled extension ``ext`` was built from the C++ / CUDA sources beside the package (a source
    checkout's ``csrc/``, or ``csrc``): (True, ...) it was; (False, why) they changed since its build; (None, why)
    unknown (an installed wheel has no sources beside it; an extension built before the digest was recorded)."""
    from emma_mamba._csrc_digest import csrc_digest

    if csrc is None:
        root = _source_checkout()
        if root is None:
            return None, "no csrc/ beside the package (not a source checkout)"
        csrc = root / "csrc"
    built = getattr(ext, "csrc_digest", None)
    if built is None:
        return None, "the extension records no source digest (built before it did)"
    now = csrc_digest(csrc)
    if now == built:
        return True, f"built from {csrc} as it is now (digest {now})"
    return False, (f"emma_mamba._C was built from other sources than {csrc} holds now (digest {built} at the "
                   f"build, {now} now: a pull or an edit since), so the kernels that run are not these sources'; "
                   f"rebuild: {_rebuild_advice(csrc.parent)}")


def _source_checkout() -> Path | None:
    """The source checkout the package runs from (setup.py and csrc/ beside it), or None (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def _rebuild_advice(root: Path | None = None) -> str:
    """How to rebuild ``emma_mamba._C``: in a source checkout (``root``, default: the package's own) its build
    commands; for an installed package, reinstalling it from its source against the torch installed now."""
    root = root or _source_checkout()
    if root is not None:
        return f"`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) in {root}"
    return ("a reinstall from source against the installed torch: `pip install --no-build-isolation "
            "--force-reinstall --no-deps <the sdist, a git URL or a checkout of emma_mamba>`")


def import_fix(e: BaseException) -> str:
    """What to do when ``emma_mamba._C`` did not import with ``e``. An undefined symbol is almost always a torch
    changed since the build (a ``pip install -U torch``): the extension links against one torch's C++ symbols."""
    if "undefined symbol" in str(e):
        return (f"an undefined symbol means it was built against another torch than this one (torch "
                f"{torch.__version__}): rebuild it against this torch with {_rebuild_advice()}")
    return f"build it with {_rebuild_advice()}"


def import_error_message(e: BaseException) -> str:
    """Why ``emma_mamba._C`` did not import, and what to do (:func:`import_fix`)."""
    return f"the compiled extension emma_mamba._C is not importable ({e}); {import_fix(e)}"


def torch_mismatch(ext) -> str | None:
    """What is wrong when ``ext`` was built against another torch than the one running (None when it was not, or
    when an older build records none). Torch keeps no C++ ABI across versions: such an extension may fail on
    import, crash or misbehave."""
    built = getattr(ext, "torch_version", None)
    if built is None or built == torch.__version__:
        return None
    return (f"emma_mamba._C was built against torch {built} but this is torch {torch.__version__}: torch keeps no "
            f"C++ ABI across versions, so its kernels may crash or misbehave; rebuild: {_rebuild_advice()}")


_stale_checked = False


def warn_if_stale(ext) -> None:
    """Log once per process when the checkout's sources changed since the build (:func:`build_freshness`) and
    when the extension was built against another torch (:func:`torch_mismatch`)."""
    global _stale_checked
    if _stale_checked:
        return
    _stale_checked = True
    other_torch = torch_mismatch(ext)
    if other_torch:
        log.warning("emma_mamba.ops: %s", other_torch)
    try:
        fresh, why = build_freshness(ext)
    except OSError:  # an unreadable source file: no verdict
        return
    if fresh is False:
        log.warning("emma_mamba.ops: %s", why)


def cuda_archs_cover(archs: str, cc: tuple[int, int]) -> bool:
    """Whether kernels built for ``archs`` ("80;90": SASS for each, PTX of the newest plain one; see setup.py)
    run on a GPU of compute capability ``cc``: SASS of the same major and a minor no higher (sm_80 code runs on
    8.6 and 8.9; an arch-specific '90a' only on 9.0), or PTX of an architecture no newer, which the driver
    compiles."""
    listed = [a.strip().lower() for a in archs.split(";") if a.strip()]
    dev = cc[0] * 10 + cc[1]
    for a in listed:
        if a.endswith("a"):
            if int(a[:-1]) == dev:
                return True
        elif int(a) // 10 == cc[0] and int(a) % 10 <= cc[1]:
            return True
    plain = [int(a) for a in listed if a.isdigit()]
    return bool(plain) and max(plain) <= dev


def _load_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"triton is not installed ({e})") from e
    try:
        mod = importlib.import_module("emma_mamba.kernels")
    except ImportError as e:
        raise BackendUnavailableError(f"emma_mamba.kernels could not be imported ({e})") from e
    missing = [f for f in _PROTOCOL if not hasattr(mod, f)]
    if missing:
        raise BackendUnavailableError(f"emma_mamba.kernels lacks {', '.join(missing)}")
    return mod


def _load_emulator():
    from . import cuda_emulator

    return kernels_of(cuda_emulator.load())


def _load(name: str):
    """Kernel module of a backend (None for the torch reference); raises BackendUnavailableError."""
    if name not in BACKENDS + DEV_BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of "
                                      f"{', '.join(BACKENDS + DEV_BACKENDS)}")
    if name == "torch":
        return None
    with _lock:
        if name in _kernel_cache:
            return _kernel_cache[name]
        if name in _unavailable:
            raise BackendUnavailableError(f"backend {name!r} is not available: {_unavailable[name]}")
        try:
            kern = (_load_triton() if name == "triton" else _load_emulator() if name == "cuda-emu"
                    else _load_compiled(name))
        except BackendUnavailableError as e:
            _unavailable[name] = str(e)
            raise BackendUnavailableError(f"backend {name!r} is not available: {e}") from None
        _kernel_cache[name] = kern
        return kern


def _runs_on(name: str, device_type: str) -> bool:
    if name == "torch":
        return True
    if name in ("cpu", "cuda-emu"):
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    # triton: GPUs, and the CPU through the interpreter
    return device_type == "cuda" or (device_type == "cpu" and triton_interprets())


def _triton_decorated_interpreted() -> bool | None:
    """Whether triton's (and our) jit functions were decorated for the interpreter, when triton was imported; None
    before it is (then TRITON_INTERPRET at its import will decide)."""
    triton = sys.modules.get("triton")
    if triton is None:
        return None
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - a triton without the interpreter
        return False
    standard = getattr(getattr(triton, "language", None), "standard", None)
    fns = [getattr(standard, "zeros", None)]  # one of triton's own jit helpers, decorated at its import
    kernels = sys.modules.get("emma_mamba.kernels.selective_scan")
    if kernels is not None:
        fns.append(getattr(kernels, "_selective_scan_fwd_kernel", None))
    fns = [f for f in fns if f is not None]
    if not fns:  # a triton laid out otherwise: no verdict from the functions
        return None
    return all(isinstance(f, InterpretedFunction) for f in fns)


def triton_interprets() -> bool:
    """Whether Triton kernels run in its interpreter in this process (on CPU tensors). Triton fixes the mode when a
    function is decorated, at import, from TRITON_INTERPRET, and reads the variable again when it runs: so it must
    be 1 before triton (or emma_mamba.kernels) is imported and stay 1 (set later, CPU tensors reached kernels
    compiled for a GPU: "0 active drivers"; cleared later, triton's own assertion failed)."""
    env = os.environ.get("TRITON_INTERPRET") == "1"
    decorated = _triton_decorated_interpreted()
    return env and decorated is not False


def _triton_cpu_hint() -> str:
    """How to run the triton backend on CPU tensors, from where this process stands."""
    env, decorated = os.environ.get("TRITON_INTERPRET") == "1", _triton_decorated_interpreted()
    if env and decorated is False:
        return (" (TRITON_INTERPRET=1 was set after triton was imported in this process, which compiled its kernels "
                "for a GPU: set it before anything imports triton or emma_mamba, e.g. in the shell)")
    if not env and decorated:
        return (" (TRITON_INTERPRET was unset after triton was imported in its interpreter mode: keep it at 1 for "
                "the whole process)")
    return " (set TRITON_INTERPRET=1, before triton is imported, to run triton kernels on the CPU)"


def available_backends() -> dict[str, str]:
    """Map each backend to "available" (its kernels load in this process) or the reason it is not. Available is
    not usable on every tensor: cuda and triton run on CUDA tensors (triton on CPU ones only under
    TRITON_INTERPRET=1), so both can be available on a machine without a GPU; ``emma-mamba env`` says which
    backend each device's tensors run on."""
    out = {}
    for name in BACKENDS:
        try:
            _load(name)
            out[name] = "available"
        except BackendUnavailableError as e:
            out[name] = str(e)
    return out


# ---------------------------------------------------------------------------------------------------------
# selection

_forced: str | None = None
_forced_local = threading.local()
_default: dict[str, str] = {}


def _env_backend() -> str | None:
    v = os.environ.get("EMMA_MAMBA_BACKEND", "").strip().lower()
    if not v:
        return None
    if v not in BACKENDS + DEV_BACKENDS:
        raise BackendUnavailableError(f"EMMA_MAMBA_BACKEND={v!r} is not a backend; choose one of "
                                      f"{', '.join(BACKENDS + DEV_BACKENDS)}")
    return v


# The selection of set_backend / use_backend as one string, kept current by both: torch.compile bakes the backend
# into a graph (_traced_backend) and guards on this value, so a graph traced under one selection is not reused
# under another (it was: a graph traced inside use_backend("cpu") ran the cpu kernels inside use_backend("torch")),
# and one traced before is reused when the same selection comes back. A plain global, where use_backend's choice is
# per thread: a thread compiling while another switches backends may retrace needlessly, never run a stale graph.
_selection_key = "None|None"


def _selection_changed() -> None:
    global _selection_key
    _selection_key = f"{getattr(_forced_local, 'name', None)}|{_forced}"


def set_backend(name: str | None) -> None:
    """Force one backend for every device from now on (None: back to automatic choice)."""
    global _forced
    if name is not None:
        _load(name)
    _forced = name
    _selection_changed()


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops of this ``with`` block (in this thread) on backend ``name``; an error if unavailable."""
    _load(name)
    prev = getattr(_forced_local, "name", None)
    _forced_local.name = name
    _selection_changed()
    try:
        yield
    finally:
        _forced_local.name = prev
        _selection_changed()


def forced_backend() -> tuple[str | None, str | None]:
    """(the backend forced for every device, what forced it): :func:`use_backend` (this thread), else
    :func:`set_backend`, else ``EMMA_MAMBA_BACKEND`` (an unknown name raises BackendUnavailableError); (None,
    None) when none is. Read by :func:`get_backend` and by ``emma-mamba env``."""
    name = getattr(_forced_local, "name", None)
    if name is not None:
        return name, "ops.use_backend (this thread)"
    if _forced is not None:
        return _forced, "ops.set_backend"
    name = _env_backend()
    return (name, f"EMMA_MAMBA_BACKEND={name}") if name is not None else (None, None)


def cannot_run_message(name: str, by: str, device_type: str) -> str:
    """Why a backend forced by ``by`` (:func:`forced_backend`) cannot serve ``device_type`` tensors."""
    return (f"backend {name!r} was requested{f' ({by})' if by.startswith('EMMA_MAMBA_BACKEND') else ''} but cannot "
            f"run on {device_type} tensors"
            + (_triton_cpu_hint() if name == "triton" else ""))


def get_backend(device: torch.device | str = "cpu") -> str:
    """The backend that ops on tensors of ``device`` run on."""
    dev_type = torch.device(device).type
    forced, by = forced_backend()
    if forced is not None:
        _load(forced)
        if not _runs_on(forced, dev_type):
            raise BackendUnavailableError(cannot_run_message(forced, by, dev_type))
        return forced
    if dev_type in _default:
        return _default[dev_type]
    reasons = []
    for name in _PREFERENCE.get(dev_type, ("torch",)):
        try:
            _load(name)
        except BackendUnavailableError as e:
            reasons.append(str(e))
            continue
        if reasons:
            log.warning("emma_mamba.ops: %s tensors run on the %r backend (%s)", dev_type, name, "; ".join(reasons))
        _default[dev_type] = name
        return name
    raise AssertionError("the torch backend is always available")


def probe_backend(name: str) -> tuple[bool, str | None]:
    """(available, reason) of backend ``name`` as :func:`get_backend` would find it, without writing the caches:
    the answer this process already has if any, else the loader's (not cached, so a later dispatch decides
    afresh). Used by ``emma-mamba env``; the cuda-emu backend is not probed here (loading it builds it)."""
    if name == "torch" or name in _kernel_cache:
        return True, None
    if name in _unavailable:
        return False, _unavailable[name]
    try:
        if name == "triton":
            _load_triton()
        else:
            _load_compiled(name)
        return True, None
    except BackendUnavailableError as e:
        return False, str(e)
    except Exception as e:  # noqa: BLE001 - a loader that breaks otherwise (a broken triton install)
        return False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def explain_backend(device_type: str, backends: dict) -> dict:
    """``{"backend", "why", "error"}``: the backend :func:`get_backend` picks for ``device_type`` tensors and why,
    by its rules (:func:`forced_backend`, then the choice cached on first use, then the first available of the
    preference order), from ``backends`` ({name: {"available": bool | None, "reason": str | None}}, e.g.
    :func:`probe_backend`'s answers; None: not known without loading it), without choosing or caching."""
    try:
        forced, by = forced_backend()
    except BackendUnavailableError as e:
        return {"backend": None, "why": "EMMA_MAMBA_BACKEND is invalid", "error": str(e)}
    if forced is not None:
        b = backends.get(forced, {})
        if b.get("available") is False:
            return {"backend": None, "why": f"forced by {by}",
                    "error": f"backend {forced!r} is not available: {b.get('reason')}"}
        if not _runs_on(forced, device_type):
            return {"backend": None, "why": f"forced by {by}",
                    "error": cannot_run_message(forced, by, device_type)}
        why = f"forced by {by}"
        if b.get("available") is None:
            why += "; not loaded here: loading it builds the CUDA emulator"
        return {"backend": forced, "why": why, "error": None}
    if device_type in _default:
        return {"backend": _default[device_type], "why": "chosen on first use earlier in this process", "error": None}
    order = _PREFERENCE.get(device_type, ("torch",))
    skipped = []
    for name in order:
        if backends[name]["available"]:
            why = f"first available of {' > '.join(order)}"
            if skipped:
                why += "; " + "; ".join(f"{n}: {r}" for n, r in skipped)
            return {"backend": name, "why": why, "error": None}
        skipped.append((name, backends[name]["reason"]))
    return {"backend": None, "why": "", "error": "no backend available"}  # unreachable: torch always is


def runs_on(name: str) -> list[str]:
    """The device types whose tensors backend ``name`` runs on here (triton's CPU only under TRITON_INTERPRET=1)."""
    return [d for d in ("cpu", "cuda") if _runs_on(name, d)]


def preference() -> dict[str, list[str]]:
    """The backends each device type's tensors try, in order, when none is forced."""
    return {d: list(order) for d, order in _PREFERENCE.items()}


def _kernels_for(t: torch.Tensor):
    """Kernel module of the backend for ``t``'s device (None: the torch reference)."""
    return _load(get_backend(t.device))


def _traced_backend(device_type: str, selection: str) -> str:
    """get_backend, called once while torch.compile traces a graph; the graph keeps the answer, and guards on
    ``selection`` (passed in so that Dynamo specialises on it: another selection retraces)."""
    return get_backend(device_type)


# torch.compiler.assume_constant_result(_traced_backend) without its import of torch._dynamo (and triton), 1.6 s of
# every process that never compiles (generate, chat, serve, eval): the decorator only sets this attribute, which
# Dynamo reads when it meets the call (tests/ops/test_compile.py checks that the two still agree)
_traced_backend._dynamo_marked_constant = True


def _pick(t: torch.Tensor):
    """-> (kernel module, custom-op backend name) for an op on ``t``'s device; both None: the torch reference.

    Eager: the kernel module, called directly. While torch.compile traces: the backend's name for the
    ``torch.ops.emma_mamba`` custom ops (:mod:`._library`), which Dynamo and AOTAutograd see as single nodes.
    """
    if torch.compiler.is_compiling():
        name = _traced_backend(t.device.type, _selection_key)
        return None, (None if name == "torch" else name)
    if t.numel() == 0:  # an empty batch or channel dimension: the reference gives the empty results (and grads)
        return None, None
    return _kernels_for(t), None


def _resolve_deterministic(deterministic: bool | None) -> bool:
    if deterministic is not None:
        return bool(deterministic)
    if os.environ.get("EMMA_MAMBA_DETERMINISTIC", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return torch.are_deterministic_algorithms_enabled()


def _wrote(state: Tensor) -> None:
    """Bump the version counter of a state a kernel updated in place through its data pointer, as torch's in-place
    ops do: autograd then refuses a backward that would read the overwritten values (a tensor computed from the
    state and saved for backward before the step), where it silently used the new ones (~0.3 us)."""
    torch.autograd.graph.increment_version(state)


_STEP_GRAD_SAID: set[str] = set()


def _step_needs_grad(op: str, *tensors: Tensor | None) -> bool:
    """Whether a decode step must run the differentiable reference: grad mode on and an input requiring grad (the
    compiled kernels' steps have no backward, so their output silently carried no gradient). Said once per op."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return False
    if op not in _STEP_GRAD_SAID and not torch.compiler.is_compiling():  # dynamo cannot trace a logger call
        _STEP_GRAD_SAID.add(op)
        log.warning("%s: an input requires grad, so the step runs the differentiable torch reference (the compiled "
                    "kernels' decode steps have no backward); decode under torch.no_grad() for the kernels", op)
    return True


# ---------------------------------------------------------------------------------------------------------
# the ops

@overload
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = ...,
                   z: Tensor | None = ..., delta_bias: Tensor | None = ..., delta_softplus: bool = ...,
                   return_last_state: Literal[False] = ..., initial_state: Tensor | None = ...,
                   seq_idx: Tensor | None = ..., *, deterministic: bool | None = ...) -> Tensor: ...


@overload
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                   return_last_state: Literal[True], initial_state: Tensor | None = ...,
                   seq_idx: Tensor | None = ..., *, deterministic: bool | None = ...) -> tuple[Tensor, Tensor]: ...


@overload
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = ...,
                   z: Tensor | None = ..., delta_bias: Tensor | None = ..., delta_softplus: bool = ..., *,
                   return_last_state: Literal[True], initial_state: Tensor | None = ...,
                   seq_idx: Tensor | None = ..., deterministic: bool | None = ...) -> tuple[Tensor, Tensor]: ...


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Tensor | None = None,
                   seq_idx: Tensor | None = None, *,
                   deterministic: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan (Mamba's S6), differentiable in every tensor input.

    Takes mamba-ssm's ``selective_scan_fn`` arguments, by position and by name, plus ``initial_state``,
    ``seq_idx`` and ``deterministic``.

    u, delta, z: (b, d, l) fp32/fp16/bf16; A: (d, n) fp32; B, C: (d, n) fp32 constant, (b, n, l) variable or
    (b, g, n, l) grouped; D, delta_bias: (d,) fp32; initial_state: (b, d, n) fp32; seq_idx: int32 (b, l),
    the packed sequence of every position, nondecreasing per row, resets the state where it changes (packed
    sequences). seq_idx is not checked (a check would cost a host sync per call on a GPU): each sequence must
    be one contiguous run of its row. A row that returns to an earlier id (0 0 1 1 0) is taken alike by every
    backend, but the ops then disagree: the scan restarts at every change (the last run is a new sequence),
    :func:`causal_conv1d` counts a tap whenever its id equals the output position's (the last run's window
    reads the first run's inputs within width - 1 positions).
    ``deterministic``: bitwise-reproducible gradients (default: EMMA_MAMBA_DETERMINISTIC or
    torch.are_deterministic_algorithms_enabled()).
    Returns out (b, d, l) in u's dtype, and the last state (b, d, n) fp32 if ``return_last_state``.
    """
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx = _checks.check_selective_scan(
        u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    kern, traced = _pick(u)
    if traced is not None:
        out, last_state, _ = _library.selective_scan_fwd(
            traced, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, seq_idx,
            _resolve_deterministic(deterministic))
        return (out, last_state) if return_last_state else out
    if kern is None:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  initial_state, seq_idx)
    _refuse_functorch("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)
    out, last_state = SelectiveScanFn.apply(kern, u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                            initial_state, seq_idx, _resolve_deterministic(deterministic))
    return (out, last_state) if return_last_state else out


def _refuse_functorch(op: str, *tensors) -> None:
    """A clear error where a torch.func transform (grad, vjp, jacrev, vmap; functional_call under one) reaches a
    compiled backend: its autograd wrappers hold the kernels' saved state in a ctx (the forward(ctx, ...) form),
    which torch.func refuses with a message of its own about setup_context, and the kernels batch nothing under
    vmap. The torch backend runs under every transform."""
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    if wrapped is not None and any(isinstance(t, Tensor) and wrapped(t) for t in tensors):
        raise RuntimeError(f"emma_mamba.ops.{op}: torch.func transforms (grad, vjp, jacrev, vmap) cannot run the "
                           f"compiled kernels of backend {get_backend(tensors[0].device)!r}; run under "
                           f"emma_mamba.ops.use_backend('torch'), whose ops every transform takes")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                  initial_states: Tensor | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """Depthwise causal conv1d, differentiable in x, weight, bias and initial_states.

    From causal-conv1d's ``causal_conv1d_fn(x, weight, bias, seq_idx, initial_states, return_final_states,
    final_states_out, activation)``: the same arguments by name, but ``activation`` comes 4th here (pass
    ``seq_idx`` and ``initial_states`` by name); there is no ``return_final_states``: the final states are the
    last w - 1 inputs, ``x[..., -(w - 1):]`` where l >= w - 1.

    x: (b, d, l); weight: (d, w) with w in 2..4; bias: (d,); activation: None | "silu" | "swish";
    initial_states: (b, d, w-1); seq_idx: int32 (b, l): a tap counts only where its position has the output
    position's id (the initial states have the row's first), so the window never reaches into another packed
    sequence; not checked: each sequence must be one contiguous run of its row (see :func:`selective_scan`).
    Returns (b, d, l) in x's dtype.
    """
    x, weight, bias, initial_states, seq_idx = _checks.check_causal_conv1d(x, weight, bias, initial_states,
                                                                           seq_idx, activation)
    kern, traced = _pick(x)
    if traced is not None:
        return _library.causal_conv1d_fwd(traced, x, weight, bias, initial_states, seq_idx, activation is not None)
    if kern is None:
        return causal_conv1d_ref(x, weight, bias, activation, initial_states, seq_idx)
    _refuse_functorch("causal_conv1d", x, weight, bias, initial_states)
    return CausalConv1dFn.apply(kern, x, weight, bias, initial_states, seq_idx, activation is not None)


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False) -> Tensor:
    """One decode step of the selective scan: updates ``state (b, d, n)`` in place, returns (b, d). mamba-ssm's
    ``selective_state_update`` arguments in its order (its Mamba-1 shapes; Mamba-2's per-head (b, h, p, n)
    layout is flattened to d = h * p channels by the caller). Differentiable: with grad mode on and an input
    requiring grad it runs the torch reference (the compiled kernels' steps have no backward; said once).

    x, dt, z: (b, d); A: (d, n) fp32; B, C: (b, n) or (b, g, n); D, dt_bias: (d,) fp32 or x's dtype (mamba-ssm's
    step passes its module's own, bf16 in a bf16 model).
    """
    x, dt, A, B, C, D, z, dt_bias = _checks.check_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias)
    kern, traced = _pick(state)
    if (kern is not None or traced is not None) and _step_needs_grad("selective_state_update", state, x, dt, A, B,
                                                                      C, D, z, dt_bias):
        kern = traced = None
    if traced is not None:
        return _library.selective_state_update(traced, state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
    if kern is None:
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    out = kern.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
    _wrote(state)
    return out


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None) -> Tensor:
    """One decode step of the causal conv: ``conv_state (b, d, w)`` (last w inputs, oldest first) shifts
    left and takes x (b, d) at the end, in place; returns (b, d). causal-conv1d's ``causal_conv1d_update``
    arguments in its order, for one step (its x of (b, d, 1) is ``x[..., 0]`` here) and a state of exactly w
    inputs (it also takes longer ones). Differentiable as :func:`selective_state_update` is."""
    x, weight, bias = _checks.check_causal_conv1d_update(x, conv_state, weight, bias, activation)
    kern, traced = _pick(conv_state)
    if (kern is not None or traced is not None) and _step_needs_grad("causal_conv1d_update", x, conv_state, weight,
                                                                      bias):
        kern = traced = None
    if traced is not None:
        return _library.causal_conv1d_update(traced, x, conv_state, weight, bias, activation is not None)
    if kern is None:
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    out = kern.causal_conv1d_update(x, conv_state, weight, bias, activation is not None)
    _wrote(conv_state)
    return out


def step_kernels(device: torch.device | str):
    """For a decode loop that checks its steps' inputs once: the kernel module whose decode steps it may call through
    :func:`selective_state_update_unchecked` and :func:`causal_conv1d_update_unchecked` from then on, skipping the
    public ops' checks and dispatch (~20-25 us a call on a CPU, a small model's whole kernel time); None when its steps
    must take the public ops: grad mode on (they may need the differentiable reference), torch.compile tracing (the
    custom ops), or the torch reference backend. :class:`~emma_mamba.models.mamba.MambaLM` checks a cache's first
    step through the public ops and trusts the same cache's later steps while this module, the activations' dtype
    and the autocast state stay the same."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return _load(get_backend(device))


def selective_state_update_unchecked(kern, state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                     D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None,
                                     dt_softplus: bool) -> Tensor:
    """:func:`selective_state_update` on ``kern`` (from :func:`step_kernels`) without its checks: inputs of the
    shapes, dtypes, layouts and device a checked call of the same loop had (D and dt_bias fp32, B and C one
    layout). A wrong one is read out of bounds, not reported."""
    out = kern.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    _wrote(state)
    return out


def causal_conv1d_update_unchecked(kern, x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                                   silu: bool) -> Tensor:
    """:func:`causal_conv1d_update` on ``kern`` (from :func:`step_kernels`) without its checks (see
    :func:`selective_state_update_unchecked`); ``silu``: the "silu" activation, else none."""
    out = kern.causal_conv1d_update(x, conv_state, weight, bias, silu)
    _wrote(conv_state)
    return out


def mamba_inner(x: Tensor, z: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor,
                dt_proj_weight: Tensor, A: Tensor, D: Tensor | None = None, delta_bias: Tensor | None = None,
                seq_idx: Tensor | None = None, *, out_proj_weight: Tensor | None = None,
                out_proj_bias: Tensor | None = None, conv_initial_states: Tensor | None = None,
                initial_state: Tensor | None = None, return_last_state: bool = False, recompute: bool = True,
                deterministic: bool | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The Mamba mixer between its in_proj and out_proj: silu(causal_conv1d(x)) -> x_proj -> [dt_low, B, C] ->
    delta = dt_proj(dt_low) -> selective_scan(..., z, delta_bias, delta_softplus=True) -> y (b, d, l), and with
    ``out_proj_weight`` (d_model, d) (and ``out_proj_bias`` (d_model,)) out_proj too -> (b, l, d_model).

    mamba-ssm's ``mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
    out_proj_weight, out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, ...)`` maps to
    ``mamba_inner(*xz.chunk(2, dim=1), conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, D,
    delta_bias, out_proj_weight=..., out_proj_bias=...)``, B and C always from x_proj (its variable-B/C case),
    delta_softplus always on.

    x, z: (b, d, l) (the two halves of in_proj's output); conv_weight (d, w) or an nn.Conv1d's (d, 1, w) (as
    mamba_inner_fn takes it), conv_bias (d,); x_proj_weight
    (r + 2n, d); dt_proj_weight (d, r); A (d, n) fp32; D, delta_bias (d,) fp32; seq_idx int32 (b, l), each
    sequence one contiguous run of its row, unchecked (see :func:`selective_scan`). The
    GEMMs run in x's dtype. Differentiable in every tensor input. ``recompute`` (compiled backends): the
    backward recomputes the conv output and delta rather than keeping them (two (b, d, l) activations less per
    layer, for one more conv and a rank-r GEMM), and with out_proj inside, the scan output y as well (one more:
    the scan's backward kernels recompute it anyway); False composes the separate ops, which keep them.
    ``conv_initial_states`` (b, d, w - 1), ``initial_state`` (b, d, n) fp32 and ``return_last_state`` (then
    returns (out, last state)) continue from and leave a recurrent state, as the separate ops do (a prefill into
    a decode cache): these calls compose the separate ops.
    """
    if isinstance(conv_weight, Tensor) and conv_weight.dim() == 3 and conv_weight.shape[1] == 1:
        conv_weight = conv_weight.squeeze(1)  # an nn.Conv1d's (d, 1, w) weight, as mamba_inner_fn takes it
    _inner._check(x, z, conv_weight, x_proj_weight, dt_proj_weight, A, out_proj_weight, out_proj_bias)
    if torch.is_autocast_enabled(x.device.type):
        # the GEMMs run in x's dtype, not autocast's: under autocast an fp32 x's x_proj and dt_proj gave a bf16 / fp16
        # delta, B and C beside the fp32 conv output, which the scan refused ("delta must have dtype float32")
        with torch.autocast(x.device.type, enabled=False):
            return mamba_inner(x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias, seq_idx,
                               out_proj_weight=out_proj_weight, out_proj_bias=out_proj_bias,
                               conv_initial_states=conv_initial_states, initial_state=initial_state,
                               return_last_state=return_last_state, recompute=recompute, deterministic=deterministic)
    x, conv_weight, conv_bias, _, seq_idx = _checks.check_causal_conv1d(x, conv_weight, conv_bias, None, seq_idx,
                                                                        "silu")
    kern, traced = _pick(x)
    stateful = conv_initial_states is not None or initial_state is not None or return_last_state
    if kern is None and traced is None or not recompute or stateful:
        # the separate ops: the torch reference, recompute off, or states in or out
        xc = causal_conv1d(x, conv_weight, conv_bias, "silu", conv_initial_states, seq_idx)  # (b, d, l)
        x_dbl = _inner.gemm_cf(x_proj_weight, xc)  # (b, r + 2n, l)
        r, n = dt_proj_weight.shape[1], A.shape[1]
        dt_low, B, C = torch.split(x_dbl, [r, n, n], dim=1)
        delta = _inner.gemm_cf(dt_proj_weight, dt_low)  # (b, d, l)
        out = selective_scan(xc, delta, A, B, C, D, z, delta_bias, True, return_last_state, initial_state,
                             seq_idx, deterministic=deterministic)
        if out_proj_weight is None:
            return out
        y, last = out if return_last_state else (out, None)
        out = _inner.project_out(y, out_proj_weight, out_proj_bias)  # (b, l, d_model)
        return (out, last) if return_last_state else out
    if traced is not None:
        return _library.mamba_inner_fwd(traced, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D,
                                        delta_bias, seq_idx, out_proj_weight, out_proj_bias,
                                        _resolve_deterministic(deterministic))[0]
    _refuse_functorch("mamba_inner", x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D, delta_bias,
                      out_proj_weight, out_proj_bias)
    return _inner.MambaInnerFn.apply(kern, x, z, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A, D,
                                     delta_bias, seq_idx, out_proj_weight, out_proj_bias,
                                     _resolve_deterministic(deterministic))
