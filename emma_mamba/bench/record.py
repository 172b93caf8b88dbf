"""What every benchmark result shares: the record of the machine and the run, the checked options, the output file.

One place for the self-description of a result JSON (``emma-mamba bench kernels|lm|latency`` and the scripts of
``benchmarks/``, through ``benchmarks/_common.machine``): :func:`machine_info`. A run takes :func:`run_start` when
it starts (the command line and the load average then) and passes it to :func:`machine_info` when it records,
which adds the load average at that moment. Also the argparse types of the benchmark options (counts that must be
positive, an ``--out`` that can be written), :func:`default_out` (results go under ``./bench_results/`` unless
``--out`` says otherwise: never into the committed ``benchmarks/results/``), :func:`write_json` (atomic) and
:func:`interrupted` (what Ctrl-C leaves: the finished sections, marked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from emma_mamba.cli import positive_int  # noqa: F401 - the project's count type, one of this module's option types
from emma_mamba.envinfo import _dist_version, cpu_isa_of
from emma_mamba.fileio import output_problem

DEFAULT_DIR = "bench_results"
"""Where a benchmark writes its JSON when ``--out`` is not given: relative to the working directory, and never the
committed ``benchmarks/results/`` (whose files are written with an explicit ``--out``)."""


def default_out(name: str) -> str:
    """``bench_results/<name>``: a benchmark's default output path."""
    return os.path.join(DEFAULT_DIR, name)


# ------------------------------------------------------------------------------------------ the machine record

def git_commit() -> str | None:
    """The commit of the checkout emma_mamba runs from (None outside a git checkout or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out if len(out) == 40 and all(c in "0123456789abcdef" for c in out) else None


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_isa() -> str | None:
    """The instruction set the compiled CPU kernels run with (``emma_mamba._C.cpu_isa()``), or why not."""
    try:
        from emma_mamba import _C
    except Exception as e:  # noqa: BLE001 - no build, or a broken one
        return f"unavailable ({type(e).__name__})"
    isa, error = cpu_isa_of(_C)
    return f"error: {error}" if error else isa


def load_average() -> list[float] | None:
    try:
        return [round(x, 3) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def run_start(argv: list[str] | None = None) -> dict:
    """What a run records when it starts: its command line (``sys.argv`` unless given) and the load average."""
    return {"argv": list(sys.argv if argv is None else argv), "loadavg_1_5_15_before": load_average(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def machine_info(device=None, threads: int | None = None, start: dict | None = None) -> dict:
    """The self-description of a result: platform, CPU model and cores, the CPU kernels' instruction set, versions
    (python, torch, CUDA, emma_mamba and its git commit, transformers, mambapy), torch's thread count (and the
    ``threads`` asked for), the device with the kernel backend that runs there and the GPU's name, the command
    line and the load average at the start (``start``: :func:`run_start`'s) and now."""
    import torch

    import emma_mamba

    model = cpu_model()
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or model or platform.machine(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpu_isa": cpu_isa(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "emma_mamba": emma_mamba.__version__,
        "git_commit": git_commit(),
        "transformers": _dist_version("transformers"),
        "mambapy": _dist_version("mambapy"),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        from emma_mamba import ops

        device = torch.device(device)
        info["device"] = str(device)
        try:
            info["backend"] = ops.get_backend(device)
        except Exception as e:  # noqa: BLE001 - the record must not fail a finished run
            info["backend"] = f"unavailable: {e}"
        info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    start = start or {}
    info["argv"] = start.get("argv", list(sys.argv))
    info["started"] = start.get("started")
    info["loadavg_1_5_15_before"] = start.get("loadavg_1_5_15_before")
    info["loadavg_1_5_15_after"] = load_average()
    return info


# ---------------------------------------------------------------------------------------- checked options

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not x >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return x


def out_problem(path: str) -> str | None:
    """Why ``path`` cannot be written as an output file (None: it can): :func:`emma_mamba.fileio.output_problem`,
    with the advice a ``--out`` option needs where it names a directory."""
    return output_problem(path, what="--out names a file")


def out_path(text: str) -> str:
    """argparse type of ``--out``: checked when the options are parsed, so a bad path fails before the run."""
    problem = out_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


class UniqueValues(argparse.Action):
    """``nargs='+'``: a value given twice is an error naming it (the values keep their order)."""

    sort = False

    def __call__(self, parser, namespace, values, option_string=None):
        dup = sorted({v for v in values if values.count(v) > 1}, key=str)
        if dup:
            raise argparse.ArgumentError(self, f"given more than once: {' '.join(map(_show, dup))}")
        setattr(namespace, self.dest, sorted(values) if self.sort else list(values))


class SortedUnique(UniqueValues):
    """``nargs='+'`` of numbers: sorted ascending; a value given twice is an error naming it."""

    sort = True


def _show(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# ------------------------------------------------------------------------------------------------ the output

def saver(path: str, device=None, threads: int | None = None, start: dict | None = None):
    """``save(doc)``: ``doc["machine"]`` brought up to date (:func:`machine_info`: the load average now), then
    ``doc`` written to ``path``; a run calls it after each section, so a run cut short keeps what it measured."""
    def save(doc: dict) -> None:
        doc["machine"] = machine_info(device, threads, start)
        write_json(doc, path)
    return save


def write_json(doc: dict, path: str, indent: int = 2) -> None:
    """Write ``doc`` to ``path`` (folders created) through a temporary file, so that a reader (or a run stopped
    in the middle of the write) never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def interrupted(doc: dict | None, path: str | None) -> int:
    """Ctrl-C: ``doc`` (the sections finished so far) written to ``path`` with ``"interrupted": true``, one line
    on stderr, and the exit status of a process stopped by SIGINT (130)."""
    where = ""
    if doc is not None and path:
        doc["interrupted"] = True
        try:
            write_json(doc, path)
            where = f" (the finished sections are in {path})"
        except OSError as e:
            where = f" (could not write {path}: {e})"
    print(f"interrupted{where}", file=sys.stderr)
    return 130
