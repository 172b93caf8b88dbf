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
CPU allocator keeps no statistics. Ratios are printed and everything is written as JSON (default
``bench_results/kernels_<device>.json``; ``--out`` elsewhere) with the machine, versions, shapes, the repeats and
every repeat's time, after each shape (a run cut short keeps the finished rows).

On a GPU (``--device cuda``) it delegates to :mod:`emma_mamba.bench.kernels_gpu`: ``--shapes`` and ``--batch`` set
its scan and conv rows, ``--repeats`` and ``--max-seconds`` its timing, ``--quick`` and ``--skip ref peers triton``
what it leaves out; the CPU-only options (``--threads``, ``--seq-bwd-max-len``, ``--skip`` of a mambapy scan or
``memory``) are refused there, as ``--quick`` and ``--skip triton`` are on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from emma_mamba.bench import record

DEFAULT_SHAPES = ["1536x16x512", "1536x16x2048", "5120x16x2048"]  # d x n x L
DEFAULT_BATCH = [1, 2]
DEFAULT_REPEATS = 5
DEFAULT_SEQ_BWD_MAX_LEN = 256
SKIP_CPU = ("ref", "mambapy_pscan", "mambapy_seq", "peers", "memory")  # peers: both mambapy scans
SKIP_GPU = ("ref", "peers", "triton")  # kernels_gpu's


def parse_shape(s: str) -> tuple[int, int, int]:
    """argparse type of a ``--shapes`` entry: ``DxNxL`` with every size >= 1."""
    try:
        d, n, l = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not DxNxL (e.g. 1536x16x2048)") from None
    if min(d, n, l) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: every size must be >= 1")
    return d, n, l


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: cuda when available)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, action=record.UniqueValues, default=None,
                   metavar="DxNxL",
                   help="selective-scan shapes as d x dstate x seqlen (default cpu: mamba-130m and mamba-2.8b, "
                        f"{' '.join(DEFAULT_SHAPES)}; cuda: 5120x16x2048 5120x16x8192; on cuda also the conv rows)")
    p.add_argument("--batch", nargs="+", type=record.positive_int, action=record.SortedUnique, default=None,
                   help="batch sizes (default cpu: 1 2; cuda: 8)")
    p.add_argument("--repeats", type=record.positive_int, default=None,
                   help=f"timed repeats per measurement, median reported (default cpu: {DEFAULT_REPEATS}; cuda: "
                        "kernels_gpu's per measurement)")
    p.add_argument("--max-seconds", type=record.non_negative_float, default=20.0,
                   help="stop repeating a slow measurement after this many seconds (at least one run; the JSON "
                        "says which measurements it cut)")
    p.add_argument("--skip", nargs="*", default=[], choices=sorted(set(SKIP_CPU + SKIP_GPU)),
                   help="measurements to leave out: cpu: ref, mambapy_pscan, mambapy_seq, peers (both), memory; "
                        "cuda: ref, peers (mamba-ssm, causal-conv1d), triton")
    p.add_argument("--quick", action="store_true",
                   help="cuda only: the first scan shape only (L=2048), as `python -m emma_mamba.bench.kernels_gpu "
                        "--quick`")
    p.add_argument("--threads", type=record.positive_int, default=None,
                   help="cpu only: torch.set_num_threads (default: torch's)")
    p.add_argument("--seq-bwd-max-len", type=record.positive_int, default=None,
                   help="cpu only: time mambapy's sequential scan backward only up to this seqlen (default "
                        f"{DEFAULT_SEQ_BWD_MAX_LEN}): its autograd indexes (b, l, d, n) tensors per step, so its "
                        "backward grows as L^2 (over 8 min at L=2048)")
    p.add_argument("--out", type=record.out_path, default=None,
                   help="JSON output path (default: bench_results/kernels_<device>.json)")


def check_options(args, device: str) -> None:
    """Refuse the options that do not apply on ``device``, naming them (before any work)."""
    if device == "cuda":
        bad = [o for o, given in (("--threads", args.threads is not None),
                                  ("--seq-bwd-max-len", args.seq_bwd_max_len is not None)) if given]
        bad += [f"--skip {k}" for k in args.skip if k not in SKIP_GPU]
        if bad:
            raise SystemExit(f"emma-mamba bench kernels: {', '.join(bad)}: CPU-only, not with --device cuda "
                             f"(cuda's --skip: {' '.join(SKIP_GPU)})")
    else:
        bad = (["--quick"] if args.quick else []) + [f"--skip {k}" for k in args.skip if k not in SKIP_CPU]
        if bad:
            raise SystemExit(f"emma-mamba bench kernels: {', '.join(bad)}: --device cuda only")


def _proc_bytes(path: str, key: str) -> int | None:
    """The ``key:`` line of a /proc file given in kB (meminfo, status), in bytes; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def memory_problem(args) -> str | None:
    """Why the CPU run's largest shape would not fit in the available memory (None if it fits or is unknown),
    said before any work instead of an allocation error or the OOM killer halfway. The estimate: the reference
    and mambapy's parallel scan keep ~10 floats per (batch, d, dstate, seqlen) element in a forward+backward
    (measured: 9.9x and 8-10x), the exp floor two, ours under one; plus the inputs and their gradients."""
    avail = _mem_available()
    if avail is None:
        return None
    skip = set(args.skip)
    wide = "ref" not in skip or not ({"peers", "mambapy_pscan"} & skip)
    per_state = 10 if wide else 2
    worst = None
    for d, n, l in args.shapes or [parse_shape(x) for x in DEFAULT_SHAPES]:
        for b in args.batch or DEFAULT_BATCH:
            need = 4 * b * d * l * (per_state * n + 16)
            if worst is None or need > worst[0]:
                worst = (need, f"--shapes {d}x{n}x{l} at --batch {b}")
    if worst is None or worst[0] <= avail:
        return None
    keeps = "the reference and mambapy keep" if wide else "the exp floor keeps"
    return (f"{worst[1]} needs ~{worst[0] / 2**30:.1f} GiB ({keeps} ~{per_state} floats per batch x d x dstate x "
            f"seqlen element), {avail / 2**30:.1f} GiB is available"
            + ("; --skip ref peers lowers it ~5x" if wide else "") + ": choose smaller shapes")


# ---------------------------------------------------------------------------------------------------------
# inputs and implementations


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
    """mambapy's scans in their own layout, as a mambapy ``MambaBlock`` holds its tensors: x and delta (b, l, d),
    B and C (b, l, n), contiguous, the output (b, l, d). The benchmark's (b, d, l) inputs are converted outside
    the timed call (:func:`native_inputs`): transposed views in the call slowed mambapy's forward ~1.9x (its
    scans then walked strided memory), which credited ours with mambapy's layout, not its algorithm."""
    from mambapy.mamba import MambaBlock

    def fn(t):
        d, n = t.A.shape
        if kind == "pscan":
            return MambaBlock.selective_scan(None, t.u, t.delta, t.A, t.B, t.C, t.D)
        this = SimpleNamespace(config=SimpleNamespace(d_inner=d, d_state=n))
        return MambaBlock.selective_scan_seq(this, t.u, t.delta, t.A, t.B, t.C, t.D)

    fn.layout = "bld"
    return fn


def _bld(x: torch.Tensor) -> torch.Tensor:
    """(b, d, l) -> a contiguous (b, l, d) leaf that requires grad as ``x`` does."""
    return x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)


def _takes_bld(impl) -> bool:
    """Whether ``impl`` takes and returns (b, l, d) tensors (mambapy's); ours are (b, d, l)."""
    return getattr(impl, "layout", "bdl") == "bld"


def native_inputs(impl, t):
    """``t`` (make_inputs) in the layout ``impl`` takes: ours (b, d, l) as it is; mambapy's (b, l, d) copies."""
    if not _takes_bld(impl):
        return t
    return SimpleNamespace(A=t.A, D=t.D, **{k: _bld(getattr(t, k)) for k in ("u", "delta", "B", "C")})


def native_grad_output(impl, dout: torch.Tensor) -> torch.Tensor:
    """The output gradient (b, d, l) in ``impl``'s output layout."""
    return dout.transpose(1, 2).contiguous() if _takes_bld(impl) else dout


def output_bdl(impl, y: torch.Tensor) -> torch.Tensor:
    """``impl``'s output as (b, d, l), to compare with ours."""
    return y.transpose(1, 2) if _takes_bld(impl) else y


def implementations(skip):
    impls = {"ours": _ours("cpu")}
    if "ref" not in skip:
        impls["ref"] = _ours("torch")
    if "peers" in skip or {"mambapy_pscan", "mambapy_seq"} <= set(skip):
        return impls
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


def _time(fn, repeats, max_seconds) -> dict:
    """One untimed call, then up to ``repeats`` timed ones (fewer when ``max_seconds`` ran out: ``cut``):
    {"median": s, "runs": [s, ...], "cut": bool}."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return {"median": statistics.median(times), "runs": times, "cut": len(times) < repeats}


def time_impl(impl, b, d, n, l, repeats, max_seconds, backward=True):
    """(forward timing, forward+backward timing or None), each as :func:`_time` gives it; the inputs in the
    implementation's own layout (:func:`native_inputs`), made before the timed calls."""
    t = native_inputs(impl, make_inputs(b, d, n, l))
    with torch.inference_mode():
        fwd = _time(lambda: impl(t), repeats, max_seconds)
    if not backward:
        return fwd, None
    tg = native_inputs(impl, make_inputs(b, d, n, l, requires_grad=True))
    dout = native_grad_output(impl, torch.randn(b, d, l))

    def fwd_bwd():
        for k in ("u", "delta", "A", "B", "C", "D"):
            getattr(tg, k).grad = None
        impl(tg).backward(dout)
    fb = _time(fwd_bwd, repeats, max_seconds)
    return fwd, fb


def agreement(impls, b, d, n, l) -> dict:
    """Each implementation's output against ours on the benchmark's inputs (max |diff|, fp32): the peers compute
    the same scan in their own layout, and a wrong conversion would time something else."""
    t = make_inputs(b, d, n, l)
    with torch.inference_mode():
        ours = impls["ours"](t)
        return {name: (output_bdl(impl, impl(native_inputs(impl, t))) - ours).abs().max().item()
                for name, impl in impls.items() if name != "ours"}


def time_exp_floor(b, d, n, l, repeats, max_seconds) -> dict:
    x = torch.randn(b, d, l, n)
    y = torch.empty_like(x)
    return _time(lambda: torch.exp(x, out=y), repeats, max_seconds)


_MEM_CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from emma_mamba.bench.kernels import implementations, make_inputs, native_grad_output, native_inputs, _peak_rss_bytes
b, d, n, l = {shape}
impl = implementations([])[{name!r}]
t = native_inputs(impl, make_inputs(b, d, n, l, requires_grad=True))
dout = native_grad_output(impl, torch.randn(b, d, l))
before = _peak_rss_bytes()
impl(t).backward(dout)
print(_peak_rss_bytes() - before)
"""


def _peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM belongs to the current address space, so unlike getrusage's ru_maxrss
    (which after fork+exec starts at the parent's peak) it counts only what this process touched."""
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child_failure(res: subprocess.CompletedProcess) -> str:
    """Why a measuring child gave no number: the signal that killed it (SIGKILL: most often the kernel's
    out-of-memory killer) or its exit status and last line of stderr."""
    import signal

    if res.returncode < 0:
        try:
            sig = signal.Signals(-res.returncode).name
        except ValueError:
            sig = f"signal {-res.returncode}"
        why = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
    elif res.returncode != 0:
        why = f"exit status {res.returncode}"
    else:
        why = f"no number in its output ({res.stdout.strip()[-200:]!r})"
    last = [line for line in res.stderr.strip().splitlines() if line.strip()]
    return why + (f": {last[-1][:300]}" if last else "")


def peak_memory_fwd_bwd(name, b, d, n, l) -> tuple[int | None, str | None]:
    """(peak RSS above the inputs in bytes of one forward+backward in a fresh process, None) or (None, why the
    child gave no number)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _MEM_CHILD.format(root=root, shape=(b, d, n, l), name=name)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        if res.returncode == 0:
            return int(res.stdout.strip().splitlines()[-1]), None
    except (ValueError, IndexError):
        pass
    return None, _child_failure(res)


# ---------------------------------------------------------------------------------------------------------


def _fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:9.2f}"


def _fmt_x(v):
    return "-" if v is None else f"{v:.1f}x"


def run_cpu(args, start=None, save=None, res=None) -> dict:
    """The CPU table. ``res`` (a dict, filled in place: what a Ctrl-C leaves) is saved by ``save(res)`` after
    each shape and batch."""
    save = save or (lambda r: None)
    res = {} if res is None else res
    if args.threads:
        torch.set_num_threads(args.threads)
    import emma_mamba.ops as ops
    status = ops.available_backends()["cpu"]
    if status != "available":
        raise SystemExit(f"emma-mamba bench kernels: {status}")
    skip = set(args.skip)
    impls = implementations(skip)
    repeats = args.repeats or DEFAULT_REPEATS
    seq_bwd_max_len = args.seq_bwd_max_len or DEFAULT_SEQ_BWD_MAX_LEN
    rows = []
    res.update({"benchmark": "selective_scan", "device": "cpu",
                "machine": record.machine_info("cpu", args.threads, start), "backend": "cpu", "statistic": "median",
                "warmup": 1, "repeats": repeats,
                "max_seconds": args.max_seconds, "seq_bwd_max_len": seq_bwd_max_len, "skip": sorted(skip),
                "implementations": list(impls), "results": rows, "complete": False})
    for d, n, l in args.shapes or [parse_shape(x) for x in DEFAULT_SHAPES]:
        for b in args.batch or DEFAULT_BATCH:
            row = {"batch": b, "d": d, "dstate": n, "seqlen": l, "dtype": "float32",
                   "fwd_s": {}, "fwd_bwd_s": {}, "fwd_runs_s": {}, "fwd_bwd_runs_s": {},
                   "peak_mem_fwd_bwd_bytes": {}, "cut_by_max_seconds": []}
            row["max_abs_diff_vs_ours"] = diffs = agreement(impls, b, d, n, l)
            if diffs:
                print(f"  b={b} d={d} n={n} L={l} max |output - ours|: "
                      + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
            for name, impl in impls.items():
                backward = not (name == "mambapy_seq" and l > seq_bwd_max_len)
                fwd, fb = time_impl(impl, b, d, n, l, repeats, args.max_seconds, backward)
                for kind, t in (("fwd", fwd), ("fwd_bwd", fb)):
                    if t is None:
                        continue
                    row[f"{kind}_s"][name], row[f"{kind}_runs_s"][name] = t["median"], t["runs"]
                    if t["cut"]:
                        row["cut_by_max_seconds"].append(f"{name}.{kind}")
                cut = [f"{k} {len(t['runs'])} of {repeats} runs" for k, t in (("fwd", fwd), ("fwd+bwd", fb))
                       if t is not None and t["cut"]]
                print(f"  b={b} d={d} n={n} L={l} {name:<14} fwd {_fmt_ms(fwd['median'])} ms  fwd+bwd "
                      + (f"{_fmt_ms(fb['median'])} ms" if fb is not None else "skipped (L > --seq-bwd-max-len)")
                      + (f"  (--max-seconds: {', '.join(cut)})" if cut else ""), flush=True)
                if "memory" not in skip and name != "ref" and fb is not None:
                    t0 = time.perf_counter()
                    mem, why = peak_memory_fwd_bwd(name, b, d, n, l)
                    row["peak_mem_fwd_bwd_bytes"][name] = mem
                    if why is not None:
                        row.setdefault("peak_mem_fwd_bwd_errors", {})[name] = why
                    print(f"    peak memory {name:<14} " + (f"{mem / 2**20:9.1f} MB" if mem is not None
                                                             else f"no number: {why}")
                          + f"  (child process, {time.perf_counter() - t0:.1f} s)", flush=True)
            floor = time_exp_floor(b, d, n, l, repeats, args.max_seconds)
            row["exp_floor_s"], row["exp_floor_runs_s"] = floor["median"], floor["runs"]
            if floor["cut"]:
                row["cut_by_max_seconds"].append("exp_floor")
            row["ratios"] = ratios = _ratios(row)
            rows.append(row)
            print(f"  -> exp floor {_fmt_ms(row['exp_floor_s'])} ms; " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
            save(res)
    res["complete"] = True
    return res


def _ratios(row) -> dict:
    """Ours against the exp floor, the best mambapy scan and the reference, where each was timed."""
    f, fb = row["fwd_s"], row["fwd_bwd_s"]
    ratios = {"fwd_vs_exp_floor": f["ours"] / row["exp_floor_s"]}
    peers = [k for k in ("mambapy_pscan", "mambapy_seq") if k in f]
    if peers:
        ratios["fwd_speedup_vs_best_mambapy"] = min(f[k] for k in peers) / f["ours"]
    peers_fb = [k for k in peers if k in fb]  # mambapy_seq's backward is not timed above --seq-bwd-max-len
    if peers_fb:
        ratios["fwd_bwd_speedup_vs_best_mambapy"] = min(fb[k] for k in peers_fb) / fb["ours"]
    if "ref" in f:
        ratios["fwd_speedup_vs_ref"] = f["ref"] / f["ours"]
        ratios["fwd_bwd_speedup_vs_ref"] = fb["ref"] / fb["ours"]
    return ratios


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
              f"{_fmt_x(ra.get('fwd_speedup_vs_best_mambapy'))} | {_fmt_ms(fb['ours']).strip()} | "
              f"{_fmt_ms(bfb).strip()} | {_fmt_x(ra.get('fwd_bwd_speedup_vs_best_mambapy'))} | {mem_s} |")


def gpu_env(args):
    """kernels_gpu's measuring environment on the current CUDA device, with the command's options: ``--shapes``
    (d x n x L) at each ``--batch`` as its scan and conv rows, ``--repeats`` and ``--max-seconds``."""
    from emma_mamba.bench import kernels_gpu

    shapes = None
    if args.shapes is not None or args.batch is not None:
        dnl = args.shapes or [(d, n, l) for (_, d, n, l) in kernels_gpu.SCAN_SHAPES]
        shapes = [(b, d, n, l) for (d, n, l) in dnl for b in (args.batch or [kernels_gpu.SCAN_SHAPES[0][0]])]
    return kernels_gpu._Env("cuda", "cuda", scan_shapes=shapes, repeats=args.repeats, max_seconds=args.max_seconds)


def run(args) -> int:
    start = record.run_start()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_options(args, device)
    problem = memory_problem(args) if device == "cpu" else None
    if problem:
        raise SystemExit(f"emma-mamba bench kernels: {problem}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("emma-mamba bench kernels: --device cuda but torch sees no CUDA GPU")
    out = args.out or record.default_out(f"kernels_{device}.json")
    problem = record.out_problem(out)
    if problem:
        raise SystemExit(f"emma-mamba bench kernels: --out: {problem}")
    save = record.saver(out, device, args.threads, start)
    res: dict = {}
    try:
        if device == "cuda":
            from emma_mamba.bench import kernels_gpu
            kernels_gpu.run_on(gpu_env(args), args, save, res=res)
        else:
            run_cpu(args, start, save, res)
            print_table(res)
            save(res)
    except KeyboardInterrupt:
        if res:
            res["machine"] = record.machine_info(device, args.threads, start)
        return record.interrupted(res or None, out)
    print(f"\nwrote {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emma_mamba.bench.kernels", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
