"""Chunked prefill in continuous batching: how long answers already streaming stall while a long prompt arrives.

    python benchmarks/serve_prefill_chunk.py [--preset mamba-130m] [--streams 4] [--long-prompt 2048]
                                             [--chunks 0 256 512] [--device cpu]

The decoder of `emma-mamba serve` (:class:`emma_mamba.inference.batching.BatchDecoder`, in-process, no HTTP) on
a random-weight LM: ``streams`` greedy answers decode together; right after the ``--warm-steps``-th decode step a
request with a ``long-prompt``-position prompt arrives (one new token; submitted from the decoder's own thread,
so that the point of arrival does not depend on when a polling thread wakes), and the streams go on to
``new-tokens``. For each ``prefill_chunk`` (0: the whole prompt between two decode steps) it measures the gaps
between consecutive decode steps (the inter-token latency every stream sees) from the moment the long request
arrives until it has its token, the long request's time to first token, and the streams' total time; the
streams' tokens must be equal under every setting (checked). Printed and written as JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (add_out, machine, parse_args, positive_int, random_lm, run_script,  # noqa: E402
                                write_result)


def _job(ids, new_tokens: int):
    from emma_mamba.inference.batching import DecodeJob
    from emma_mamba.inference.generate import GenerationConfig

    # finished on the decoder's thread: its clock, not the waiting thread's wake-up (late on a busy machine)
    return DecodeJob(GenerationConfig(max_new_tokens=new_tokens), lambda: {"input_ids": ids},
                     lambda seq, state, stats: {"tokens": list(seq.tokens), "t_done": time.perf_counter(), **stats})


def _round(lm, args, chunk: int, device: torch.device) -> dict:
    from emma_mamba.inference import batching

    dec = batching.BatchDecoder(lm, max_batch=args.streams + 1, prefill_chunk=chunk)
    steps: list[float] = []
    real = batching.decode_step
    arrival: dict = {}
    arrived = threading.Event()

    def timed(*a, **k):  # the end of every decode step (a token for every stream)
        out = real(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steps.append(time.perf_counter())
        if len(steps) == args.warm_steps:  # the long request arrives now: admitted before the next step
            arrival["job"], arrival["t"] = dec.submit(_job(long, 1)), steps[-1]
            arrived.set()
        return out

    batching.decode_step = timed
    try:
        g = torch.Generator().manual_seed(1)
        vocab = lm.config.vocab_size
        short = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(args.streams)]
        long = torch.randint(0, vocab, (args.long_prompt,), generator=g).tolist()
        with dec.hold():
            streams = [dec.submit(_job(ids, args.new_tokens)) for ids in short]
        if not arrived.wait(3600):
            raise RuntimeError("the streams never reached --warm-steps decode steps")
        t_arrive, arrive_step = arrival["t"], args.warm_steps
        got = arrival["job"].wait(timeout=3600)
        t_first = got["t_done"]  # its first (and only) token picked
        answers = [s.wait(timeout=3600) for s in streams]
        t_end = time.perf_counter()
    finally:
        batching.decode_step = real
        dec.close()
    # gaps between consecutive steps from the long request's arrival until its token was there
    window = [t for t in steps[arrive_step - 1:] if t <= t_first] + [t_first]
    gaps = [b - a for a, b in zip(window, window[1:])]
    all_gaps = [b - a for a, b in zip(steps, steps[1:])]
    return {"prefill_chunk": chunk, "long_prompt_ttft_s": t_first - t_arrive,
            "long_prompt_prefill_chunks": got["prefill_chunks"],
            "max_gap_while_prefilling_s": max(gaps), "steps_while_prefilling": len(window) - 2,
            "median_gap_s": statistics.median(all_gaps), "streams_total_s": t_end - steps[0],
            "stream_tokens": [a["tokens"] for a in answers]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mamba-130m", help="LM shapes (random weights)")
    p.add_argument("--streams", type=int, default=4, help="answers decoding when the long prompt arrives")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each stream decodes")
    p.add_argument("--warm-steps", type=int, default=8, help="decode steps before the long prompt arrives")
    p.add_argument("--long-prompt", type=int, default=2048, help="positions of the arriving prompt")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 512], help="prefill_chunk settings (0: off)")
    p.add_argument("--runs", type=int, default=2, help="rounds over every setting (order alternating)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--device", default="cpu")
    add_out(p, 'serve_prefill_chunk_cpu.json')
    args = parse_args(p, argv)
    if args.warm_steps < 1:
        p.error("--warm-steps must be at least 1 (the long prompt arrives after that decode step)")
    if args.new_tokens <= args.warm_steps + 1:
        p.error("--new-tokens must exceed --warm-steps + 1 (the streams must still decode when the prompt arrives)")
    device = torch.device(args.device)
    lm, _ = random_lm(args.preset, args.threads)
    lm = lm.to(device)
    with torch.inference_mode():  # untimed warm-up: a prefill of the long prompt's length and a few steps
        lm(input_ids=torch.zeros(1, args.long_prompt, dtype=torch.long, device=device), num_last_tokens=1)
    _round(lm, argparse.Namespace(**{**vars(args), "long_prompt": 64, "new_tokens": args.warm_steps + 4}), 32,
           device)
    runs = []
    for k in range(args.runs):
        order = args.chunks if k % 2 == 0 else list(reversed(args.chunks))
        row = {c: _round(lm, args, c, device) for c in order}
        ref = row[args.chunks[0]]["stream_tokens"]
        for c, r in row.items():
            if r.pop("stream_tokens") != ref:
                raise SystemExit(f"run {k + 1}: the streams' tokens differ with prefill_chunk {c}")
            print(f"run {k + 1} prefill_chunk {c:5d}: long prompt TTFT {r['long_prompt_ttft_s']:6.2f} s "
                  f"({r['long_prompt_prefill_chunks']} chunks); streams' longest gap {r['max_gap_while_prefilling_s']:6.3f} s, "
                  f"{r['steps_while_prefilling']} steps meanwhile; median gap {r['median_gap_s'] * 1e3:6.1f} ms; "
                  f"streams done in {r['streams_total_s']:6.2f} s", flush=True)
        runs.append([row[c] for c in args.chunks])
    summary = {}
    for i, c in enumerate(args.chunks):
        summary[str(c)] = {key: statistics.median(run[i][key] for run in runs)
                           for key in ("long_prompt_ttft_s", "max_gap_while_prefilling_s", "streams_total_s")}
    res = {"benchmark": "serve_prefill_chunk", "preset": args.preset, "weights": "random", "streams": args.streams,
           "new_tokens": args.new_tokens, "warm_steps": args.warm_steps, "long_prompt": args.long_prompt,
           "dtype": "float32" if device.type == "cpu" else str(next(lm.parameters()).dtype),
           "decoding": "greedy, in-process BatchDecoder", **machine(device, args.threads), "runs": runs,
           "median": summary}
    write_result(res, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
