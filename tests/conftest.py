"""Shared pytest setup: the `gpu` marker skips without CUDA; seeds are fixed per test; pytest-xdist workers share
the cores.

On a machine without an NVIDIA driver the Triton kernels can only run under Triton's interpreter, and Triton
reads TRITON_INTERPRET when it is first imported, so it is set here, before anything imports torch or triton.

Under ``-n N`` each of the N worker processes would otherwise run torch (and every process its tests start) with
one OpenMP thread per core: on 2 cores, two workers ran 4 spinning threads, and a sample of the suite (the trainer,
LoRA and LM tests) took 287 s against 107 s with one thread per worker. So each worker, and the processes it
starts, gets cores // N threads (at least 1), unless OMP_NUM_THREADS is set; tests that need several threads (the
thread-count determinism checks) set them explicitly.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _worker_threads() -> int | None:
    """Threads per pytest-xdist worker (None outside xdist or where OMP_NUM_THREADS is set)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


_THREADS = _worker_threads()
if _THREADS is not None:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # before torch starts its pool; inherited by child processes

import pytest  # noqa: E402
import torch  # noqa: E402

if _THREADS is not None:
    torch.set_num_threads(_THREADS)  # (in case a plugin imported torch before this file)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def tree_env() -> dict:
    """The environment of a torchrun child: one thread, and the emma_mamba of the tree under test first on its path
    (a script runs from its own folder, where the installed package would be imported instead)."""
    from pathlib import Path

    import emma_mamba

    root = str(Path(emma_mamba.__file__).resolve().parents[1])
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_forced_backend():
    """A command run in-process with ``--backend`` forces the ops' backend for the whole process (right for a
    command, which is a process of its own): restored after each test, so that it does not leak into the tests
    that run after it in the same worker (the compile tests then traced the torch reference, not the kernels)."""
    from emma_mamba import ops

    before = ops._forced
    yield
    if ops._forced != before:
        ops.set_backend(before)
