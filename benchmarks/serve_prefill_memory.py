"""Peak memory and time of `serve`'s decoder prefilling one long prompt with nothing else decoding.

    python benchmarks/serve_prefill_memory.py [--preset mamba-130m] [--seqlen 16384] [--echo-seqlen 8192]

Two requests, each in a fresh process, through :class:`emma_mamba.inference.batching.BatchDecoder` (what `serve`
runs): a ``seqlen``-token prompt continued by one token (the prefill: 1024 positions per forward on the CPU, as
``generate``'s default), and an ``echo-seqlen``-token prompt scored token by token (``/v1/completions`` with
``echo`` and ``logprobs``: the logits of at most ``ECHO_CHUNK`` positions at a time). On the CPU the peak is the
process's peak resident memory above what it held just before the request (``ru_maxrss``); on a GPU the peak
allocated memory above the allocation before it. Printed and written as JSON with the picked token and the
prompt's summed log-probability (to compare runs of different versions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (PeakMemory, add_out, machine, parse_args, positive_int, random_lm,  # noqa: E402
                                run_script, write_result)


def _child(args) -> dict:
    import time

    from emma_mamba.inference.batching import BatchDecoder, DecodeJob
    from emma_mamba.inference.generate import GenerationConfig

    lm, _ = random_lm(args.preset, args.threads)
    dev = torch.device(args.device)
    lm.to(dev)
    n = args.seqlen if args.mode == "prefill" else args.echo_seqlen
    ids = torch.randint(0, lm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    echo = args.mode == "echo"
    dec = BatchDecoder(lm)

    def request(x):
        spec = {"input_ids": x, "logprobs": 0, "echo_logprobs": True} if echo else {"input_ids": x}
        job = DecodeJob(GenerationConfig(max_new_tokens=1, eos_token_id=None), lambda: spec,
                        lambda seq, state, stats: (seq.tokens, stats["prompt_logprobs"]))
        return dec.submit(job).wait(timeout=3600)

    try:
        request(ids[:64])  # warm-up
        probe = PeakMemory(dev)
        t = time.perf_counter()
        tokens, prompt_lp = request(ids)
        seconds = time.perf_counter() - t
        peak = probe.mib()
    finally:
        dec.close()
    return {"request": "echo + logprobs" if echo else "prefill + 1 token", "seqlen": n, "seconds": seconds,
            "peak_above_start_mib": peak, "token": tokens[0],
            "prompt_logprob_sum": sum(lp for lp, _ in prompt_lp) if echo else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mamba-130m", help="LM shapes (random weights)")
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--echo-seqlen", type=int, default=8192)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--device", default="cpu")
    add_out(p, 'serve_prefill_memory_cpu.json')
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # the child's request
    args = parse_args(p, argv)
    if args.mode is not None:
        print(json.dumps(_child(args)))
        return 0
    rows = []
    for mode in ("prefill", "echo"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--seqlen", str(args.seqlen),
               "--echo-seqlen", str(args.echo_seqlen), "--threads", str(args.threads), "--device", args.device,
               "--mode", mode]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['request']:>18} ({row['seqlen']} tokens): {row['seconds']:7.2f} s, peak "
              f"{row['peak_above_start_mib']:8.1f} MiB above the start", flush=True)
    res = {"benchmark": "serve_prefill_memory", "preset": args.preset, "weights": "random",
           "dtype": "float32" if args.device == "cpu" else "model default",
           **machine(torch.device(args.device), args.threads), "rows": rows}
    write_result(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
