"""One Mamba-2 layer, ours against its peers on the same weights: forward and forward + backward.

    python benchmarks/mamba2_layer.py [--device cuda --dtype bfloat16] [--d-model 2560 --batch 8 --seqlen 2048]

Ours is :class:`emma_mamba.models.mamba.Mamba2Mixer` on whichever backend :mod:`emma_mamba.ops` picks: Mamba-2's
recurrence as the selective scan with each head's scalars repeated over its channels (d_state states per
channel). The peers compute the same layer with the SSD algorithm (chunked matmuls): transformers'
``Mamba2Mixer`` (its pure-PyTorch path on the CPU; on a GPU it calls mamba-ssm's kernels when they are
installed) and, on a GPU with mamba-ssm installed, mamba-ssm's own ``Mamba2`` module (Triton SSD kernels,
causal-conv1d). Every peer gets our layer's weights (the parameter names are the same), its output is checked
against ours first, then each is timed (median of ``--repeats`` after a warm-up; CUDA events on a GPU). Printed
and written as JSON: times, the peers' time over ours, the shapes, dtype, device and versions. Defaults: the
mamba2-2.7b layer width (d_model 2560, d_state 128, headdim 64) at batch 1 x 512 on the CPU, fp32.
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


def _ours(args, device, dtype):
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    torch.manual_seed(0)
    cfg = MambaConfig(ssm_layer="mamba2", d_model=args.d_model, n_layer=1, vocab_size=16, d_state=args.d_state,
                      headdim=args.headdim, ngroups=args.ngroups)
    # the whole layer in ``dtype`` (A_log, D and dt_bias too), as the peers are cast: the same weights everywhere
    return MambaLM(cfg, device=device).layers[0].mixer.to(dtype)


def _transformers_peer(mixer, device, dtype):
    import transformers
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    hc = transformers.Mamba2Config(hidden_size=mixer.d_model, state_size=mixer.d_state, num_heads=mixer.nheads,
                                   head_dim=mixer.headdim, n_groups=mixer.ngroups,
                                   expand=mixer.d_inner // mixer.d_model, conv_kernel=mixer.d_conv,
                                   num_hidden_layers=1, vocab_size=16, chunk_size=256)
    peer = HFMixer(hc, layer_idx=0).to(device)
    peer.load_state_dict(mixer.state_dict())
    return peer.to(dtype)


def _mamba_ssm_peer(mixer, device, dtype):
    from mamba_ssm.modules.mamba2 import Mamba2

    peer = Mamba2(d_model=mixer.d_model, d_state=mixer.d_state, headdim=mixer.headdim, ngroups=mixer.ngroups,
                  expand=mixer.d_inner // mixer.d_model, d_conv=mixer.d_conv, device=device)
    peer.load_state_dict(mixer.state_dict())
    return peer.to(dtype)


def _timer(device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=2560)
    p.add_argument("--d-state", type=int, default=128)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    add_out(p, 'mamba2_layer_cpu.json')
    args = parse_args(p, argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ours = _ours(args, device, dtype)
    models = {"ours": ours}
    skipped = {}
    for name, build in (("transformers", _transformers_peer), ("mamba_ssm", _mamba_ssm_peer)):
        if name == "mamba_ssm" and device.type != "cuda":
            skipped[name] = "needs a CUDA device"
            continue
        try:
            models[name] = build(ours, device, dtype)
        except Exception as e:  # noqa: BLE001 - a peer that is not installed or not built: said, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, args.seqlen, args.d_model, device=device, generator=g).to(dtype)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        ref = ours(x).float()
        agree = {}
        for name, m in models.items():
            if name != "ours":
                agree[name] = float((m(x).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
    bad = {k: v for k, v in agree.items() if not v <= tol}
    if bad:
        raise SystemExit(f"the peers' outputs differ from ours (max relative difference {bad}, tolerance {tol})")
    timed = _timer(device)
    dy = torch.randn_like(x)
    rows = {}
    for name, m in models.items():
        xi = x.detach().clone().requires_grad_(not args.no_backward)

        def fwd():
            with torch.no_grad():
                m(x)

        def fwd_bwd():
            m(xi).backward(dy)

        row = {}
        for kind, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            if kind == "fwd_bwd" and args.no_backward:
                continue
            fn()  # warm-up (compiles, autotunes, caches)
            times = [timed(fn) for _ in range(args.repeats)]
            row[f"{kind}_ms"] = statistics.median(times) * 1e3
            row[f"{kind}_runs_ms"] = [t * 1e3 for t in times]
        rows[name] = row
        print(f"{name:<14} " + "  ".join(f"{k[:-3]} {v:9.2f} ms" for k, v in row.items() if not k.endswith("runs_ms")),
              flush=True)
    ratios = {f"{name}_over_ours.{kind}": rows[name][f"{kind}_ms"] / rows["ours"][f"{kind}_ms"]
              for name in rows if name != "ours" for kind in ("fwd", "fwd_bwd") if f"{kind}_ms" in rows[name]}
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x (above 1: ours is faster)")
    for k, v in skipped.items():
        print(f"peer {k} not run: {v}")
    import transformers

    doc = {"benchmark": "mamba2_layer", "machine": {**machine(device, args.threads),
                                                    "transformers": transformers.__version__},
           "shape": {"d_model": args.d_model, "d_inner": ours.d_inner, "d_state": args.d_state, "headdim": args.headdim,
                     "nheads": ours.nheads, "ngroups": args.ngroups, "batch": args.batch, "seqlen": args.seqlen},
           "dtype": args.dtype, "repeats": args.repeats, "statistic": "median",
           "max_rel_diff_vs_ours": agree, "results_ms": rows, "ratios": ratios, "peers_not_run": skipped}
    write_result(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_script(main))
