"""Associative recall of a small Mamba LM, trained from scratch: why ShapesWorld's POPE questions are hard for
the quickstart's 2-block, 64-wide LM, and what the embedding init and the question's position change.

    python benchmarks/recall_probe.py [--steps 2000] [--out benchmarks/results/recall_probe.json]

Task: 1-4 "objects" followed by a query, then the answer (yes/no: is the query among the objects?), trained
with AdamW (lr 1e-3, wd 0.1, batch 64) on the last position's logits and scored on 1000 fresh samples
(chance 50 %). Four settings:

- ``single``: an object is one token of 40 (the plain recall of Zoology, Arora et al. 2023).
- ``pair, objects first``: an object is two tokens, colour (8) then kind (5), as "red circle" is in
  ShapesWorld; the query pair comes after the objects (a question after its image).
- ``pair, query first``: the same with the query before the objects (what instruction-aware fusion gives
  the LM: the question is present where the visual tokens are read).

each with the embedding init std of mamba-ssm (0.02) and of transformers' MambaConfig (0.1, the tiny preset's).
One torch thread; the seed fixes model init and data.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import add_out, machine, parse_args, positive_int, run_script, write_result  # noqa: E402

N_COLOURS, N_KINDS, N_SINGLE = 8, 5, 40


def make_task(kind: str, rng: random.Random):
    """Returns (vocab size, batch(b) -> (ids (b, l), labels (b,)))."""
    if kind == "single":
        sep, yes, no, pad = N_SINGLE, N_SINGLE + 1, N_SINGLE + 2, N_SINGLE + 3
        items = list(range(N_SINGLE))

        def encode(objs, q):
            return objs + [pad] * (4 - len(objs)) + [sep, q, sep]
    else:
        base = N_COLOURS + N_KINDS
        sep, yes, no, pad = base, base + 1, base + 2, base + 3
        items = [(c, k) for c in range(N_COLOURS) for k in range(N_KINDS)]
        query_first = kind == "pair-query-first"

        def encode(objs, q):
            body = [t for c, k in objs for t in (c, N_COLOURS + k)] + [pad] * (2 * (4 - len(objs)))
            qt = [q[0], N_COLOURS + q[1]]
            return qt + [sep] + body + [sep] if query_first else body + [sep] + qt + [sep]

    def batch(b):
        xs, ys = [], []
        for _ in range(b):
            objs = rng.sample(items, rng.randint(1, 4))
            if rng.random() < 0.5:
                q, y = rng.choice(objs), yes
            else:
                q, y = rng.choice([o for o in items if o not in objs]), no
            xs.append(encode(objs, q))
            ys.append(y)
        return torch.tensor(xs), torch.tensor(ys)

    return pad + 1, batch


def run(kind: str, init_std: float, steps: int, seed: int = 0) -> dict:
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab, batch = make_task(kind, rng)
    lm = MambaLM(MambaConfig(d_model=64, n_layer=2, d_state=8, vocab_size=vocab, initializer_range=init_std))
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.1)
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batch(64)
        loss = F.cross_entropy(lm(input_ids=x).logits[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps:
            with torch.no_grad():
                x, y = batch(1000)
                acc = (lm(input_ids=x).logits[:, -1].argmax(-1) == y).float().mean().item()
            curve.append({"step": step, "accuracy": acc})
    return {"task": kind, "init_std": init_std, "curve": curve, "final_accuracy": curve[-1]["accuracy"],
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, default=2000)
    add_out(p, "recall_probe.json")
    args = parse_args(p, argv)
    torch.set_num_threads(1)
    rows = []
    for kind in ("single", "pair-objects-first", "pair-query-first"):
        for std in (0.02, 0.1):
            r = run(kind, std, args.steps)
            rows.append(r)
            print(f"{kind:<20} init std {std:<5} accuracy " +
                  " ".join(f"{c['step']}:{100 * c['accuracy']:.0f}%" for c in r["curve"]) + f"  ({r['seconds']:.0f}s)",
                  flush=True)
    doc = {"what": "associative recall of a 2-block, 64-wide Mamba LM from scratch (benchmarks/recall_probe.py)",
           "steps": args.steps, "batch": 64, "optimizer": "AdamW lr 1e-3 wd 0.1", "chance": 0.5, "rows": rows,
           **machine(torch.device("cpu"), 1)}
    write_result(doc, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
