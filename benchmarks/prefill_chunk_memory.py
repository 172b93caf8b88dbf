"""Peak memory and time of prefilling one long prompt whole or in chunks (`GenerationConfig.prefill_chunk`).

    python benchmarks/prefill_chunk_memory.py [--preset mamba-130m] [--seqlen 16384] [--chunks 0 4096 1024 256]
                                              [--device cpu]

Each setting runs in a fresh process (0: the whole prompt in one forward): a random-weight LM of the preset's
shapes prefills a ``seqlen``-token prompt through ``generate(max_new_tokens=1)``. On the CPU the peak is the
process's peak resident memory above what it held just before the prefill (``ru_maxrss``); on a GPU the peak
allocated memory above the allocation before it. The first picked token must be the same under every setting
(checked). Printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (PeakMemory, add_out, machine, parse_args, positive_int, run_script,  # noqa: E402
                                write_result)


def _child(args) -> dict:
    import time

    from emma_mamba.inference.generate import GenerationConfig, generate
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    lm = MambaLM(MambaConfig.from_preset(args.preset), device=dev).eval()
    ids = torch.randint(0, lm.config.vocab_size, (args.seqlen,), generator=torch.Generator().manual_seed(1))
    cfg = GenerationConfig(max_new_tokens=1, eos_token_id=None, prefill_chunk=args.chunk or None)
    generate(lm, input_ids=ids[:64].tolist(), config=cfg)  # warm-up (kernels, allocator)
    probe = PeakMemory(dev)
    t = time.perf_counter()
    with torch.inference_mode():
        res = generate(lm, input_ids=ids, config=cfg)
    peak = probe.mib()
    return {"prefill_chunk": args.chunk, "seconds": time.perf_counter() - t, "peak_above_start_mib": peak,
            "first_token": res.sequences[0][0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mamba-130m", help="LM shapes (random weights)")
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 1024, 256], help="settings (0: whole)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--device", default="cpu")
    add_out(p, 'prefill_chunk_memory_cpu.json')
    p.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # the child's setting
    args = parse_args(p, argv)
    if args.chunk is not None:
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for c in args.chunks:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--seqlen", str(args.seqlen),
               "--threads", str(args.threads), "--device", args.device, "--chunk", str(c)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"prefill_chunk {c:6d}: {row['seconds']:7.2f} s, peak {row['peak_above_start_mib']:8.1f} MiB above the "
              f"start", flush=True)
    if len({r["first_token"] for r in rows}) != 1:
        raise SystemExit(f"the first token differs between settings: {[r['first_token'] for r in rows]}")
    res = {"benchmark": "prefill_chunk_memory", "preset": args.preset, "weights": "random", "seqlen": args.seqlen,
           "dtype": "float32" if args.device == "cpu" else "model default", **machine(torch.device(args.device),
                                                                                       args.threads),
           "rows": rows}
    write_result(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
