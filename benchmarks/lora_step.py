"""A training step of the Mamba LM with LoRA adapters (`train.lora`) against full fine-tuning, on the same weights
and batch: time (forward, backward, AdamW step), trainable parameters, the gradient and AdamW state memory, and
the activations the forward keeps for the backward (saved-tensor hooks, parameters excluded).

    python benchmarks/lora_step.py [--d-model 768 --n-layer 4 --batch 2 --seqlen 512 --rank 64 --threads 2]

Both variants run interleaved, ``--repeats`` times after a warm-up; medians. Printed and written as JSON.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (lm_step_parser, machine, parse_args, run_script, saved_storages,  # noqa: E402
                                write_result)


def main(argv=None) -> int:
    from emma_mamba.models.lora import apply_lora
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    p = lm_step_parser(__doc__, "lora_step_cpu.json")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--targets", nargs="+", default=["in_proj", "x_proj", "out_proj"])
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    full = MambaLM(MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab), device=dev).train()
    lora = copy.deepcopy(full)
    apply_lora(lora, args.rank, 2.0 * args.rank, tuple(args.targets))
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device=dev)
    amp = args.dtype == "bfloat16"
    models = {"full": full, "lora": lora}
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-5) for k, m in models.items()}

    kept = {}

    def step(name, measure=False):
        m, opt = models[name], opts[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp), \
                saved_storages(list(m.parameters())) if measure else contextlib.nullcontext({}) as saved:
            logits = m(ids).logits
        if measure:
            kept[name] = sum(saved.values())
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # the gradients' memory stays counted
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    first = {k: step(k, measure=True) for k in models}
    times = {k: [] for k in models}
    for r in range(args.repeats):
        for k in (models if r % 2 == 0 else reversed(list(models))):
            times[k].append(step(k))

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    rows = {}
    for k, m in models.items():
        trained = [q for q in m.parameters() if q.requires_grad]
        state = [v for s in opts[k].state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
        rows[k] = {"median_seconds": statistics.median(times[k]), "seconds": times[k], "first_seconds": first[k],
                   "trainable_params": sum(q.numel() for q in trained),
                   "grad_mib": nbytes([q.grad for q in trained]) / 2**20, "adamw_state_mib": nbytes(state) / 2**20,
                   "kept_activations_mib": kept[k] / 2**20}
    ratio = rows["lora"]["median_seconds"] / rows["full"]["median_seconds"]
    for k, r in rows.items():
        print(f"{k:5s} step {r['median_seconds'] * 1e3:8.1f} ms  trainable {r['trainable_params'] / 1e6:7.2f} M  "
              f"gradients {r['grad_mib']:7.1f} MiB  AdamW state {r['adamw_state_mib']:7.1f} MiB  "
              f"activations kept {r['kept_activations_mib']:7.1f} MiB")
    print(f"LoRA step / full step: {ratio:.2f}")
    res = {"benchmark": "lora_step", "d_model": args.d_model, "n_layer": args.n_layer, "vocab": args.vocab,
           "batch": args.batch, "seqlen": args.seqlen, "rank": args.rank, "alpha": 2.0 * args.rank,
           "targets": args.targets, "dtype": args.dtype, "repeats": args.repeats,
           **machine(dev, args.threads), "rows": rows, "lora_over_full_time": ratio}
    write_result(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
