"""The activation copies a Mamba LM makes, and the time of a training step and of a batched decode step.

    python benchmarks/mixer_copies.py [--d-model 768 --n-layer 4 --batch 2 --seqlen 512 --decode-batch 8]

Counts every aten clone / copy_ / contiguous of a tensor of the mixer's sizes with a TorchDispatchMode: (batch, d_inner,
seqlen) in a training step (forward and backward), (decode batch, d_inner) and (decode batch, d_state) in a decode
step. Then times, without the mode, the training step (forward + backward, medians of --repeats after a warm-up)
and one decode step of --decode-batch sequences (medians of --decode-steps steps). The kernels read the mixer's
views of its in_proj / x_proj outputs in place (unit stride in the last dimension), so there should be no copies
to count; run the script in two checkouts for an A/B on one machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import lm_step_parser, machine, parse_args, positive_int, run_script, write_result  # noqa: E402


# the ops a copy shows up as (under inference_mode .contiguous() is not decomposed into clone)
_COPIES = (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten.contiguous.default)


class CopyCounter(TorchDispatchMode):
    """Counts the aten copies (clone, copy_, contiguous) of tensors whose element count is in ``sizes``."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes, self.count = set(sizes), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _COPIES and args[0].numel() in self.sizes:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _median_ms(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    p = lm_step_parser(__doc__, None)
    p.add_argument("--decode-batch", type=positive_int, default=8)
    p.add_argument("--decode-steps", type=positive_int, default=50)
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab)
    lm = MambaLM(cfg, device=dev).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def train_step():
        with amp:
            loss = lm(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        lm.zero_grad(set_to_none=True)

    with CopyCounter({args.batch * cfg.d_inner * args.seqlen}) as seen:
        train_step()
    train_copies = seen.count
    train_step()  # warm-up
    train_ms = _median_ms(train_step, args.repeats, sync)

    lm.eval()
    bd = args.decode_batch
    tok = torch.randint(0, args.vocab, (bd, 1), device=dev)
    with torch.inference_mode(), amp:
        cache = lm.allocate_cache(bd)
        lm(torch.randint(0, args.vocab, (bd, 16), device=dev), cache=cache)
        step = lambda: lm(tok, cache=cache)  # noqa: E731
        with CopyCounter({bd * cfg.d_inner, bd * cfg.d_state}) as seen:
            step()
        decode_copies = seen.count
        for _ in range(5):
            step()
        decode_ms = _median_ms(step, args.decode_steps, sync)

    print(f"d_model {cfg.d_model} x {cfg.n_layer} layers, {args.device}, {args.dtype}, {args.threads} threads")
    print(f"  training step, batch {args.batch} x {args.seqlen}: {train_copies} activation copies, "
          f"{train_ms:.1f} ms (median of {args.repeats})")
    print(f"  decode step, batch {bd}: {decode_copies} copies of x/z/B/C, {decode_ms:.3f} ms "
          f"(median of {args.decode_steps})")
    write_result({
        "what": "Mamba LM: activation copies and step times (training step; batched decode step)",
        "command": "python benchmarks/mixer_copies.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(dev, args.threads),
        "shape": {"d_model": cfg.d_model, "d_inner": cfg.d_inner, "n_layer": cfg.n_layer, "vocab": args.vocab,
                  "batch": args.batch, "seqlen": args.seqlen, "decode_batch": bd, "dtype": args.dtype},
        "train_step": {"activation_copies": train_copies, "ms_median": train_ms},
        "decode_step": {"copies": decode_copies, "ms_median": decode_ms},
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
