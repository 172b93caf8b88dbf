"""Packing vs padding throughput of one training step on the same samples.

    python -m emma_mamba.training.bench_packing --json data/shapes/train/stage2_instruct.json \\
        --image-folder data/shapes/images [--samples 48] [--max-length 256] [--stage finetune] [--reps 4]

Takes the first ``--samples`` records of a seeded shuffle, and times one optimizer step over all of them
(gradient accumulation over the micro-batches, then one AdamW update) in three layouts: padded (``--pad-rows``
samples per micro-batch, each padded to the longest of its micro-batch) in the shuffled order, padded with the
samples grouped by length (``data.group_by_length``, the trainer's default: longest first), and packed (rows of
``--max-length`` positions filled greedily in the shuffled order, ``--pack-rows`` rows per micro-batch). They
alternate, best of ``--reps``; the step objective is the same (token-weighted, see the trainer), so only the
layout differs.
Reports real tokens (text + visual, no padding) per second and the fill (real / computed positions).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emma_mamba.training.bench_packing", description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--image-folder", required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", default="finetune", choices=("pretrain", "finetune"))
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pad-rows", type=int, default=8)
    p.add_argument("--pack-rows", type=int, default=3)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as work:  # the two trainers' output folders
        return _measure(args, work)


def _measure(args, work: str) -> int:
    import torch

    from emma_mamba.data.llava import group_by_length, plan_rows
    from emma_mamba.training.config import run_config_from_dict
    from emma_mamba.training.trainer import Trainer, _MicroBatches

    trainers = {}
    for packing in (False, True):
        cfg = run_config_from_dict({
            "stage": args.stage, "output_dir": f"{work}/packing_{packing}", "model": args.preset,
            "data": {"json": args.json, "image_folder": args.image_folder, "max_length": args.max_length,
                     "packing": packing},
            "train": {"global_batch_size": 1, "micro_batch_size": 1, "max_steps": 1},
            "log": {"progress_bar": False, "jsonl": False, "tensorboard": False}}, source="bench_packing")
        trainers[packing] = Trainer(cfg, device=args.device)
    lengths = trainers[False].dataset.lengths
    ids = [r[0] for r in plan_rows(lengths, 0, 0, False, args.max_length)][:args.samples]
    rows, cur, used = [], [], 0  # greedy packing of the same samples, same order (as plan_rows does)
    for i in ids:
        if cur and used + lengths[i] > args.max_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    rows.append(cur)
    plans = {"padding": [[[i] for i in ids[k:k + args.pad_rows]] for k in range(0, len(ids), args.pad_rows)],
             "padding_grouped": group_by_length([[i] for i in ids], lengths, args.pad_rows, 1)[0],
             "packing": [rows[k:k + args.pack_rows] for k in range(0, len(rows), args.pack_rows)]}
    mbs = {}
    for name, plan in plans.items():
        packing = name == "packing"
        t = trainers[packing]
        ds = _MicroBatches(t.dataset, plan, t.model.tokenizer.pad_token_id, packing)
        mbs[name] = [ds[j] for j in range(len(ds))]
    best, stats = dict.fromkeys(plans, float("inf")), {}
    for _ in range(args.reps):
        for name in plans:
            t0 = time.perf_counter()
            m = trainers[name == "packing"].train_step(mbs[name])
            best[name] = min(best[name], time.perf_counter() - t0)
            stats[name] = m
    out = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "preset": args.preset, "stage": args.stage, "samples": len(ids), "max_length": args.max_length}
    for name in plans:
        m = stats[name]
        out[name] = {"micro_batches": len(plans[name]), "real_tokens": m["tokens"], "positions": m["positions"],
                     "fill": round(m["tokens"] / m["positions"], 3), "best_step_s": round(best[name], 3),
                     "tokens_per_s": round(m["tokens"] / best[name], 1)}
        print(f"{name}: {len(plans[name])} micro-batches, {m['tokens']} real tokens in {m['positions']} positions "
              f"(fill {m['tokens'] / m['positions']:.2f}), best step {best[name]:.2f} s, "
              f"{m['tokens'] / best[name]:.0f} tokens/s")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
