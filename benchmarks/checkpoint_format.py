"""Writing and resuming a training checkpoint under FSDP2: checkpoint.format full (gathered to rank 0) vs sharded
(torch.distributed.checkpoint, every rank its own shards) vs sharded-async (checkpoint.async_save: the shards copied
to host memory, written by a background thread; ``blocked_s`` is how long training waits, ``save_s`` until the
checkpoint is complete).

Runs ``torchrun --nproc_per_node N`` (gloo on CPUs, NCCL on GPUs) of this script for each format, alternating
``--repeats`` times. Each run builds the tiny preset's EmmaMamba with a wider, deeper LM (``--d-model``,
``--n-layer``: 1024 x 24 is ~0.2 B parameters), shards it with the trainer's FSDP2 wrapping, takes one AdamW step
(the optimizer's moments exist), then times ``save_checkpoint`` and, into a freshly built model and optimizer,
``load_checkpoint``; the resident memory of every rank is sampled every 2 ms during each (peak above the value
just before), and the restored parameters and moments are checked bit for bit against the saved ones.

    python benchmarks/checkpoint_format.py --nproc 2 --out benchmarks/results/checkpoint_format_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


class RssPeak:
    """Peak resident memory of this process while the block runs, above its value at the start (MiB)."""

    def __enter__(self):
        import resource

        self._page = resource.getpagesize()
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.base) / 2**20


def _build(args, info):
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba
    from emma_mamba.training.optim import build_optimizer, build_scheduler
    from emma_mamba.training.parallel import wrap_model
    from emma_mamba.training.config import TrainConfig

    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, d_model=args.d_model, n_layer=args.n_layer))
    torch.manual_seed(0)
    model = EmmaMamba(cfg.validate(), for_training=True, load_pretrained=False, device=info.device)
    model.set_stage("finetune")
    wrap_model(model, "fsdp", info)
    tc = TrainConfig()
    opt = build_optimizer(model, tc)
    return model, opt, build_scheduler(opt, tc, 10)


def _local(model, opt) -> dict:
    """This rank's parameter shards and AdamW moments, as plain tensors (for the bit-for-bit check)."""
    out = {}
    for n, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        out[n] = t.detach().clone()
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.ndim:
                out[f"{n}:{k}"] = (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
    return out


def worker(args) -> None:
    from emma_mamba.training.checkpoint import load_checkpoint, save_checkpoint
    from emma_mamba.training.parallel import barrier, destroy_distributed, init_distributed

    torch.set_num_threads(args.threads)
    info = init_distributed()
    model, opt, sched = _build(args, info)
    ids = torch.randint(0, model.config.lm.vocab_size, (1, 64), device=info.device)
    ids[0, 0] = model.image_token_id
    labels = ids.clone()
    labels[0, 0] = -100
    pixels = torch.randn(1, 3, *model.vision.image_size, device=info.device)
    instr = model.tokenize_instructions(["What is in the image?"]).to(info.device)
    model(ids, pixel_values=pixels, labels=labels, instruction_ids=instr).loss["total"].backward()  # every trained parameter
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    saved = _local(model, opt)
    n_params = sum(p.numel() for p in model.parameters())
    barrier()
    with RssPeak() as mem_save:
        t0 = time.perf_counter()
        out = save_checkpoint(Path(args.dir), 1, model, opt, sched, {"step": 1}, None, info,
                              fmt=args.fmt.split("-")[0], async_save=args.fmt.endswith("-async"))
        blocked_s = time.perf_counter() - t0
        path = out if isinstance(out, Path) else out.wait()
        save_s = time.perf_counter() - t0
        barrier()
    del model, opt, sched
    model, opt, sched = _build(args, info)
    barrier()
    with RssPeak() as mem_load:
        t0 = time.perf_counter()
        load_checkpoint(path, model, opt, sched, info)
        load_s = time.perf_counter() - t0
    got = _local(model, opt)
    same = got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    row = {"rank": info.rank, "save_s": save_s, "blocked_s": blocked_s, "save_peak_rss_mib": mem_save.mib,
           "load_s": load_s,
           "load_peak_rss_mib": mem_load.mib, "restored_bitwise": same}
    rows = [None] * info.world_size
    torch.distributed.all_gather_object(rows, row)
    if info.is_main:
        files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
        Path(args.result).write_text(json.dumps({"params": n_params, "ranks": rows, "files": files}))
    destroy_distributed()


def main(argv=None) -> int:
    from _common import add_out, parse_args, positive_int

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=24)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=positive_int, default=2)
    p.add_argument("--formats", nargs="+", default=["full", "sharded", "sharded-async"],
                   choices=["full", "sharded", "sharded-async"])
    add_out(p, None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fmt", default="full", help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parse_args(p, argv)
    if args.worker:
        worker(args)
        return 0
    from _common import write_result

    runs = []
    for rep in range(args.repeats):
        for fmt in args.formats:
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "result.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                       __file__, "--worker", "--fmt", fmt, "--dir", str(Path(tmp) / "run"), "--result", str(result),
                       "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--threads", str(args.threads)]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"{fmt} run failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
                doc = json.loads(result.read_text())
            doc.update(format=fmt, repeat=rep)
            runs.append(doc)
            r0 = doc["ranks"][0]
            others = doc["ranks"][1:]
            print(f"{fmt:13s} rep {rep}: save {r0['save_s']:.2f} s, training blocked {r0['blocked_s']:.2f} s "
                  f"(rank 0 +{r0['save_peak_rss_mib']:.0f} MiB, others "
                  f"+{max((o['save_peak_rss_mib'] for o in others), default=0):.0f}), load {r0['load_s']:.2f} s "
                  f"(rank 0 +{r0['load_peak_rss_mib']:.0f} MiB), bytes {sum(doc['files'].values()) / 2**20:.0f} MiB, "
                  f"restored bit for bit: {all(x['restored_bitwise'] for x in doc['ranks'])}")
    from _common import machine

    write_result({"benchmark": "checkpoint_format", "command": " ".join(["python", *sys.argv]),
                  "machine": machine(torch.device("cpu"), args.threads), "nproc": args.nproc,
                  "lm": {"d_model": args.d_model, "n_layer": args.n_layer}, "params": runs[0]["params"],
                  "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    from _common import run_script

    sys.exit(run_script(main))
