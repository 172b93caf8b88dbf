"""What the benchmark scripts of this folder share: their options (``--out``, counts), the machine record of a
result and writing it. The record is :func:`emma_mamba.bench.record.machine_info`, the one every ``emma-mamba
bench`` command writes too; results go under ``./bench_results/`` unless ``--out`` names another file (the
committed ``benchmarks/results/`` files are written with an explicit ``--out``)."""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from emma_mamba.bench import record
from emma_mamba.bench.record import default_out, out_path, positive_int  # noqa: F401

_START: dict | None = None  # parse_args's record of the run's start


def run_script(main) -> int:
    """``main()``'s exit status; Ctrl-C ends the script in one line, exit status 130 (these scripts write their
    result when every measurement is done, so an interrupted one writes none)."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"\n{sys.argv[0]}: interrupted (Ctrl-C): no result written; a finished run writes its JSON at the end",
              file=sys.stderr)
        return 130


def add_out(p: argparse.ArgumentParser, name: str | None, help: str | None = None) -> None:
    """``--out``, checked when parsed (a bad path fails before the run); default ``bench_results/<name>``
    (``name`` None: no file unless given)."""
    where = f"default {default_out(name)}" if name else "default: none written"
    p.add_argument("--out", type=out_path, default=default_out(name) if name else None,
                   help=f"{help or 'JSON output path'} ({where})")


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``p.parse_args(argv)``, and the run's start recorded for :func:`machine`: the command line (``sys.argv``,
    or the parser's name and ``argv`` when a caller passes them) and the load average now."""
    global _START
    args = p.parse_args(argv)
    _START = record.run_start(None if argv is None else [p.prog, *argv])
    return args


def machine(device: torch.device | str | None, threads: int | None) -> dict:
    """:func:`emma_mamba.bench.record.machine_info`: platform, CPU model and cores, the kernels' instruction set,
    versions and git commit, threads, the device and the kernel backend that ran there, the GPU's name on one, the
    command line and the load average when :func:`parse_args` ran and now."""
    return record.machine_info(device, threads, _START or record.run_start())


def random_lm(preset: str, threads: int):
    """(a random-weight MambaLM of ``preset``'s shapes in eval mode, the GPT-NeoX tokenizer), seed 0, with
    ``threads`` torch threads."""
    from emma_mamba.models.mamba import MambaConfig, MambaLM
    from emma_mamba.models.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return MambaLM(MambaConfig.from_preset(preset)).eval(), load_tokenizer()


class PeakMemory:
    """Peak memory of what runs between construction and :meth:`mib`: on a GPU the peak allocated memory above
    the allocation at the start; on the CPU the process's peak resident memory (``ru_maxrss``) above its
    resident memory at the start (meaningful in a fresh process, whose earlier peak is not higher)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            import resource

            with open("/proc/self/statm") as f:
                self.base = int(f.read().split()[1]) * resource.getpagesize()

    def mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        import resource

        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / 2**20


def write_result(doc: dict, out: str | None, indent: int = 2) -> None:
    """Write ``doc`` as JSON to ``out`` (its folder created; nothing when ``out`` is empty) and say so."""
    if out:
        record.write_json(doc, out, indent=indent)
        print(f"wrote {out}")


def lm_step_parser(doc: str, out: str | None):
    """The options of the scripts that time a Mamba LM's training step (shape, repeats, threads, device, dtype,
    output file ``bench_results/<out>``; ``out`` None: none unless given), with their defaults: a 768-wide, 4-layer
    LM on 2 x 512 tokens, fp32 on the CPU."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--d-model", type=positive_int, default=768)
    p.add_argument("--n-layer", type=positive_int, default=4)
    p.add_argument("--vocab", type=positive_int, default=1024,
                   help="vocabulary (default small: a 50k head and its loss would dominate a CPU step)")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seqlen", type=positive_int, default=512)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: fp32 weights under bf16 autocast, as the trainer runs on a GPU")
    add_out(p, out)
    return p


@contextlib.contextmanager
def saved_storages(params):
    """Inside: every distinct storage autograd saves for the backward, parameters excluded, counted into the
    yielded dict ({data_ptr: bytes}; ``sum(d.values())`` is what the forward keeps). Exact on any device."""
    param_ptrs = {q.untyped_storage().data_ptr() for q in params}
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        yield kept
