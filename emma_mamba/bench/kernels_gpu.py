"""GPU half of ``emma-mamba bench kernels``: our CUDA kernels against mamba-ssm / causal-conv1d, side by side.

``run_gpu(args) -> dict`` (called by :mod:`emma_mamba.bench.kernels` when the device is cuda) measures, in one
process and on the same tensors:

* selective scan, forward and forward+backward, at mamba-2.8b shapes (b=8, d=5120, n=16, L=2048 and 8192,
  bf16, with z, D, delta_bias and softplus as the Mamba mixer calls it): ours (``cuda`` backend through the
  public op, default and deterministic backward), our ``triton`` backend when it is available, and
  mamba-ssm's ``selective_scan_fn`` when importable; also our CUDA forward's state-sequential variant
  (``EMMA_CUDA_SCAN_FWD=seq``, column ``emma_cuda_seq``), its state-sequential backward
  (``EMMA_CUDA_SCAN_BWD=seq``: ``emma_cuda_seqbwd``, and both: ``emma_cuda_seq_seqbwd``), both Triton
  forwards and the Triton sequential backward (``emma_triton_seqbwd``), to choose the defaults.
  The torch reference loop only on a small shape.
* causal conv1d forward and forward+backward at the same (b, d, L), width 4, bias, SiLU: ours vs
  causal-conv1d's ``causal_conv1d_fn``.
* one decode step at d=5120, n=16 and b in (1, 8, 64): ours vs mamba-ssm's Triton ``selective_state_update``
  and causal-conv1d's ``causal_conv1d_update``; each both eager (per call, launch included) and as the
  per-step time of a CUDA graph of 64 steps (device time).
* achieved memory bandwidth of our forward - the bytes any implementation must move (inputs read once,
  output written once) over its time - as a fraction of the device-to-device copy bandwidth measured in the
  same run (a 1 GiB ``copy_``, bytes read + written).

Timing: CUDA events around each call after a warm-up, the median of the repeats (every repeat's time beside it,
``runs_ms``; a measurement that ``max_seconds`` cut short is listed in ``cut_by_max_seconds``); inputs are larger
than L2 at the large shapes. A max-abs-difference of our output against mamba-ssm's is recorded as a sanity check.
Run standalone with ``python -m emma_mamba.bench.kernels_gpu --out results.json``, or as
``emma-mamba bench kernels --device cuda`` (which also takes ``--shapes``, ``--batch``, ``--repeats`` and
``--max-seconds``); both write the JSON after every section.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
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


class _Env:
    """Where a run measures: the device, the backend playing "ours" (``cuda`` on a GPU; ``cpu`` in the CPU smoke
    run of the tests, which drives every code path of this module on tiny shapes), the clock and the shapes."""

    def __init__(self, device="cuda", primary="cuda", scan_shapes=None, ref_shape=None, decode_batches=None,
                 decode_dim=5120, copy_bytes=1 << 30, dtype=None, repeats=None, max_seconds=20.0):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.primary = primary
        self.scan_shapes = scan_shapes or SCAN_SHAPES
        self.ref_shape = ref_shape or REF_SHAPE
        self.decode_batches = decode_batches or DECODE_BATCHES
        self.decode_dim = decode_dim
        self.copy_bytes = copy_bytes
        self.dtype = dtype or DTYPE
        self.repeats = repeats  # None: each measurement's own count; else every median is over this many
        self.max_seconds = max_seconds
        self.last_runs: list[float] = []  # the last median's repeats (ms), and whether max_seconds cut them
        self.last_cut = False

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def generator(self, seed=0):
        return torch.Generator(device=self.device).manual_seed(seed)

    def median_ms(self, fn, warmup=3, iters=10, max_seconds=None):
        """Median of ``iters`` calls (``repeats`` when set) after ``warmup``: CUDA events on a GPU, a synchronised
        wall clock otherwise; fewer calls when ``max_seconds`` (default ``self.max_seconds``) runs out. The calls'
        times stay in ``last_runs`` (``last_cut``: cut short)."""
        iters = self.repeats or iters
        max_seconds = self.max_seconds if max_seconds is None else max_seconds
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        t_start = time.perf_counter()
        for _ in range(iters):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            if time.perf_counter() - t_start > max_seconds:
                break
        self.last_runs, self.last_cut = times, len(times) < iters
        return statistics.median(times)

    def timed(self, row, key, fn, **kw):
        """``row["times_ms"][key]`` = the median of ``fn`` (:meth:`median_ms`), every repeat in
        ``row["runs_ms"][key]``, and ``key`` in ``row["cut_by_max_seconds"]`` when ``max_seconds`` cut it."""
        row["times_ms"][key] = self.median_ms(fn, **kw)
        row.setdefault("runs_ms", {})[key] = self.last_runs
        if self.last_cut:
            row.setdefault("cut_by_max_seconds", []).append(key)

    def copy_bandwidth_gbs(self):
        """Device-to-device copy of ``copy_bytes`` (1 GiB): (bytes read + bytes written) / time, GB/s."""
        n = self.copy_bytes
        src = torch.empty(n, dtype=torch.uint8, device=self.device).random_(0, 255)
        dst = torch.empty_like(src)
        ms = self.median_ms(lambda: dst.copy_(src), warmup=3, iters=20)
        return 2 * n / (ms * 1e-3) / 1e9

    def graph_step_us(self, step, steps=64):
        """Per-step device time of ``steps`` calls captured in one CUDA graph (None off a GPU)."""
        if not self.cuda:
            return None
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
        ms = self.median_ms(graph.replay, warmup=3, iters=20)
        return ms * 1e3 / steps

    def eager_step_us(self, step, calls=200):
        """Per-call wall time of ``calls`` back-to-back calls (launch overhead included), synchronised."""
        for _ in range(10):
            step()
        self.sync()
        t = time.perf_counter()
        for _ in range(calls):
            step()
        self.sync()
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


def _scan_inputs(env, b, d, n, l, requires_grad):
    g = env.generator()
    r = lambda *s: torch.randn(*s, device=env.device, generator=g)  # noqa: E731
    dtype = env.dtype
    x = dict(
        u=r(b, d, l).to(dtype),
        delta=(r(b, d, l) * 0.5 - 4.0).to(dtype),  # softplus(delta + bias) ~ [1e-3, 1e-1], as a trained Mamba
        A=-torch.arange(1, n + 1, dtype=torch.float32, device=env.device).repeat(d, 1) * (1 + 0.1 * r(d, n)).abs(),
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


def _triton_forward_impl():
    from emma_mamba.kernels import selective_scan as triton_scan
    return triton_scan.FWD_IMPL


@contextlib.contextmanager
def _triton_setting(name, impl):
    """Run the Triton scan with ``selective_scan.<name>`` (FWD_IMPL, BWD_IMPL) = ``impl`` (None: as set)."""
    if impl is None:
        yield
        return
    from emma_mamba.kernels import selective_scan as triton_scan
    before = getattr(triton_scan, name)
    setattr(triton_scan, name, impl)
    try:
        yield
    finally:
        setattr(triton_scan, name, before)


def _triton_forward(impl):
    return _triton_setting("FWD_IMPL", impl)


def _triton_backward(impl):
    return _triton_setting("BWD_IMPL", impl)


@contextlib.contextmanager
def _env_setting(name, value):
    """Environment variable ``name`` = ``value`` inside the block (None: left as it is)."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def cuda_forward(impl):
    """Run the CUDA scan with forward ``impl`` ("warp", "seq"; None: as set), via EMMA_CUDA_SCAN_FWD."""
    return _env_setting("EMMA_CUDA_SCAN_FWD", impl)


def cuda_backward(impl):
    """Run the CUDA scan with backward ``impl`` ("warp", "seq"; None: as set), via EMMA_CUDA_SCAN_BWD."""
    return _env_setting("EMMA_CUDA_SCAN_BWD", impl)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _ratios(row, t, num, den, kinds=("fwd", "fwd_bwd")):
    """row["ratio_<num>_over_<den>.<kind>"] = t[num.kind] / t[den.kind] for every kind both were timed."""
    for kind in kinds:
        if f"{num}.{kind}" in t and f"{den}.{kind}" in t:
            row[f"ratio_{num}_over_{den}.{kind}"] = t[f"{num}.{kind}"] / t[f"{den}.{kind}"]


def _fraction_of_copy(row, res, name, t_ms, nbytes):
    row[f"{name}.fwd_GBps"] = nbytes / (t_ms * 1e-3) / 1e9
    row[f"{name}.fwd_fraction_of_copy_bw"] = row[f"{name}.fwd_GBps"] / res["copy_bandwidth_GBps"]


# ---------------------------------------------------------------------------------------------------------
# measurements


def _scan_section(env, res, mssm_scan, backends, shapes):
    rows = res.setdefault("selective_scan", [])
    for shape in shapes:
        rows.append(_scan_row(env, res, mssm_scan, backends, *shape))
        if env.cuda:
            torch.cuda.empty_cache()  # the row's inputs went out of scope with _scan_row


def _scan_row(env, res, mssm_scan, backends, b, d, n, l):
    """One shape of the scan table: every implementation's fwd and fwd+bwd median, ratios, bandwidth."""
    x = _scan_inputs(env, b, d, n, l, requires_grad=True)
    dout = torch.randn(b, d, l, device=env.device, generator=env.generator(1)).to(env.dtype)
    row = dict(b=b, d=d, n=n, L=l, dtype=_dtype_name(env.dtype), times_ms={})
    primary = f"emma_{env.primary}"

    def ours(backend, det=None, triton_fwd=None, cuda_fwd=None, cuda_bwd=None, triton_bwd=None):
        def fwd():
            with ops.use_backend(backend), _triton_forward(triton_fwd), cuda_forward(cuda_fwd):
                return ops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                          x["delta_bias"], True, deterministic=det)
        # the backward variants are read when the backward runs: set around forward + backward below
        fwd.cuda_bwd, fwd.triton_bwd = cuda_bwd, triton_bwd
        return fwd

    impls = {f"emma_{bk}": ours(bk) for bk in backends}
    impls[f"{primary}_deterministic"] = ours(env.primary, True)
    if "triton" in backends:  # the other Triton forward (same backward), to decide the default on a GPU
        other = "sequential" if _triton_forward_impl() == "chunked" else "chunked"
        impls[f"emma_triton_{other}"] = ours("triton", triton_fwd=other)
        impls["emma_triton_seqbwd"] = ours("triton", triton_bwd="sequential")  # the sequential backward
    seq = f"{primary}_seq"  # the CUDA state-sequential forward (same backward), to decide the default
    seqbwd, both = f"{primary}_seqbwd", f"{primary}_seq_seqbwd"  # the state-sequential backward, alone and with it
    if env.primary in ("cuda", "cuda-emu"):
        impls[seq] = ours(env.primary, cuda_fwd="seq")
        impls[seqbwd] = ours(env.primary, cuda_bwd="seq")
        impls[both] = ours(env.primary, cuda_fwd="seq", cuda_bwd="seq")
    if mssm_scan is not None:
        impls["mamba_ssm"] = lambda: mssm_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                               x["delta_bias"], delta_softplus=True)
    for name, f in impls.items():
        try:
            if not name.endswith("_deterministic"):  # the forward does not depend on the backward's mode
                with torch.no_grad():
                    env.timed(row, f"{name}.fwd", f)

            def fb(f=f):
                out = f()
                torch.autograd.backward(out, dout)
                for v in x.values():
                    v.grad = None
            with cuda_backward(getattr(f, "cuda_bwd", None)), _triton_backward(getattr(f, "triton_bwd", None)):
                env.timed(row, f"{name}.fwd_bwd", fb, warmup=2, iters=8)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        if env.cuda:
            torch.cuda.empty_cache()
    # sanity: every implementation computes the same function on these inputs (max |diff| vs ours)
    with torch.no_grad():
        want = impls[primary]().float()
        row["max_abs_out"] = want.abs().max().item()
        for name, f in impls.items():
            if name != primary and not name.endswith("_deterministic") and name not in row.get("errors", {}):
                row[f"max_abs_diff_{name}_vs_{primary}"] = (f().float() - want).abs().max().item()
    t = row["times_ms"]
    _ratios(row, t, primary, "mamba_ssm")
    _ratios(row, t, seq, "mamba_ssm")
    _ratios(row, t, seq, primary)
    for name in (seqbwd, both):
        _ratios(row, t, name, "mamba_ssm", kinds=("fwd_bwd",))
        _ratios(row, t, name, primary, kinds=("fwd_bwd",))
    _ratios(row, t, "emma_triton", primary)  # issue 4: Triton forward within 1.5x of CUDA
    for other in ("chunked", "sequential"):
        _ratios(row, t, f"emma_triton_{other}", primary)
    _ratios(row, t, "emma_triton_seqbwd", "emma_triton", kinds=("fwd_bwd",))
    _ratios(row, t, "emma_triton_seqbwd", "mamba_ssm", kinds=("fwd_bwd",))
    _ratios(row, t, f"{primary}_deterministic", primary, kinds=("fwd_bwd",))
    nbytes = _scan_bytes(b, d, n, l, env.dtype.itemsize)
    row["fwd_bytes_min"] = nbytes
    for name in (primary, seq, "emma_triton", "emma_triton_chunked", "emma_triton_sequential",
                 "mamba_ssm"):
        if f"{name}.fwd" in t:
            _fraction_of_copy(row, res, name, t[f"{name}.fwd"], nbytes)
    if "triton" in backends:
        row["emma_triton_forward_impl"] = _triton_forward_impl()
    return row


def _ref_section(env, res):
    b, d, n, l = env.ref_shape
    x = _scan_inputs(env, b, d, n, l, requires_grad=True)
    dout = torch.randn(b, d, l, device=env.device, generator=env.generator(1)).to(env.dtype)
    row = dict(b=b, d=d, n=n, L=l, dtype=_dtype_name(env.dtype), times_ms={})
    for backend in (env.primary, "torch"):
        def f(backend=backend):
            with ops.use_backend(backend):
                return ops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                          x["delta_bias"], True)
        with torch.no_grad():
            env.timed(row, f"{backend}.fwd", f, warmup=1, iters=3)

        def fb(f=f):
            torch.autograd.backward(f(), dout)
        env.timed(row, f"{backend}.fwd_bwd", fb, warmup=1, iters=3)
    for kind in ("fwd", "fwd_bwd"):
        row[f"speedup_{env.primary}_over_reference.{kind}"] = (row["times_ms"][f"torch.{kind}"]
                                                               / row["times_ms"][f"{env.primary}.{kind}"])
    res["reference_small"] = row


def _conv_section(env, res, cc_fn, backends, quick):
    shapes = env.scan_shapes[:1] if quick else env.scan_shapes
    res["causal_conv1d"] = []
    for (b, d, _, l) in shapes:
        res["causal_conv1d"].append(_conv_row(env, res, cc_fn, backends, b, d, l))
        if env.cuda:
            torch.cuda.empty_cache()


def _conv_row(env, res, cc_fn, backends, b, d, l):
    """One shape of the conv table (width 4, SiLU): ours (each backend) vs causal-conv1d, fwd and fwd+bwd."""
    g = env.generator()
    x = torch.randn(b, d, l, device=env.device, generator=g).to(env.dtype).requires_grad_()
    w = torch.randn(d, 4, device=env.device, generator=g).to(env.dtype).requires_grad_()
    bias = torch.randn(d, device=env.device, generator=g).to(env.dtype).requires_grad_()
    dout = torch.randn(b, d, l, device=env.device, generator=g).to(env.dtype)
    row = dict(b=b, d=d, L=l, width=4, dtype=_dtype_name(env.dtype), times_ms={})
    primary = f"emma_{env.primary}"

    def ours(backend):
        def fwd():
            with ops.use_backend(backend):
                return ops.causal_conv1d(x, w, bias, "silu")
        return fwd
    impls = {f"emma_{bk}": ours(bk) for bk in backends}
    if cc_fn is not None:
        impls["causal_conv1d"] = lambda: cc_fn(x, w, bias, activation="silu")
    for name, f in impls.items():
        try:
            with torch.no_grad():
                env.timed(row, f"{name}.fwd", f)

            def fb(f=f):
                torch.autograd.backward(f(), dout)
                x.grad = w.grad = bias.grad = None
            env.timed(row, f"{name}.fwd_bwd", fb)
        except Exception as e:  # noqa: BLE001
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    t = row["times_ms"]
    _ratios(row, t, primary, "causal_conv1d")
    _ratios(row, t, "emma_triton", primary)
    nbytes = 2 * b * d * l * env.dtype.itemsize  # x read once, out written once
    for name in (primary, "emma_triton", "causal_conv1d"):
        if f"{name}.fwd" in t:
            _fraction_of_copy(row, res, name, t[f"{name}.fwd"], nbytes)
    return row


def _decode_section(env, res, mssm_ssu, cc_update, backends):
    """One decode step (selective_state_update, causal_conv1d_update) per batch size: eager and CUDA-graphed."""
    rows = []
    d, n, wdt = env.decode_dim, 16, 4
    primary = f"emma_{env.primary}"
    for b in env.decode_batches:
        g = env.generator()
        r = lambda *s: torch.randn(*s, device=env.device, generator=g)  # noqa: E731
        state = r(b, d, n)
        x, dt, z = r(b, d).to(env.dtype), r(b, d).to(env.dtype), r(b, d).to(env.dtype)
        A = -torch.rand(d, n, device=env.device, generator=g) - 0.5
        B, C = r(b, n).to(env.dtype), r(b, n).to(env.dtype)
        D, dt_bias = r(d), r(d)
        conv_state, cw, cb = r(b, d, wdt).to(env.dtype), r(d, wdt).to(env.dtype), r(d).to(env.dtype)
        row = dict(b=b, d=d, n=n, dtype=_dtype_name(env.dtype), state_dtype="float32", times_us={})
        impls = {}
        for bk in backends:
            def ours_ssu(bk=bk):
                with ops.use_backend(bk):
                    return ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)

            def ours_conv(bk=bk):
                with ops.use_backend(bk):
                    return ops.causal_conv1d_update(x, conv_state, cw, cb, "silu")
            impls[f"emma_{bk}.selective_state_update"] = ours_ssu
            impls[f"emma_{bk}.causal_conv1d_update"] = ours_conv
        # the raw kernel entry, without the Python input checks: launch cost only
        kern = ops._load(env.primary)
        impls[f"{primary}_raw.selective_state_update"] = lambda: kern.selective_state_update(
            state, x, dt, A, B, C, D, z, dt_bias, True)
        if mssm_ssu is not None:
            impls["mamba_ssm_triton.selective_state_update"] = lambda: mssm_ssu(
                state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        if cc_update is not None:
            impls["causal_conv1d.causal_conv1d_update"] = lambda: cc_update(x, conv_state, cw, cb, "silu")
        for name, f in impls.items():
            try:
                row["times_us"][f"{name}.eager"] = env.eager_step_us(f)
                graph = env.graph_step_us(f)
                if graph is not None:
                    row["times_us"][f"{name}.graph"] = graph
            except Exception as e:  # noqa: BLE001
                row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        t = row["times_us"]
        for mode in ("eager", "graph"):  # issue 4: our Triton step no slower than mamba-ssm's Triton step
            for ours in (primary, "emma_triton"):
                num, den = f"{ours}.selective_state_update.{mode}", f"mamba_ssm_triton.selective_state_update.{mode}"
                if num in t and den in t:
                    row[f"ratio_{ours}_over_mamba_ssm_triton.selective_state_update.{mode}"] = t[num] / t[den]
        rows.append(row)
    res["decode_step"] = rows


def run_gpu(args=None) -> dict:
    """Measure everything above on the current CUDA device; returns a JSON-serialisable dict.

    ``args`` may carry ``quick`` (only L=2048) and ``skip`` (names among "ref", "peers", "triton");
    the attributes are optional so the CPU command's namespace can be passed as it is.
    """
    return run_on(_Env("cuda", "cuda"), args)


def run_on(env: _Env, args=None, save=None, res=None) -> dict:
    """:func:`run_gpu` on ``env``: the tests drive it on the CPU with ``_Env("cpu", "cpu", tiny shapes)``.

    The sections run in the order of what issues 3 and 4 must show (the scan at the first shape, the decode
    step, then the conv, the other scan shapes, the reference), and ``save(res)``, when given, is called after
    each, so a run stopped by a time limit still leaves every finished section (``res["complete"]`` False).
    ``res``: the dict to fill (in place: what a caller stopped by Ctrl-C still holds).
    """
    save = save or (lambda r: None)
    quick = bool(getattr(args, "quick", False))
    skip = set(getattr(args, "skip", None) or [])
    res = {} if res is None else res
    res.update(torch=torch.__version__, triton=_version("triton"),
               mamba_ssm_version=_version("mamba_ssm") or _version("mamba-ssm"),
               causal_conv1d_version=_version("causal_conv1d") or _version("causal-conv1d"),
               backends=ops.available_backends(), ours=env.primary, quick=quick, skip=sorted(skip),
               repeats=env.repeats or "per measurement (scan fwd 10, fwd+bwd 8; conv 10; reference 3)",
               max_seconds=env.max_seconds,
               scan_shapes=[list(s) for s in (env.scan_shapes[:1] if quick else env.scan_shapes)])
    if env.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        prop = torch.cuda.get_device_properties(0)
        res.update(device=torch.cuda.get_device_name(0), sm_count=prop.multi_processor_count,
                   capability=f"{prop.major}.{prop.minor}", cuda=torch.version.cuda,
                   timing="CUDA events, median after warm-up")
    else:
        res.update(device="cpu", cuda=None, timing="wall clock, median after warm-up")
    res["copy_bandwidth_GBps"] = env.copy_bandwidth_gbs()
    mssm_scan = mssm_ssu = cc_fn = cc_update = None
    if "peers" not in skip:
        mssm_scan, mssm_ssu, res["mamba_ssm_import"] = _import_mamba_ssm()
        cc_fn, cc_update, res["causal_conv1d_import"] = _import_causal_conv1d()
    backends = [env.primary]
    if "triton" not in skip and res["backends"].get("triton") == "available":
        backends.append("triton")
    res["complete"] = False
    steps = [lambda: _scan_section(env, res, mssm_scan, backends, env.scan_shapes[:1]),
             lambda: _decode_section(env, res, mssm_ssu, cc_update, backends),
             lambda: _conv_section(env, res, cc_fn, backends, quick)]
    if not quick:
        steps.append(lambda: _scan_section(env, res, mssm_scan, backends, env.scan_shapes[1:]))
    if "ref" not in skip:
        steps.append(lambda: _ref_section(env, res))
    for step in steps:
        step()
        save(res)
    res["complete"] = True
    save(res)
    print_table(res)
    return res


def _print_row(title, row, times_key, unit, width=52):
    print(f"\n{title}")
    for k, v in row[times_key].items():
        print(f"  {k:{width}s} {v:9.3f} {unit}")
    for k, v in row.items():  # ratios, bandwidth, sanity differences
        if k.startswith(("ratio", "max_abs")) or k.endswith(("_GBps", "_fraction_of_copy_bw")):
            print(f"  {k:{width}s} {v:9.4g}")
    if row.get("errors"):
        print(f"  errors: {row['errors']}")


def print_table(res: dict) -> None:
    print(f"\n{res['device']}  torch {res['torch']}  cuda {res['cuda']}  triton {res['triton']}  "
          f"mamba_ssm {res['mamba_ssm_version']}  causal_conv1d {res['causal_conv1d_version']}")
    print(f"device-to-device copy: {res['copy_bandwidth_GBps']:.0f} GB/s")
    for row in res.get("selective_scan", []):
        _print_row(f"selective_scan b={row['b']} d={row['d']} n={row['n']} L={row['L']} {row['dtype']}",
                   row, "times_ms", "ms")
    for row in res.get("causal_conv1d", []):
        _print_row(f"causal_conv1d b={row['b']} d={row['d']} L={row['L']} w=4 {row['dtype']}", row, "times_ms", "ms")
    for row in res.get("decode_step", []):
        _print_row(f"decode step b={row['b']} d={row['d']} n={row['n']} {row['dtype']}", row, "times_us", "us",
                   width=72)
    if "reference_small" in res:
        row = res["reference_small"]
        print(f"\nreference (torch loop) b={row['b']} d={row['d']} L={row['L']}: " +
              ", ".join(f"{k} {v:.3f} ms" for k, v in row["times_ms"].items()))


def main(argv=None) -> int:
    from emma_mamba.bench import record

    p = argparse.ArgumentParser(prog="python -m emma_mamba.bench.kernels_gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only L=2048")
    p.add_argument("--skip", nargs="*", default=[], choices=["ref", "peers", "triton"])
    p.add_argument("--out", type=record.out_path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    start = record.run_start()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu: no CUDA GPU")
    # after every section: a run cut short by a time limit keeps what it measured
    save = record.saver(args.out, "cuda", None, start) if args.out else None
    res: dict = {}
    try:
        run_on(_Env("cuda", "cuda"), args, save, res=res)
    except KeyboardInterrupt:
        if res and args.out:
            res["machine"] = record.machine_info("cuda", None, start)
        return record.interrupted(res or None, args.out)
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
