"""What the benchmark scripts of this folder share: the machine record of a result and writing it."""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path

import torch


def machine(device: torch.device, threads: int) -> dict:
    """Platform, torch, threads, device, the kernel backend that ran, and the GPU's name on one."""
    from emma_mamba import ops

    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": threads, "device": str(device), "backend": ops.get_backend(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


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
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=indent) + "\n")
        print(f"wrote {out}")


def lm_step_parser(doc: str, out: str):
    """The options of the scripts that time a Mamba LM's training step (shape, repeats, threads, device, dtype,
    output file), with their defaults: a 768-wide, 4-layer LM on 2 x 512 tokens, fp32 on the CPU."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024,
                   help="vocabulary (default small: a 50k head and its loss would dominate a CPU step)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: fp32 weights under bf16 autocast, as the trainer runs on a GPU")
    p.add_argument("--out", default=out)
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
