"""GPU half of ``emma-mamba bench kernels``: our CUDA kernels against mamba-ssm / causal-conv1d, side by side.

``run_gpu(args) -> dict`` (called by :mod:`emma_mamba.bench.kernels` when the device is cuda) measures, in one
process and on the same tensors:

* selective scan, forward and forward+backward, at mamba-2.8b shapes (b=8, d=5120, n=16, L=2048 and 8192,
  bf16, with z, D, delta_bias and softplus as the Mamba mixer calls it): ours (``cuda`` backend through the
  public op, default and deterministic backward), our ``triton`` backend when it is available, and
  mamba-ssm's ``selective_scan_fn`` when importable. The torch reference loop only on a small shape.
* causal conv1d forward and forward+backward at the same (b, d, L), width 4, bias, SiLU: ours vs
  causal-conv1d's ``causal_conv1d_fn``.
* one decode step at d=5120, n=16 and b in (1, 8, 64): ours vs mamba-ssm's Triton ``selective_state_update``
  and causal-conv1d's ``causal_conv1d_update``; each both eager (per call, launch included) and as the
  per-step time of a CUDA graph of 64 steps (device time).
* achieved memory bandwidth of our forward - the bytes any implementation must move (inputs read once,
  output written once) over its time - as a fraction of the device-to-device copy bandwidth measured in the
  same run (a 1 GiB ``copy_``, bytes read + written).

Timing: CUDA events around each call after a warm-up, the median of the repeats; inputs are larger than L2
at the large shapes. A max-abs-difference of our output against mamba-ssm's is recorded as a sanity check.
Run standalone with ``python -m emma_mamba.bench.kernels_gpu --out results.json``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types

import torch

from emma_mamba import ops

SCAN_SHAPES = [(8, 5120, 16, 2048), (8, 5120, 16, 8192)]  # (b, d, n, L): mamba-2.8b
REF_SHAPE = (1, 512, 16, 512)  # the torch reference is a Python loop over L: small shape only
DECODE_BATCHES = [1, 8, 64]
DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------------------
# timing


def _median_ms(fn, warmup=3, iters=10, max_seconds=20.0):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.perf_counter()
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
        if time.perf_counter() - t_start > max_seconds:
            break
    return statistics.median(times)


def _copy_bandwidth_gbs():
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, GB/s."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * n / (ms * 1e-3) / 1e9


def _graph_step_us(step, steps=64):
    """Per-step device time of ``steps`` calls captured in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            step()
    ms = _median_ms(graph.replay, warmup=3, iters=20)
    return ms * 1e3 / steps


def _eager_step_us(step, calls=200):
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e6 / calls


# ---------------------------------------------------------------------------------------------------------
# peers


def _import_mamba_ssm():
    """(selective_scan_fn, selective_state_update, how) or Nones with the reason.

    mamba_ssm/__init__.py imports its whole model zoo (and transformers); when that fails on this machine,
    the two modules we need are imported without running the package's __init__ (a namespace stand-in).
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        return selective_scan_fn, selective_state_update, "import mamba_ssm"
    except Exception as e:  # noqa: BLE001 - report, then try without the package __init__
        first = f"{type(e).__name__}: {e}"
    try:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None:
            return None, None, f"mamba_ssm is not installed ({first})"
        for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[k]
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = pkg
        ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        return ssi.selective_scan_fn, ssu.selective_state_update, f"submodules only (package import failed: {first})"
    except Exception as e:  # noqa: BLE001
        return None, None, f"not importable: {first}; then {type(e).__name__}: {e}"


def _import_causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
        return causal_conv1d_fn, causal_conv1d_update, "import causal_conv1d"
    except Exception as e:  # noqa: BLE001
        return None, None, f"not importable: {type(e).__name__}: {e}"


def _version(mod):
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------------------
# inputs


def _scan_inputs(b, d, n, l, dtype, requires_grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x = dict(
        u=r(b, d, l).to(dtype),
        delta=(r(b, d, l) * 0.5 - 4.0).to(dtype),  # softplus(delta + bias) ~ [1e-3, 1e-1], as a trained Mamba
        A=-torch.arange(1, n + 1, dtype=torch.float32, device="cuda").repeat(d, 1) * (1 + 0.1 * r(d, n)).abs(),
        B=r(b, n, l).to(dtype), C=r(b, n, l).to(dtype), D=r(d), z=r(b, d, l).to(dtype),
        delta_bias=0.1 * r(d),
    )
    if requires_grad:
        for v in x.values():
            v.requires_grad_(True)
    return x


def _scan_bytes(b, d, n, l, elt):
    """Bytes any implementation must move in the forward: u, delta, z, B, C read once, out written once."""
    return (4 * b * d * l + 2 * b * n * l) * elt + 2 * d * n * 4 + 2 * d * 4


# ---------------------------------------------------------------------------------------------------------
# measurements


def _scan_section(res, mssm_scan, backends, quick):
    shapes = SCAN_SHAPES[:1] if quick else SCAN_SHAPES
    res["selective_scan"] = []
    for shape in shapes:
        res["selective_scan"].append(_scan_row(res, mssm_scan, backends, *shape))
        torch.cuda.empty_cache()  # the row's inputs went out of scope with _scan_row


def _scan_row(res, mssm_scan, backends, b, d, n, l):
    """One shape of the scan table: every implementation's fwd and fwd+bwd median, ratios, bandwidth."""
    x = _scan_inputs(b, d, n, l, DTYPE, requires_grad=True)
    dout = torch.randn(b, d, l, device="cuda", dtype=DTYPE)
    row = dict(b=b, d=d, n=n, L=l, dtype=str(DTYPE).replace("torch.", ""), times_ms={})

    def ours(backend, det=None):
        def fwd():
            with ops.use_backend(backend):
                return ops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                          x["delta_bias"], True, deterministic=det)
        return fwd

    impls = {f"emma_{bk}": ours(bk) for bk in backends}
    if "cuda" in backends:
        impls["emma_cuda_deterministic"] = ours("cuda", True)
    if mssm_scan is not None:
        impls["mamba_ssm"] = lambda: mssm_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                               x["delta_bias"], delta_softplus=True)
    for name, f in impls.items():
        try:
            if name != "emma_cuda_deterministic":
                with torch.no_grad():
                    row["times_ms"][f"{name}.fwd"] = _median_ms(f)

            def fb(f=f):
                out = f()
                torch.autograd.backward(out, dout)
                for v in x.values():
                    v.grad = None
            row["times_ms"][f"{name}.fwd_bwd"] = _median_ms(fb, warmup=2, iters=8)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
    # sanity: same function as mamba-ssm on these inputs
    if mssm_scan is not None and "cuda" in backends:
        with torch.no_grad():
            a = impls["emma_cuda"]().float()
            m = impls["mamba_ssm"]().float()
            row["max_abs_diff_vs_mamba_ssm"] = (a - m).abs().max().item()
            row["max_abs_out"] = m.abs().max().item()
    t = row["times_ms"]
    for kind in ("fwd", "fwd_bwd"):
        if f"emma_cuda.{kind}" in t and f"mamba_ssm.{kind}" in t:
            row[f"ratio_emma_cuda_over_mamba_ssm.{kind}"] = t[f"emma_cuda.{kind}"] / t[f"mamba_ssm.{kind}"]
    if "emma_cuda.fwd" in t:
        nbytes = _scan_bytes(b, d, n, l, 2)
        row["fwd_bytes_min"] = nbytes
        row["emma_cuda.fwd_GBps"] = nbytes / (t["emma_cuda.fwd"] * 1e-3) / 1e9
        row["emma_cuda.fwd_fraction_of_copy_bw"] = row["emma_cuda.fwd_GBps"] / res["copy_bandwidth_GBps"]
        if "mamba_ssm.fwd" in t:
            row["mamba_ssm.fwd_fraction_of_copy_bw"] = (nbytes / (t["mamba_ssm.fwd"] * 1e-3) / 1e9
                                                        / res["copy_bandwidth_GBps"])
    return row


def _ref_section(res):
    b, d, n, l = REF_SHAPE
    x = _scan_inputs(b, d, n, l, DTYPE, requires_grad=True)
    dout = torch.randn(b, d, l, device="cuda", dtype=DTYPE)
    row = dict(b=b, d=d, n=n, L=l, dtype=str(DTYPE).replace("torch.", ""), times_ms={})
    for backend in ("cuda", "torch"):
        def f(backend=backend):
            with ops.use_backend(backend):
                return ops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                          x["delta_bias"], True)
        with torch.no_grad():
            row["times_ms"][f"{backend}.fwd"] = _median_ms(f, warmup=1, iters=3)

        def fb(f=f):
            torch.autograd.backward(f(), dout)
        row["times_ms"][f"{backend}.fwd_bwd"] = _median_ms(fb, warmup=1, iters=3)
    row["speedup_cuda_over_reference.fwd"] = row["times_ms"]["torch.fwd"] / row["times_ms"]["cuda.fwd"]
    row["speedup_cuda_over_reference.fwd_bwd"] = row["times_ms"]["torch.fwd_bwd"] / row["times_ms"]["cuda.fwd_bwd"]
    res["reference_small"] = row


def _conv_section(res, cc_fn, quick):
    shapes = SCAN_SHAPES[:1] if quick else SCAN_SHAPES
    res["causal_conv1d"] = []
    for (b, d, _, l) in shapes:
        res["causal_conv1d"].append(_conv_row(res, cc_fn, b, d, l))
        torch.cuda.empty_cache()


def _conv_row(res, cc_fn, b, d, l):
    """One shape of the conv table (width 4, SiLU): ours vs causal-conv1d, fwd and fwd+bwd."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, d, l, device="cuda", generator=g).to(DTYPE).requires_grad_()
    w = torch.randn(d, 4, device="cuda", generator=g).to(DTYPE).requires_grad_()
    bias = torch.randn(d, device="cuda", generator=g).to(DTYPE).requires_grad_()
    dout = torch.randn_like(x)
    row = dict(b=b, d=d, L=l, width=4, dtype=str(DTYPE).replace("torch.", ""), times_ms={})

    def ours():
        with ops.use_backend("cuda"):
            return ops.causal_conv1d(x, w, bias, "silu")
    impls = {"emma_cuda": ours}
    if cc_fn is not None:
        impls["causal_conv1d"] = lambda: cc_fn(x, w, bias, activation="silu")
    for name, f in impls.items():
        try:
            with torch.no_grad():
                row["times_ms"][f"{name}.fwd"] = _median_ms(f)

            def fb(f=f):
                torch.autograd.backward(f(), dout)
                x.grad = w.grad = bias.grad = None
            row["times_ms"][f"{name}.fwd_bwd"] = _median_ms(fb)
        except Exception as e:  # noqa: BLE001
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    t = row["times_ms"]
    for kind in ("fwd", "fwd_bwd"):
        if f"causal_conv1d.{kind}" in t and f"emma_cuda.{kind}" in t:
            row[f"ratio_emma_cuda_over_causal_conv1d.{kind}"] = t[f"emma_cuda.{kind}"] / t[f"causal_conv1d.{kind}"]
    if "emma_cuda.fwd" in t:
        nbytes = 2 * b * d * l * 2  # x read once, out written once
        row["emma_cuda.fwd_fraction_of_copy_bw"] = (nbytes / (t["emma_cuda.fwd"] * 1e-3) / 1e9
                                                    / res["copy_bandwidth_GBps"])
    return row


def _decode_section(res, mssm_ssu, cc_update):
    rows = []
    d, n, wdt = 5120, 16, 4
    for b in DECODE_BATCHES:
        g = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
        state = r(b, d, n)
        x, dt, z = r(b, d).to(DTYPE), r(b, d).to(DTYPE), r(b, d).to(DTYPE)
        A = -torch.rand(d, n, device="cuda") - 0.5
        B, C = r(b, n).to(DTYPE), r(b, n).to(DTYPE)
        D, dt_bias = r(d), r(d)
        conv_state, cw, cb = r(b, d, wdt).to(DTYPE), r(d, wdt).to(DTYPE), r(d).to(DTYPE)
        row = dict(b=b, d=d, n=n, dtype=str(DTYPE).replace("torch.", ""), state_dtype="float32", times_us={})

        def ours_ssu():
            with ops.use_backend("cuda"):
                return ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)

        def ours_conv():
            with ops.use_backend("cuda"):
                return ops.causal_conv1d_update(x, conv_state, cw, cb, "silu")
        kern = ops._load("cuda")  # the raw kernel entry, without the Python input checks: launch cost only

        def ours_ssu_raw():
            return kern.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)

        impls = {"emma_cuda.selective_state_update": ours_ssu,
                 "emma_cuda_raw.selective_state_update": ours_ssu_raw,
                 "emma_cuda.causal_conv1d_update": ours_conv}
        if mssm_ssu is not None:
            impls["mamba_ssm_triton.selective_state_update"] = lambda: mssm_ssu(
                state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        if cc_update is not None:
            impls["causal_conv1d.causal_conv1d_update"] = lambda: cc_update(x, conv_state, cw, cb, "silu")
        for name, f in impls.items():
            try:
                row["times_us"][f"{name}.eager"] = _eager_step_us(f)
                row["times_us"][f"{name}.graph"] = _graph_step_us(f)
            except Exception as e:  # noqa: BLE001
                row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        rows.append(row)
    res["decode_step"] = rows


def run_gpu(args=None) -> dict:
    """Measure everything above on the current CUDA device; returns a JSON-serialisable dict.

    ``args`` may carry ``quick`` (only L=2048) and ``skip`` (names among "ref", "peers", "triton");
    the attributes are optional so the CPU command's namespace can be passed as it is.
    """
    quick = bool(getattr(args, "quick", False))
    skip = set(getattr(args, "skip", None) or [])
    torch.backends.cuda.matmul.allow_tf32 = False
    prop = torch.cuda.get_device_properties(0)
    res = dict(
        device=torch.cuda.get_device_name(0), sm_count=prop.multi_processor_count,
        capability=f"{prop.major}.{prop.minor}", torch=torch.__version__, cuda=torch.version.cuda,
        triton=_version("triton"), mamba_ssm=_version("mamba_ssm") or _version("mamba-ssm"),
        causal_conv1d=_version("causal_conv1d") or _version("causal-conv1d"),
        backends=ops.available_backends(), timing="CUDA events, median after warm-up",
    )
    res["copy_bandwidth_GBps"] = _copy_bandwidth_gbs()
    mssm_scan = mssm_ssu = cc_fn = cc_update = None
    if "peers" not in skip:
        mssm_scan, mssm_ssu, res["mamba_ssm_import"] = _import_mamba_ssm()
        cc_fn, cc_update, res["causal_conv1d_import"] = _import_causal_conv1d()
    backends = ["cuda"]
    if "triton" not in skip and res["backends"].get("triton") == "available":
        backends.append("triton")
    _scan_section(res, mssm_scan, backends, quick)
    _conv_section(res, cc_fn, quick)
    _decode_section(res, mssm_ssu, cc_update)
    if "ref" not in skip:
        _ref_section(res)
    print_table(res)
    return res


def print_table(res: dict) -> None:
    print(f"\n{res['device']}  torch {res['torch']}  cuda {res['cuda']}  triton {res['triton']}  "
          f"mamba_ssm {res.get('mamba_ssm')}  causal_conv1d {res.get('causal_conv1d')}")
    print(f"device-to-device copy: {res['copy_bandwidth_GBps']:.0f} GB/s")
    for row in res.get("selective_scan", []):
        print(f"\nselective_scan b={row['b']} d={row['d']} n={row['n']} L={row['L']} {row['dtype']}")
        for k, v in row["times_ms"].items():
            print(f"  {k:40s} {v:9.3f} ms")
        for k, v in row.items():
            if k.startswith(("ratio", "emma_cuda.fwd_", "mamba_ssm.fwd_", "max_abs")):
                print(f"  {k:40s} {v:9.4g}")
        if row.get("errors"):
            print(f"  errors: {row['errors']}")
    for row in res.get("causal_conv1d", []):
        print(f"\ncausal_conv1d b={row['b']} d={row['d']} L={row['L']} w=4 {row['dtype']}")
        for k, v in row["times_ms"].items():
            print(f"  {k:40s} {v:9.3f} ms")
        for k, v in row.items():
            if k.startswith(("ratio", "emma_cuda.fwd_")):
                print(f"  {k:40s} {v:9.4g}")
        if row.get("errors"):
            print(f"  errors: {row['errors']}")
    for row in res.get("decode_step", []):
        print(f"\ndecode step b={row['b']} d={row['d']} n={row['n']}")
        for k, v in row["times_us"].items():
            print(f"  {k:52s} {v:8.2f} us")
        if row.get("errors"):
            print(f"  errors: {row['errors']}")
    if "reference_small" in res:
        row = res["reference_small"]
        print(f"\nreference (torch loop) b={row['b']} d={row['d']} L={row['L']}: " +
              ", ".join(f"{k} {v:.3f} ms" for k, v in row["times_ms"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emma_mamba.bench.kernels_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only L=2048")
    p.add_argument("--skip", nargs="*", default=[], choices=["ref", "peers", "triton"])
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu: no CUDA GPU")
    res = run_gpu(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
