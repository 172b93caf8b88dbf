"""What a Mamba LM training step keeps for its backward, and what it costs in time, three ways on the same weights
and batch: every activation kept (``train.mixer_recompute: false``), the mixers recomputing their conv output,
delta and scan output in the backward (``ops.mamba_inner``, the default), and whole-block gradient checkpointing
(``train.gradient_checkpointing``).

    python benchmarks/activation_memory.py [--d-model 768 --n-layer 4 --batch 2 --seqlen 512 --threads 2]
    python benchmarks/activation_memory.py --device cuda --dtype bfloat16 --d-model 2560 --n-layer 8 \\
        --batch 4 --seqlen 2048 --out benchmarks/results/activation_memory_cuda.json        # a GPU

Kept bytes: every distinct storage autograd saves during the forward (saved-tensor hooks; exact on any device,
parameters excluded). On a GPU also the step's peak allocated memory above what was allocated before it
(activations, the gradients it produces, workspaces). Step times: the three variants interleaved, ``--repeats`` times after a warm-up, medians; the
losses and gradients must agree (checked). Printed and written as JSON.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (lm_step_parser, machine, parse_args, run_script, saved_storages,  # noqa: E402
                                write_result)

VARIANTS = {"keep_all": (False, False), "mixer_recompute": (True, False), "block_checkpointing": (False, True)}


def main(argv=None) -> int:
    from emma_mamba import ops
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    args = parse_args(lm_step_parser(__doc__, "activation_memory_cpu.json"), argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)
    lm = MambaLM(cfg, device=dev).train()
    params = list(lm.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device=dev)
    amp = args.dtype == "bfloat16"
    cuda = dev.type == "cuda"

    def step(variant, measure=False):
        recompute, ckpt = VARIANTS[variant]
        lm.set_mixer_recompute(recompute)
        lm.set_gradient_checkpointing(ckpt)

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t = time.perf_counter()
        with saved_storages(params) if measure else contextlib.nullcontext({}) as kept, \
                torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = lm(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        grads = torch.autograd.grad(loss, params)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(dev) - base if cuda else None
        return secs, loss.detach(), grads, sum(kept.values()) if measure else None, peak

    first, kept, peak, ref = {}, {}, {}, None
    for v in VARIANTS:
        secs, loss, grads, kept[v], peak[v] = step(v, measure=True)
        first[v] = secs
        if ref is None:
            ref = (loss, grads)
        tol = 5e-2 if amp else 1e-4
        assert float((loss - ref[0]).abs()) < tol, (v, float(loss), float(ref[0]))
        rel = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(grads, ref[1]))
        assert rel < tol * 10, (v, rel)
        del grads
    times = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            times[v].append(step(v)[0])
    med = {v: statistics.median(ts) for v, ts in times.items()}
    unit = args.batch * cfg.d_inner * args.seqlen * (2 if amp else 4)  # one (b, d_inner, l) activation
    doc = {
        "what": "Mamba LM training step: activations kept for the backward and step time, three ways",
        "command": "python benchmarks/activation_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(dev, args.threads),
        "shape": {"d_model": args.d_model, "d_inner": cfg.d_inner, "n_layer": args.n_layer, "vocab": args.vocab,
                  "batch": args.batch, "seqlen": args.seqlen, "dtype": "bf16 autocast" if amp else "fp32"},
        "kept_bytes": kept,
        "kept_per_layer_in_d_inner_activations": {v: kept[v] / args.n_layer / unit for v in VARIANTS},
        "peak_bytes_above_step_start": peak if cuda else None,
        "seconds_median": med,
        "seconds_all": times,
        "first_step_seconds": first,
        "ratio_vs_keep_all": {v: {"kept": kept[v] / kept["keep_all"], "time": med[v] / med["keep_all"]}
                              for v in VARIANTS},
    }
    print(f"d_model {args.d_model} x {args.n_layer} layers, batch {args.batch} x {args.seqlen}, {dev}, "
          f"{doc['shape']['dtype']}, {args.threads} threads, backend {ops.get_backend(dev)}")
    for v in VARIANTS:
        r = doc["ratio_vs_keep_all"][v]
        print(f"  {v:<20} kept {kept[v] / 2**20:9.1f} MiB ({r['kept']:.2f}x, "
              f"{doc['kept_per_layer_in_d_inner_activations'][v]:.2f} d_inner-activations/layer)"
              + (f"  peak {peak[v] / 2**20:9.1f} MiB" if cuda else "")
              + f"  step {med[v] * 1e3:8.1f} ms ({r['time']:.2f}x)")
    write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
