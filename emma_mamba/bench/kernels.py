"""`emma-mamba bench kernels`: our selective scan against the reference and peer implementations, in one run.

On the CPU (default when no GPU is present) it times, on the same tensors:

* ours     - ``emma_mamba.ops.selective_scan`` on the ``cpu`` backend (C++ chunked kernel);
* ref      - the fp32 reference loop of ``emma_mamba.ops.reference`` (the oracle, not a competitor);
* mambapy  - mambapy's two scans: the parallel ``pscan`` (Blelloch over a materialised (b, l, d, n)
  tensor) and the sequential loop, called as mambapy's ``MambaBlock`` calls them;
* exp floor - a bare ``torch.exp`` over b·d·l·n elements into a preallocated output: the cost of the
  discretisation ``exp(delta * A)`` alone, i.e. the floor for any implementation that evaluates it.

forward and forward+backward, at mamba-130m shapes (d=1536, n=16, L=512 and 2048) and mamba-2.8b shapes
(d=5120, n=16, L=2048), batch 1 and 2, fp32; median over repeats after a warm-up. Peak memory of
forward+backward is measured per implementation in a fresh subprocess (peak RSS above the inputs), since the
CPU allocator keeps no statistics. Ratios are printed and everything is written as JSON under
benchmarks/results/ with the machine, versions and shapes.

On a GPU (``--device cuda``) it delegates to :mod:`emma_mamba.bench.kernels_gpu`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

DEFAULT_SHAPES = ["1536x16x512", "1536x16x2048", "5120x16x2048"]  # d x n x L


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: cuda when available)")
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="DxNxL",
                   help="selective-scan shapes as d x dstate x seqlen (default: mamba-130m and mamba-2.8b)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2], help="batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop repeating a slow measurement after this many seconds (at least one run)")
    p.add_argument("--skip", nargs="*", default=[], choices=["ref", "mambapy_pscan", "mambapy_seq", "memory"],
                   help="measurements to leave out")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seq-bwd-max-len", type=int, default=256,
                   help="time mambapy's sequential scan backward only up to this seqlen: its autograd indexes "
                        "(b, l, d, n) tensors per step, so its backward grows as L^2 (over 8 min at L=2048)")
    p.add_argument("--out", default=None,
                   help="JSON output path (default: benchmarks/results/kernels_<device>.json)")


# ---------------------------------------------------------------------------------------------------------
# inputs and implementations


def parse_shape(s: str) -> tuple[int, int, int]:
    try:
        d, n, l = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"emma-mamba bench kernels: --shapes entry {s!r} is not DxNxL (e.g. 1536x16x2048)")
    return d, n, l


def make_inputs(b, d, n, l, seed=0, requires_grad=False):
    """Mamba-like inputs: positive delta (already softplus-ed), S4D-real A, variable B and C, D skip."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, l, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, d, l, generator=g) - 4.0)  # dt ~ [1e-3, 1e-1]
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # (d, n)
    B = torch.randn(b, n, l, generator=g)
    C = torch.randn(b, n, l, generator=g)
    D = torch.ones(d)
    t = SimpleNamespace(u=u, delta=delta, A=A, B=B, C=C, D=D)
    if requires_grad:
        for k in ("u", "delta", "A", "B", "C", "D"):
            getattr(t, k).requires_grad_(True)
    return t


def _ours(backend):
    import emma_mamba.ops as ops

    def fn(t):
        with ops.use_backend(backend):
            return ops.selective_scan(t.u, t.delta, t.A, t.B, t.C, t.D)
    return fn


def _mambapy(kind):
    """mambapy's scans on the same tensors, in its (b, l, d) layout (the transposes are part of the call)."""
    from mambapy.mamba import MambaBlock

    def fn(t):
        d, n = t.A.shape
        x, delta = t.u.transpose(1, 2), t.delta.transpose(1, 2)  # (b, l, d)
        B, C = t.B.transpose(1, 2), t.C.transpose(1, 2)  # (b, l, n)
        if kind == "pscan":
            y = MambaBlock.selective_scan(None, x, delta, t.A, B, C, t.D)
        else:
            this = SimpleNamespace(config=SimpleNamespace(d_inner=d, d_state=n))
            y = MambaBlock.selective_scan_seq(this, x, delta, t.A, B, C, t.D)
        return y.transpose(1, 2)
    return fn


def implementations(skip):
    impls = {"ours": _ours("cpu")}
    if "ref" not in skip:
        impls["ref"] = _ours("torch")
    try:
        import mambapy  # noqa: F401
        if "mambapy_pscan" not in skip:
            impls["mambapy_pscan"] = _mambapy("pscan")
        if "mambapy_seq" not in skip:
            impls["mambapy_seq"] = _mambapy("seq")
    except ImportError:
        print("mambapy is not installed (pip install mambapy, or the [peers] extra): peers skipped",
              file=sys.stderr)
    return impls


# ---------------------------------------------------------------------------------------------------------
# timing


def _time(fn, repeats, max_seconds):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def time_impl(impl, b, d, n, l, repeats, max_seconds, backward=True):
    t = make_inputs(b, d, n, l)
    with torch.inference_mode():
        fwd = _time(lambda: impl(t), repeats, max_seconds)
    if not backward:
        return fwd, None
    tg = make_inputs(b, d, n, l, requires_grad=True)
    dout = torch.randn(b, d, l)

    def fwd_bwd():
        for k in ("u", "delta", "A", "B", "C", "D"):
            getattr(tg, k).grad = None
        impl(tg).backward(dout)
    fb = _time(fwd_bwd, repeats, max_seconds)
    return fwd, fb


def time_exp_floor(b, d, n, l, repeats, max_seconds):
    x = torch.randn(b, d, l, n)
    y = torch.empty_like(x)
    return _time(lambda: torch.exp(x, out=y), repeats, max_seconds)


_MEM_CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from emma_mamba.bench.kernels import implementations, make_inputs, _peak_rss_bytes
b, d, n, l = {shape}
impl = implementations([])[{name!r}]
t = make_inputs(b, d, n, l, requires_grad=True)
dout = torch.randn(b, d, l)
before = _peak_rss_bytes()
impl(t).backward(dout)
print(_peak_rss_bytes() - before)
"""


def _peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM belongs to the current address space, so unlike getrusage's ru_maxrss
    (which after fork+exec starts at the parent's peak) it counts only what this process touched."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_fwd_bwd(name, b, d, n, l):
    """Peak RSS above the inputs, in bytes, of one forward+backward in a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _MEM_CHILD.format(root=root, shape=(b, d, n, l), name=name)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return int(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------


def machine_info():
    import emma_mamba
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "emma_mamba": emma_mamba.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import mambapy
        from importlib.metadata import version
        info["mambapy"] = version("mambapy")
        del mambapy
    except Exception:
        pass
    return info


def _fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:9.2f}"


def run_cpu(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    import emma_mamba.ops as ops
    status = ops.available_backends()["cpu"]
    if status != "available":
        raise SystemExit(f"emma-mamba bench kernels: {status}")
    impls = implementations(args.skip)
    rows = []
    for shape in args.shapes:
        d, n, l = parse_shape(shape)
        for b in args.batch:
            row = {"batch": b, "d": d, "dstate": n, "seqlen": l, "dtype": "float32",
                   "fwd_s": {}, "fwd_bwd_s": {}, "peak_mem_fwd_bwd_bytes": {}}
            for name, impl in impls.items():
                backward = not (name == "mambapy_seq" and l > args.seq_bwd_max_len)
                fwd, fb = time_impl(impl, b, d, n, l, args.repeats, args.max_seconds, backward)
                row["fwd_s"][name] = fwd
                if fb is not None:
                    row["fwd_bwd_s"][name] = fb
                print(f"  b={b} d={d} n={n} L={l} {name:<14} fwd {_fmt_ms(fwd)} ms  fwd+bwd "
                      f"{_fmt_ms(fb) if fb is not None else '  skipped (L > --seq-bwd-max-len)'} ms", flush=True)
                if "memory" not in args.skip and name != "ref" and fb is not None:
                    row["peak_mem_fwd_bwd_bytes"][name] = peak_memory_fwd_bwd(name, b, d, n, l)
            row["exp_floor_s"] = time_exp_floor(b, d, n, l, args.repeats, args.max_seconds)
            ours_f, ours_fb = row["fwd_s"]["ours"], row["fwd_bwd_s"]["ours"]
            peers = [k for k in ("mambapy_pscan", "mambapy_seq") if k in row["fwd_s"]]
            ratios = {"fwd_vs_exp_floor": ours_f / row["exp_floor_s"]}
            if peers:
                best_f = min(row["fwd_s"][k] for k in peers)
                best_fb = min(row["fwd_bwd_s"][k] for k in peers if k in row["fwd_bwd_s"])
                ratios["fwd_speedup_vs_best_mambapy"] = best_f / ours_f
                ratios["fwd_bwd_speedup_vs_best_mambapy"] = best_fb / ours_fb
            if "ref" in row["fwd_s"]:
                ratios["fwd_speedup_vs_ref"] = row["fwd_s"]["ref"] / ours_f
                ratios["fwd_bwd_speedup_vs_ref"] = row["fwd_bwd_s"]["ref"] / ours_fb
            row["ratios"] = ratios
            rows.append(row)
            print(f"  -> exp floor {_fmt_ms(row['exp_floor_s'])} ms; " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
    return {"benchmark": "selective_scan", "device": "cpu", "machine": machine_info(),
            "backend": "cpu", "results": rows}


def print_table(res):
    print()
    print("| b | d | n | L | ours fwd ms | exp floor ms | ours/floor | best mambapy fwd ms | fwd speedup | "
          "ours fwd+bwd ms | best mambapy fwd+bwd ms | fwd+bwd speedup | peak MB ours / mambapy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["results"]:
        f, fb, mem, ra = r["fwd_s"], r["fwd_bwd_s"], r["peak_mem_fwd_bwd_bytes"], r["ratios"]
        peers = [k for k in ("mambapy_pscan", "mambapy_seq") if k in f]
        bf = min((f[k] for k in peers), default=None)
        bfb = min((fb[k] for k in peers if k in fb), default=None)
        pm = [mem.get(k) for k in peers if mem.get(k) is not None]
        mem_s = (f"{mem['ours'] / 2**20:.0f} / {min(pm) / 2**20:.0f}"
                 if mem.get("ours") is not None and pm else "-")
        print(f"| {r['batch']} | {r['d']} | {r['dstate']} | {r['seqlen']} | {_fmt_ms(f['ours']).strip()} | "
              f"{_fmt_ms(r['exp_floor_s']).strip()} | {ra['fwd_vs_exp_floor']:.2f} | {_fmt_ms(bf).strip()} | "
              f"{ra.get('fwd_speedup_vs_best_mambapy', float('nan')):.1f}x | {_fmt_ms(fb['ours']).strip()} | "
              f"{_fmt_ms(bfb).strip()} | {ra.get('fwd_bwd_speedup_vs_best_mambapy', float('nan')):.1f}x | "
              f"{mem_s} |")


def run(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("emma-mamba bench kernels: --device cuda but torch sees no CUDA GPU")
        from emma_mamba.bench import kernels_gpu
        res = kernels_gpu.run_gpu(args)
    else:
        res = run_cpu(args)
        print_table(res)
    out = args.out or os.path.join("benchmarks", "results", f"kernels_{device}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"\nwrote {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emma_mamba.bench.kernels", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
