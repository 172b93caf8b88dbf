"""CPU causal conv1d (width 4, SiLU): our `cpu` kernel against the torch reference, in one run.

    python benchmarks/conv_cpu.py [--out benchmarks/results/conv_cpu.json] [--threads 1]

Forward and forward+backward medians (fp32) at the quickstart's training shape (batch 8 rows of 256 tokens,
d_inner 128) and at mamba-130m's d_inner (1536), each without and with seq_idx (4 packed samples per row: the
conv window resets at each boundary). The reference is `emma_mamba.ops.reference` (torch ops, autograd).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402

SHAPES = ((8, 128, 256), (1, 1536, 2048), (4, 1536, 1024))


def median_ms(fn, n: int = 30) -> float:
    from emma_mamba.bench.lm import _median_time

    return _median_time(fn, repeats=n, warmup=3)[0] * 1e3


def main(argv=None) -> int:
    from emma_mamba import ops

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out(p, None)
    p.add_argument("--threads", type=positive_int, default=1)
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    rows = []
    for b, d, l in SHAPES:
        for packed in (False, True):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, d, l, generator=g, requires_grad=True)
            w = torch.randn(d, 4, generator=g, requires_grad=True)
            bias = torch.randn(d, generator=g, requires_grad=True)
            dout = torch.randn(b, d, l, generator=g)
            seq = None
            if packed:
                seq = torch.zeros(b, l, dtype=torch.int32)
                for cut in range(l // 4, l, l // 4):
                    seq[:, cut:] += 1
            row = {"b": b, "d": d, "L": l, "seq_idx": packed, "ms": {}}
            for backend in ("cpu", "torch"):
                with ops.use_backend(backend):
                    def fwd():
                        return ops.causal_conv1d(x, w, bias, seq_idx=seq, activation="silu")

                    def fwd_bwd():
                        torch.autograd.backward(fwd(), dout)
                        x.grad = w.grad = bias.grad = None

                    with torch.no_grad():
                        row["ms"][f"{backend}.fwd"] = round(median_ms(fwd), 3)
                    row["ms"][f"{backend}.fwd_bwd"] = round(median_ms(fwd_bwd), 3)
            t = row["ms"]
            row["speedup_vs_reference"] = {k: round(t[f"torch.{k}"] / t[f"cpu.{k}"], 2) for k in ("fwd", "fwd_bwd")}
            rows.append(row)
            print(f"b={b} d={d} L={l} seq_idx={packed!s:5}  cpu fwd {t['cpu.fwd']:.2f} ms, fwd+bwd "
                  f"{t['cpu.fwd_bwd']:.2f} ms   reference {t['torch.fwd']:.2f} / {t['torch.fwd_bwd']:.2f} ms   "
                  f"speedup {row['speedup_vs_reference']['fwd']}x / {row['speedup_vs_reference']['fwd_bwd']}x",
                  flush=True)
    res = {"benchmark": "causal_conv1d cpu vs reference", "dtype": "float32", "width": 4, "activation": "silu",
           **machine(torch.device("cpu"), args.threads),
           "backends": ["cpu", "torch"], "rows": rows}  # "backend": what the dispatch picks; each row times both
    write_result(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
