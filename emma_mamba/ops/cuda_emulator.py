"""The CUDA kernels of csrc/cuda run on the CPU, for tests and kernel development without a GPU; and
sanitised (AddressSanitizer + UBSan) builds of them and of the CPU kernels.

``load()`` compiles csrc/cuda/*.cu with the host C++ compiler against csrc/emu/cuda_emu.h (every CUDA thread a
fiber, warps and blocks released at their synchronisation points; see that header for what is and is not
emulated) into a separate extension, ``emma_cuda_emu``, with the same six entry points as ``emma_mamba._C``'s
``<op>_cuda``. The ops layer knows it as the backend ``cuda-emu`` (CPU tensors; never chosen automatically):

    with ops.use_backend("cuda-emu"):
        out = ops.selective_scan(u, delta, A, B, C, ...)   # the CUDA kernel's arithmetic, on the CPU

It needs the source tree (a checkout; csrc/ is not part of the installed package), a C++ compiler and ninja.
The first build takes a minute or two; later loads reuse it (torch's extension cache, or ``build_dir``).
It is slow (a context switch per thread at every shuffle): keep shapes small. ``EMMA_CUDA_EMU_SCHEDULE=reverse``
or ``random:SEED`` sets the schedule (see :func:`set_schedule`) for a whole run, e.g. of the test suite.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

# Two translation units (emu/kernels.cpp includes the .cu files and the self-test kernels): parsing torch's headers
# is most of each unit's compile time (~16 s of the ~20 s of each kernel file at -O0), so the kernels share one
# parse, and the two units still build in parallel. The sanitised builds go further, one unit (:func:`_unity`).
_SOURCES = ("emu/bindings.cpp", "emu/kernels.cpp")
_DEPENDS = ("emu/cuda_emu.h", "emu/selftest.cpp", "cuda/common.cuh", "cuda/selective_scan.cu",
            "cuda/causal_conv1d.cu", "cuda/state_update.cu", "ops.h")
_module = None
_lock = threading.Lock()
# AddressSanitizer (bounds) and UndefinedBehaviorSanitizer (misaligned vector accesses, integer overflow), at -O0:
# the sanitised builds exist for the tests, whose grid is small, so compile time dominates (measured on this
# 2-core machine, one compile job: the emulated CUDA kernels 108 s of CPU at -O0 against 164 s at -O2, and their
# test grid 33 s against 26 s; the CPU kernels 70 s against 100 s at -O1, their grid under a second either way).
# No optimisation also means no access is optimised away before the sanitiser sees it. Each sanitised build is one
# translation unit (:func:`_unity`): 39 s of CPU for the emulated kernels against 111 s as five units, 38 s for
# the CPU kernels against 71 s as four (g++ 12, -O0 with the sanitisers, torch 2.14's headers).
_SANITIZE = ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
             "-g"]


def csrc_dir() -> Path:
    """csrc/ of the checkout this package runs from (EMMA_MAMBA_CSRC overrides)."""
    env = os.environ.get("EMMA_MAMBA_CSRC")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "csrc"


def load(build_dir: str | os.PathLike | None = None, verbose: bool = False, sanitize: bool = False):
    """Build (once) and import the emulated CUDA kernels; raises BackendUnavailableError when it cannot.

    ``sanitize=True`` builds a second module, ``emma_cuda_emu_asan``, under AddressSanitizer and UBSan: every
    global memory access of the kernels is then bounds-checked against torch's allocations, and misaligned
    vector accesses are errors. It can only be imported by a process started with the ASan runtime preloaded
    (see :func:`asan_environment`)."""
    global _module
    from . import BackendUnavailableError

    with _lock:
        if _module is not None and not sanitize:
            return _module
        src = csrc_dir()
        missing = [s for s in _SOURCES + _DEPENDS if not (src / s).is_file()]
        if missing:
            raise BackendUnavailableError(
                f"the CUDA emulator needs the source tree: {src} lacks {', '.join(missing)} "
                "(run from a checkout of the repository, or set EMMA_MAMBA_CSRC to its csrc folder)")
        try:
            from torch.utils import cpp_extension
        except ImportError as e:  # pragma: no cover - torch always has it
            raise BackendUnavailableError(f"torch.utils.cpp_extension is unavailable ({e})") from e
        if build_dir is not None:
            os.makedirs(build_dir, exist_ok=True)
        asan = _SANITIZE if sanitize else []  # (its -O0 comes after -O2 below: the last -O wins)
        try:
            with _compiler_without_preload():
                mod = cpp_extension.load(
                    name="emma_cuda_emu_asan" if sanitize else "emma_cuda_emu",
                    sources=[_unity("emma_cuda_emu_asan", [src / s for s in _SOURCES], build_dir)] if sanitize
                    else [str(src / s) for s in _SOURCES],
                    extra_include_paths=[str(src)],
                    extra_cflags=["-O2", "-std=c++20", "-fno-strict-aliasing", "-DEMMA_WITH_CUDA",
                                  "-DEMMA_CUDA_EMULATION", "-Wno-unknown-pragmas"] + asan,
                    extra_ldflags=asan,
                    build_directory=None if build_dir is None else str(build_dir),
                    verbose=verbose,
                )
        except (RuntimeError, OSError, ImportError) as e:
            raise BackendUnavailableError(f"building the CUDA emulator failed: {e}") from e
        sched = os.environ.get("EMMA_CUDA_EMU_SCHEDULE", "").strip()  # e.g. "reverse" or "random:3"
        if sched:
            order, _, seed = sched.partition(":")
            try:
                mod.set_schedule(order, int(seed or 0))
            except (ValueError, RuntimeError) as e:
                raise BackendUnavailableError(f"EMMA_CUDA_EMU_SCHEDULE={sched!r}: {e} (forward, reverse or "
                                              f"random[:SEED])") from None
        if not sanitize:
            _module = mod
        return mod


def load_cpu_sanitized(build_dir: str | os.PathLike | None = None, verbose: bool = False):
    """csrc/cpu's kernels (the ``cpu`` backend) built under AddressSanitizer and UBSan as a separate module,
    ``emma_cpu_asan``, with ``emma_mamba._C``'s entry points (``<op>_cpu``); for a process started with
    :func:`asan_environment`. :func:`use_sanitized_cpu_kernels` makes the ``cpu`` backend run it."""
    from . import BackendUnavailableError

    src = csrc_dir()
    kernels = sorted((src / "cpu").glob("*.cpp"))
    if not (src / "bindings.cpp").is_file() or not kernels:
        raise BackendUnavailableError(f"the CPU kernel sources are not under {src} (run from a checkout)")
    from torch.utils import cpp_extension

    try:
        with _compiler_without_preload():
            return cpp_extension.load(
                name="emma_cpu_asan", sources=[_unity("emma_cpu_asan", [src / "bindings.cpp"] + kernels, build_dir)],
                extra_include_paths=[str(src)], extra_cflags=["-std=c++20", "-fopenmp"] + _SANITIZE,
                extra_ldflags=["-fopenmp"] + _SANITIZE, build_directory=None if build_dir is None else str(build_dir),
                verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:
        raise BackendUnavailableError(f"building the sanitised CPU kernels failed: {e}") from e


def _unity(name: str, files: list[Path], build_dir) -> str:
    """A source file that #includes ``files`` (absolute paths), so they compile as one translation unit; written
    into ``build_dir`` (else a per-user temporary folder) only when its text changes, so ninja's timestamps and
    its dependency files (which list every included file) decide rebuilds as for the files themselves."""
    import tempfile

    folder = Path(build_dir) if build_dir is not None else Path(tempfile.gettempdir()) / f"emma_unity_{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_unity.cpp"
    text = "// generated by emma_mamba.ops.cuda_emulator: one translation unit of\n" + "".join(
        f'#include "{Path(f).resolve()}"\n' for f in files)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return str(path)


@contextlib.contextmanager
def _compiler_without_preload():
    """The compiler and linker run without the ASan runtime this process may have been started with."""
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        yield
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def use_sanitized_cpu_kernels(module) -> None:
    """From now on the ``cpu`` backend runs ``module`` (from :func:`load_cpu_sanitized`)."""
    from . import _kernel_cache, kernels_of
    from . import _lock as ops_lock

    with ops_lock:
        _kernel_cache["cpu"] = kernels_of(module, "_cpu")


def asan_environment() -> dict[str, str]:
    """Environment variables for a child process that imports the sanitised emulator: the compiler's ASan
    runtime preloaded (it must come first), leak checks off (the interpreter's own allocations), abort on the
    first error with its report on stderr."""
    import subprocess

    try:  # the runtime of the compiler that builds the extensions ("libasan.so" alone: it has none)
        lib = subprocess.run(["c++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    except OSError:
        lib = ""
    return {"LD_PRELOAD": lib, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"}


# The sanitised child never runs Triton, and must not import it: torch._dynamo (which emma_mamba.ops imports)
# imports triton when it is installed, and triton 3.8's libtriton throws a C++ exception while it initialises (caught
# inside it), which aborts a process with the ASan runtime preloaded ("AddressSanitizer: CHECK failed:
# asan_interceptors.cpp:320", in __interceptor___cxa_throw): None in sys.modules makes `import triton` an
# ImportError, i.e. not installed.
_NO_TRITON = "import sys\nsys.modules['triton'] = None\n"


def sanitized_child(script: str, **env) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment of a Python child that runs ``script`` with the ASan runtime preloaded
    (:func:`asan_environment`, plus ``env``) and Triton hidden, so that it can import the sanitised builds; None
    when the compiler has no ASan runtime."""
    import sys

    full = dict(os.environ, **asan_environment(), **env)
    if not os.path.isfile(full["LD_PRELOAD"]):
        return None
    return [sys.executable, "-c", _NO_TRITON + script], full


def set_schedule(order: str = "forward", seed: int = 0) -> None:
    """Order in which runnable threads (and blocks) run between synchronisation points: "forward",
    "reverse" or "random" (seeded). A kernel whose results change with it has a race."""
    load().set_schedule(order, int(seed))
