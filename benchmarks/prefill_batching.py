"""Prefill of a batch of prompts of different lengths: one batch per distinct length (the previous scheme), one
left-padded batch with seq_idx boundaries, and what `generate` does on the device (padded batches, capped in
positions on the CPU), on the same random-weight Mamba LM.

    python benchmarks/prefill_batching.py [--preset mamba-130m] [--batch 8] [--base 576] [--spread 40] [--threads 2]
    python benchmarks/prefill_batching.py --device cuda --dtype bfloat16 --preset mamba-2.8b --out ...   # a GPU

The prompts imitate an evaluation batch: ``--base`` positions of image tokens plus a question of 4 ... 4+spread
tokens (all lengths distinct, so the per-length scheme runs one forward per prompt). The schemes run
interleaved, ``--repeats`` times (medians), and must give the same next-token logits and states (checked).
Printed and written as JSON: seconds of each, positions computed (padding included) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402


def main(argv=None) -> int:
    from emma_mamba.inference.generate import PREFILL_PAD_WASTE, _prefill, default_max_positions, prefill_groups
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))  # the first paragraph
    p.add_argument("--preset", default="mamba-130m")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--base", type=int, default=576, help="image tokens of every prompt (LLaVA-1.5: 576)")
    p.add_argument("--spread", type=int, default=40, help="question lengths vary over this many tokens")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_out(p, 'prefill_batching_cpu.json')
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    lm = MambaLM(MambaConfig.from_preset(args.preset), device=dev, dtype=getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    lengths = [args.base + 4 + int(x) for x in torch.randperm(args.spread + 1, generator=g)[:args.batch]]
    prompts = [(torch.randint(0, lm.config.vocab_size, (n,), generator=g).to(dev), None) for n in lengths]

    def run(scheme):
        cache = lm.allocate_cache(len(prompts))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = _prefill(lm, prompts, cache, *scheme)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, logits, cache

    schemes = {"per_length": (0.0, None), "padded": (PREFILL_PAD_WASTE, None),
               "default": (PREFILL_PAD_WASTE, default_max_positions(dev))}
    times = {k: [] for k in schemes}
    with torch.inference_mode():
        outs = {k: run(w) for k, w in schemes.items()}  # warm-up, and the results to compare
        for _ in range(args.repeats):
            for k, w in schemes.items():
                times[k].append(run(w)[0])
    (_, la, ca), (_, lb, cb), (_, lc, cc) = outs["per_length"], outs["padded"], outs["default"]
    logit_diff = max(float((la - x).abs().max()) for x in (lb, lc))
    state_diff = max(float((x - y).abs().max()) for other in (cb, cc)
                     for x, y in zip(ca.ssm_states + ca.conv_states, other.ssm_states + other.conv_states))
    tol = 1e-3 if args.dtype == "float32" else 0.25  # bf16/fp16 GEMMs of other shapes round differently
    assert logit_diff < tol and state_diff < tol, (logit_diff, state_diff)
    groups = {k: prefill_groups(lengths, *w) for k, w in schemes.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    doc = {
        "what": "prefill of prompts of different lengths: one left-padded batch with seq_idx vs one batch per length",
        "command": "python benchmarks/prefill_batching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(dev, args.threads),
        "model": {"preset": args.preset, "d_model": lm.config.d_model, "n_layer": lm.config.n_layer,
                  "dtype": str(lm.dtype)},
        "prompt_lengths": lengths,
        "forwards": {k: len(v) for k, v in groups.items()},
        "positions_computed": {k: sum(len(gr) * max(lengths[i] for i in gr) for gr in v) for k, v in groups.items()},
        "seconds_median": med,
        "seconds_all": times,
        "default_max_positions": default_max_positions(dev),
        "speedup_over_per_length": {k: med["per_length"] / med[k] for k in ("padded", "default")},
        "max_abs_diff": {"next_token_logits": logit_diff, "states": state_diff},
    }
    print(f"{args.preset}, {len(lengths)} prompts of {min(lengths)}-{max(lengths)} tokens, {dev}, {args.threads} threads")
    for k in schemes:
        print(f"  {k:<10} {doc['forwards'][k]} forward(s), {doc['positions_computed'][k]} positions: {med[k]:.3f} s")
    sp = doc["speedup_over_per_length"]
    print(f"  speed over per_length: padded {sp['padded']:.2f}x, default {sp['default']:.2f}x; "
          f"max |diff| logits {logit_diff:.1e}, states {state_diff:.1e}")
    write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
