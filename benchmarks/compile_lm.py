"""torch.compile of the Mamba LM (`train.compile`, `MambaLM.compile_blocks`) against eager, on the same weights
and batches: a training step (forward + backward of the LM loss) and an inference prefill.

    python benchmarks/compile_lm.py [--d-model 768 --n-layer 4 --batch 2 --seqlen 512 --threads 2]
    python benchmarks/compile_lm.py --device cuda --dtype bfloat16 --d-model 2560 --n-layer 8 --batch 4 \\
        --seqlen 2048 --out benchmarks/results/compile_lm_cuda.json                     # a GPU
    python benchmarks/compile_lm.py --frozen-lm --out benchmarks/results/compile_lm_frozen_cpu.json

``--frozen-lm``: stage 1's case, every LM weight frozen and the gradient wanted only for the input embeddings
(what flows back to the projector): the mixers' backward then computes no weight gradient, eager or compiled.

Compiled: each block one Inductor graph (the blocks share it; the kernels of the backend inside as custom ops),
the embedding, final norm and head eager, as the trainer does. Eager and compiled steps run interleaved,
``--repeats`` times after a warm-up (the compiled warm-up includes compiling: reported apart); medians. The two
must agree (loss, gradients, logits; checked). Printed and written as JSON.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import lm_step_parser, machine, parse_args, run_script, write_result  # noqa: E402


def main(argv=None) -> int:
    from emma_mamba import ops
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    p = lm_step_parser(__doc__, "compile_lm_cpu.json")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--frozen-lm", action="store_true",
                   help="freeze every LM weight; the step's gradient is the input embeddings' only (stage 1)")
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)
    eager = MambaLM(cfg, device=dev).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend=args.backend)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device=dev)
    amp = args.dtype == "bfloat16"
    if args.frozen_lm:
        eager.requires_grad_(False), compiled.requires_grad_(False)
        emb = eager.embeddings(ids).detach().requires_grad_()  # the projector's output, as in stage 1

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train_step(m):
        sync()
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = (m(inputs_embeds=emb) if args.frozen_lm else m(ids)).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        grads = torch.autograd.grad(loss, [emb] if args.frozen_lm else list(m.parameters()))
        sync()
        return time.perf_counter() - t, loss.detach(), grads

    def prefill(m):
        sync()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = m(ids, num_last_tokens=1).logits
        sync()
        return time.perf_counter() - t, logits

    first = {"eager_train": train_step(eager)[0], "compiled_train": train_step(compiled)[0]}
    eager.eval(), compiled.eval()
    first.update(eager_prefill=prefill(eager)[0], compiled_prefill=prefill(compiled)[0])
    times = {k: [] for k in first}
    for _ in range(args.repeats):
        eager.train(), compiled.train()
        (te, le, ge), (tc, lc, gc) = train_step(eager), train_step(compiled)
        times["eager_train"].append(te), times["compiled_train"].append(tc)
        eager.eval(), compiled.eval()
        (pe, oe), (pc, oc) = prefill(eager), prefill(compiled)
        times["eager_prefill"].append(pe), times["compiled_prefill"].append(pc)
    tol = 1e-3 if not amp else 5e-2
    diffs = {"loss": float((le - lc).abs()),
             "grad_rel": max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(gc, ge)),
             "logits": float((oe - oc).abs().max())}
    assert diffs["loss"] < tol and diffs["grad_rel"] < tol * 10 and diffs["logits"] < tol * 10, diffs
    med = {k: statistics.median(v) for k, v in times.items()}
    doc = {
        "what": "Mamba LM, each block compiled (torch.compile, custom-op kernels inside) vs eager",
        "command": "python benchmarks/compile_lm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(dev, args.threads),
        "shape": {"d_model": args.d_model, "n_layer": args.n_layer, "vocab": args.vocab, "batch": args.batch,
                  "seqlen": args.seqlen, "dtype": "bf16 autocast" if amp else "fp32"},
        "frozen_lm": args.frozen_lm,
        "compile_backend": args.backend,
        "first_call_seconds": first,
        "seconds_median": med,
        "seconds_all": times,
        "speedup": {"train_step": med["eager_train"] / med["compiled_train"],
                    "prefill": med["eager_prefill"] / med["compiled_prefill"]},
        "max_diff": diffs,
    }
    print(f"d_model {args.d_model} x {args.n_layer} layers, batch {args.batch} x {args.seqlen}, {dev}, "
          f"{doc['shape']['dtype']}, {args.threads} threads, backend {ops.get_backend(dev)}")
    for what in ("train", "prefill"):
        print(f"  {what:<8} eager {med['eager_' + what] * 1e3:8.1f} ms   compiled {med['compiled_' + what] * 1e3:8.1f} ms"
              f"   {doc['speedup']['train_step' if what == 'train' else 'prefill']:.2f}x"
              f"   (first compiled call {first['compiled_' + what]:.1f} s)")
    print(f"  max diff: loss {diffs['loss']:.1e}, gradients (relative) {diffs['grad_rel']:.1e}, logits {diffs['logits']:.1e}")
    write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
