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
  and causal-conv1d's ``causal_conv1d_update``; each as the per-step device time of a CUDA graph of 64 steps
  (``.graph``: the column the criteria use, as ``--cuda-graphs`` decoding runs) and eager (``.eager``: wall
  time per call of back-to-back calls, host launch included), side by side.
* achieved memory bandwidth of our forward - the bytes any implementation must move (every input read once,
  every output written once, each in its dtype) over its time - as a fraction of the device-to-device copy
  bandwidth (a 1 GiB ``copy_``, bytes read + written), measured at the start and again at the end of the run:
  the larger of the two is the reference (``copy_bandwidth``).

Timing (:meth:`_Env.median_ms`): after a warm-up, CUDA events around a window of K back-to-back calls, K chosen
so that one window lasts at least ``window_ms`` (5 ms; K in ``calls_per_window``), with a short GPU sleep queued
ahead of the start event, so that the host's launches overlap the GPU's work and the window holds device time;
per call = window / K, the median over the windows (every window's per-call time beside it, ``runs_ms``; a
measurement that ``max_seconds`` cut short is listed in ``cut_by_max_seconds``). Context managers (the backend,
the kernel variants' settings) are entered outside the windows. The headline comparison - ours against mamba-ssm
(and our Triton forward), forward and forward+backward - is measured interleaved (:meth:`_Env.interleaved_ms`):
after ~1 s of those calls as a warm-up, one window each per round over 30 rounds, the order reversed every
other round. The GPU is warmed up (~1 s) before the first measurement. Inputs are larger than L2 at the large
shapes.

Correctness: every implementation's output (and gradients, and the decode steps' updated states) is compared
with ours on the same inputs (``checks``, ``max_abs_diff_*``); a failed check sets ``checks_ok`` false (per row,
per section in ``checks_ok_by_section``, overall), prints a warning, and lists every ratio or bandwidth fraction
it touches in the row's ``not_valid`` (the numbers are kept). ``criteria`` gathers the numbers the issues are
judged on, with their thresholds and validity.
Run standalone with ``python -m emma_mamba.bench.kernels_gpu --out results.json``, or as
``emma-mamba bench kernels --device cuda`` (which also takes ``--shapes``, ``--batch``, ``--repeats`` and
``--max-seconds``); both write the JSON after every section.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import math
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

WINDOW_MS = 5.0  # on a GPU: each timed window holds K back-to-back calls, K chosen so that it lasts this long
MAX_CALLS_PER_WINDOW = 1000
QUEUE_AHEAD_CYCLES = 1_000_000  # GPU sleep queued before a window's start event (~0.5 ms at 2 GHz)
WARMUP_SECONDS = 1.0  # on a GPU: of work before the first measurement, and of the headline calls before theirs
PAIR_REPEATS = 30  # rounds of the interleaved headline comparison

# (rtol, atol) of DESIGN's tolerances against the fp32 reference per dtype (tests/ops/tolerances.py); a check here
# compares two kernels, each within that of the reference, so it allows twice that, relative to the largest
# magnitude of ours: |theirs - ours| <= 2 * (atol + rtol * max|ours|), and finite
TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
# gradients, as tests/ops/tolerances.grad_tolerance: (rtol, atol) multipliers of the output's tolerance
GRAD_TOL_SCALE = {"u": (2, 2), "delta": (5, 10), "x": (2, 2)}

DECODE_COLUMNS = {
    "graph": "device time per step: one CUDA graph of 64 steps, K replays per event pair, median over the "
             "windows / 64 (as --cuda-graphs decoding runs); the column the criteria use",
    "eager": "wall time per call of 200 back-to-back eager calls, synchronised at both ends: host launch "
             "included (launch-bound at small b); beside .graph, not judged",
}


# ---------------------------------------------------------------------------------------------------------
# timing


def calls_per_window(one_call_ms: float, window_ms: float, max_calls: int = MAX_CALLS_PER_WINDOW) -> int:
    """K, the calls per timed window: enough that K calls of ``one_call_ms`` last ``window_ms`` (at least 1, at
    most ``max_calls``; 1 when ``window_ms`` <= 0)."""
    if window_ms <= 0 or one_call_ms >= window_ms:
        return 1
    if one_call_ms <= 0:
        return max_calls
    return max(1, min(max_calls, math.ceil(window_ms / one_call_ms)))


class _Env:
    """Where a run measures: the device, the backend playing "ours" (``cuda`` on a GPU; ``cpu`` in the CPU smoke
    run of the tests, which drives every code path of this module on tiny shapes), the clock and the shapes.

    ``window_ms`` (default 5 on a GPU, 0 elsewhere: one call per window), ``warmup_seconds`` (default 1 on a GPU,
    0 elsewhere) and ``pair_repeats`` set the timing (module docstring)."""

    def __init__(self, device="cuda", primary="cuda", scan_shapes=None, ref_shape=None, decode_batches=None,
                 decode_dim=5120, copy_bytes=1 << 30, dtype=None, repeats=None, max_seconds=20.0,
                 window_ms=None, warmup_seconds=None, pair_repeats=PAIR_REPEATS):
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
        self.window_ms = (WINDOW_MS if self.cuda else 0.0) if window_ms is None else window_ms
        self.warmup_seconds = (WARMUP_SECONDS if self.cuda else 0.0) if warmup_seconds is None else warmup_seconds
        self.pair_repeats = pair_repeats
        self.last_runs: list[float] = []  # the last median's per-call times (ms), whether max_seconds cut them,
        self.last_cut = False             # and its calls per window
        self.last_k = 1
        self.last_order: list[str] = []  # the last interleaved measurement's windows, in the order they ran

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def generator(self, seed=0):
        return torch.Generator(device=self.device).manual_seed(seed)

    def _queue_ahead(self):
        """A GPU sleep ahead of a window's start event: the host launches the window's first call while it runs,
        so that the window starts with work queued (no idle GPU waiting for the host inside it)."""
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is not None:
            sleep(QUEUE_AHEAD_CYCLES)

    def window(self, fn, k: int) -> float:
        """ms of one timed window of ``k`` back-to-back calls of ``fn``: CUDA events around them on a GPU (no sync
        between the calls), a wall clock otherwise."""
        if self.cuda:
            self._queue_ahead()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(k):
                fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t) * 1e3

    def calibrate(self, fn, max_rounds=8) -> int:
        """K for ``fn``: windows of 1, then more calls (at least twice as many, or as many as the last window's
        per-call time says ``window_ms`` needs) until one lasts ``window_ms`` (each window also warms up)."""
        k = 1
        for _ in range(max_rounds):
            if self.window_ms <= 0:
                return 1
            w = self.window(fn, k)
            if w >= self.window_ms or k >= MAX_CALLS_PER_WINDOW:
                return k
            k = min(MAX_CALLS_PER_WINDOW, max(2 * k, calls_per_window(w / k, self.window_ms) if w > 0
                                              else MAX_CALLS_PER_WINDOW))
        return k

    def median_ms(self, fn, warmup=3, iters=10, max_seconds=None):
        """Median per-call time of ``fn`` (ms) over ``iters`` windows (``repeats`` when set) of K back-to-back
        calls each (:meth:`calibrate`), after ``warmup`` calls; fewer windows when ``max_seconds`` (default
        ``self.max_seconds``) runs out. The windows' per-call times stay in ``last_runs`` (``last_cut``: cut
        short; ``last_k``: K)."""
        iters = self.repeats or iters
        max_seconds = self.max_seconds if max_seconds is None else max_seconds
        for _ in range(warmup):
            fn()
        self.sync()
        k = self.calibrate(fn)
        times = []
        t_start = time.perf_counter()
        for _ in range(iters):
            times.append(self.window(fn, k) / k)
            if time.perf_counter() - t_start > max_seconds:
                break
        self.last_runs, self.last_cut, self.last_k = times, len(times) < iters, k
        return statistics.median(times)

    def interleaved_ms(self, calls, warmup=3, iters=None, max_seconds=None, errors=None):
        """The headline comparison: ``calls`` = {name: (context factory, fn)}; each ``fn`` runs inside its context
        (entered outside the timed windows). Every fn gets ``warmup`` calls, then they run in turn until
        ``warmup_seconds`` have passed (the GPU's clocks settle on this work), each is calibrated
        (:meth:`calibrate`), and then ``iters`` rounds (``pair_repeats``; ``repeats`` when set) time one window of
        each, in the names' order in even rounds and reversed in odd ones (A B, B A, A B, ...), so that a drift
        of the GPU's clocks or temperature falls on all of them alike. A fn that raises is dropped (its error in
        ``errors``). Returns {name: (median ms per call, per-call times, K, cut short by max_seconds)};
        ``last_order``: the windows' names in the order they ran."""
        iters = self.repeats or iters or self.pair_repeats
        max_seconds = self.max_seconds if max_seconds is None else max_seconds
        errors = {} if errors is None else errors
        live = dict(calls)

        def run(name, body):
            ctx, fn = live[name]
            try:
                with ctx():
                    return body(fn)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
                errors[name] = f"{type(e).__name__}: {e}"
                del live[name]
                return None

        def calls_of(n):
            def body(fn):
                for _ in range(n):
                    fn()
                self.sync()
            return body
        for name in list(live):
            run(name, calls_of(warmup))
        t0 = time.perf_counter()
        while live and time.perf_counter() - t0 < self.warmup_seconds:
            for name in list(live):
                run(name, calls_of(1))
        ks = {}
        for name in list(live):
            k = run(name, self.calibrate)
            if k is not None:
                ks[name] = k
        times = {name: [] for name in live}
        order = []
        t_start = time.perf_counter()
        rounds = 0
        for r in range(iters):
            names = list(live) if r % 2 == 0 else list(live)[::-1]
            for name in names:
                if name not in live:
                    continue
                w = run(name, lambda fn, name=name: self.window(fn, ks[name]))
                if w is not None:
                    times[name].append(w / ks[name])
                    order.append(name)
            rounds += 1
            if time.perf_counter() - t_start > max_seconds * max(1, len(live)):
                break
        self.last_order = order
        return {name: (statistics.median(times[name]), times[name], ks[name], rounds < iters)
                for name in live if times[name]}

    def timed(self, row, key, fn, **kw):
        """``row["times_ms"][key]`` = the median of ``fn`` (:meth:`median_ms`), every window's per-call time in
        ``row["runs_ms"][key]``, K in ``row["calls_per_window"][key]``, and ``key`` in
        ``row["cut_by_max_seconds"]`` when ``max_seconds`` cut it."""
        self._record(row, key, self.median_ms(fn, **kw), self.last_runs, self.last_k, self.last_cut)

    @staticmethod
    def _record(row, key, median, runs, k, cut):
        row["times_ms"][key] = median
        row.setdefault("runs_ms", {})[key] = runs
        row.setdefault("calls_per_window", {})[key] = k
        if cut:
            row.setdefault("cut_by_max_seconds", []).append(key)

    def timed_interleaved(self, row, kind, calls, **kw):
        """:meth:`interleaved_ms` of ``calls`` ({name: (context factory, fn)}) into ``row`` as ``<name>.<kind>``
        (as :meth:`timed`), the rounds' description in ``row["interleaved"][kind]``."""
        errors = row.setdefault("errors", {})
        got = self.interleaved_ms(calls, errors=errors, **kw)
        if not errors:
            del row["errors"]
        for name, (median, runs, k, cut) in got.items():
            self._record(row, f"{name}.{kind}", median, runs, k, cut)
        row.setdefault("interleaved", {})[kind] = dict(
            names=list(got), rounds=max((len(v[1]) for v in got.values()), default=0),
            order="one window each per round, in this order in even rounds and reversed in odd ones",
            warmup_seconds=self.warmup_seconds)

    def copy_bandwidth_gbs(self):
        """Device-to-device copy of ``copy_bytes`` (1 GiB): (bytes read + bytes written) / time, GB/s (timed as
        every measurement: K copies per window, median over 20 windows)."""
        n = self.copy_bytes

        def time_copy():
            src = torch.empty(n, dtype=torch.uint8, device=self.device).random_(0, 255)
            dst = torch.empty_like(src)
            return self.median_ms(lambda: dst.copy_(src), warmup=3, iters=20)
        ms = time_copy()
        if self.cuda:  # the 2 GiB of buffers went out of scope with time_copy
            torch.cuda.empty_cache()
        return 2 * n / (ms * 1e-3) / 1e9

    def warm_up(self, seconds=None):
        """``seconds`` (``warmup_seconds``) of GPU work before measuring, so that the first measurement does not
        run while the clocks ramp up: bf16 matmuls and 256 MiB copies, synchronised every 8 of each (a few ms).
        Returns the seconds spent (0 off a GPU)."""
        seconds = self.warmup_seconds if seconds is None else seconds
        if not self.cuda or seconds <= 0:
            return 0.0
        a = torch.randn(4096, 4096, device=self.device, dtype=torch.bfloat16)
        buf = torch.empty(1 << 28, dtype=torch.uint8, device=self.device)
        out = torch.empty_like(buf)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(8):
                a @ a
                out.copy_(buf)
            self.sync()
        del a, buf, out
        torch.cuda.empty_cache()
        return time.perf_counter() - t0

    def graph_step_us(self, step, steps=64):
        """Per-step device time of ``steps`` calls captured in one CUDA graph (None off a GPU): the median per
        replay (:meth:`median_ms`: K replays per window) / ``steps``."""
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


def _scan_bytes(b, d, n, l, elt):
    """Bytes any implementation must move in the forward, each tensor in its dtype: u, delta, z (b, d, l) and
    B, C (b, n, l) read once in the input dtype (``elt`` bytes), A (d, n), D and delta_bias (d) read once in
    fp32, out (b, d, l) written once in the input dtype."""
    return (3 * b * d * l + 2 * b * n * l) * elt + d * n * 4 + 2 * d * 4 + b * d * l * elt


def _conv_bytes(b, d, l, width, elt):
    """Bytes the conv forward must move: x (b, d, l), weight (d, width) and bias (d) read once, out (b, d, l)
    written once, all in ``elt``-byte elements."""
    return (2 * b * d * l + d * width + d) * elt


def _ratios(row, t, num, den, kinds=("fwd", "fwd_bwd"), bad=()):
    """row["ratio_<num>_over_<den>.<kind>"] = t[num.kind] / t[den.kind] for every kind both were timed; the key
    also goes into row["not_valid"] when ``num`` or ``den`` is among ``bad`` (a failed correctness check)."""
    for kind in kinds:
        if f"{num}.{kind}" in t and f"{den}.{kind}" in t:
            key = f"ratio_{num}_over_{den}.{kind}"
            row[key] = t[f"{num}.{kind}"] / t[f"{den}.{kind}"]
            if num in bad or den in bad:
                _not_valid(row, key)


def _not_valid(row, key):
    lst = row.setdefault("not_valid", [])
    if key not in lst:
        lst.append(key)


def _fraction_of_copy(row, res, name, t_ms, nbytes, bad=()):
    row[f"{name}.fwd_GBps"] = nbytes / (t_ms * 1e-3) / 1e9
    row[f"{name}.fwd_fraction_of_copy_bw"] = row[f"{name}.fwd_GBps"] / res["copy_bandwidth_GBps"]
    if name in bad:
        _not_valid(row, f"{name}.fwd_fraction_of_copy_bw")


def _refresh_fractions(res):
    """Every ``<name>.fwd_fraction_of_copy_bw`` again, over the reference copy bandwidth (once the end of the run
    measured it again)."""
    for section in ("selective_scan", "causal_conv1d"):
        for row in res.get(section, []):
            for key in [k for k in row if k.endswith(".fwd_GBps")]:
                row[key[: -len("_GBps")] + "_fraction_of_copy_bw"] = row[key] / res["copy_bandwidth_GBps"]


# ---------------------------------------------------------------------------------------------------------
# correctness checks


def _tolerance(name, dtype):
    """(rtol, atol) for tensor ``name``: outputs and states DESIGN's output tolerance of ``dtype``; gradients as
    tests/ops/tolerances.grad_tolerance (du, dx 2x, ddelta 5x rtol and 10x atol, dz as the output, weight
    gradients 1e-3 / 1e-3 in fp32, at least the output's tolerance in fp16 / bf16)."""
    rtol, atol = TOL.get(dtype, TOL[torch.float32])
    if not name.startswith("d") or name == "delta":
        return rtol, atol
    base = name[1:]
    if base in GRAD_TOL_SCALE:
        sr, sa = GRAD_TOL_SCALE[base]
        return rtol * sr, atol * sa
    if base == "z":
        return rtol, atol
    if dtype is torch.float32:
        return 1e-3, 1e-3
    return max(1e-3, rtol), max(1e-3, atol)


def _compare(got: dict, want: dict, dtype) -> dict:
    """One implementation's tensors against ours (same names): per tensor the max |difference| and what is
    allowed, 2 * (atol + rtol * max|ours|) (:data:`TOL`); ``ok`` when every tensor is there, finite, of ours'
    shape and within that."""
    diffs, allowed, ok = {}, {}, True
    for k, w in want.items():
        g = got.get(k)
        if g is None or w is None or tuple(g.shape) != tuple(w.shape):
            if w is not None:
                diffs[k], allowed[k], ok = None, None, False
            continue
        g32, w32 = g.detach().float(), w.detach().float()
        finite = bool(torch.isfinite(g32).all().item())
        diff = (g32 - w32).abs().max().item() if g32.numel() else 0.0
        scale = w32.abs().max().item() if w32.numel() else 0.0
        del g32, w32
        rtol, atol = _tolerance(k, dtype)
        diffs[k], allowed[k] = diff, 2 * (atol + rtol * scale)
        if not (finite and diff <= allowed[k]):  # a NaN difference fails too
            ok = False
    return dict(ok=ok, max_abs_diff=diffs, allowed=allowed)


def _check_outputs(row, impls, primary, outputs, dtype, record_max_out=False) -> dict:
    """Every implementation's outputs (``outputs(ctx, fn)``: output and gradients) against ``primary``'s, on the
    row's inputs: {name: _compare()}, and ``max_abs_diff_<name>_vs_<primary>`` in the row. An implementation
    that raises is an error of the row; none is compared when ``primary`` raises (or had already failed)."""
    checks = {}
    if primary in row.get("errors", {}):
        return checks
    try:
        want = outputs(*impls[primary])
    except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
        row.setdefault("errors", {})[primary] = f"{type(e).__name__}: {e}"
        return checks
    if record_max_out:
        row["max_abs_out"] = want["out"].float().abs().max().item()
    for name, (ctx, f) in impls.items():
        if name == primary or name in row.get("errors", {}):
            continue
        try:
            got = outputs(ctx, f)
        except Exception as e:  # noqa: BLE001
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            continue
        checks[name] = _compare(got, want, dtype)
        row[f"max_abs_diff_{name}_vs_{primary}"] = checks[name]["max_abs_diff"]["out"]
        del got
    return checks


def _suspects(checks: dict, primary: str, peers, errors=()) -> set:
    """The implementations whose numbers a failed check leaves without a valid comparison: each whose check
    against ours failed, and ours as well when a peer's check failed or no peer was checked (then nothing says
    which side is wrong), or when ours is among ``errors`` (it raised: nothing was compared with it)."""
    bad = {name for name, c in checks.items() if not c["ok"]}
    if bad and (any(p in bad for p in peers) or not any(p in checks for p in peers)) or primary in errors:
        bad.add(primary)
    return bad


def _finish_checks(row, checks, bad, title):
    """The row's ``checks``, ``checks_ok``, ``checks_failed`` and ``not_valid_columns``; a warning printed when a
    check failed."""
    row["checks"] = checks
    failed = sorted(name for name, c in checks.items() if not c["ok"])
    row["checks_ok"] = not failed and not bad
    if failed or bad:
        row["checks_failed"] = failed
        row["not_valid_columns"] = sorted(bad)
        what = ", ".join(f"{name} (max |diff| " + ", ".join(
            f"{k} {_fmt(v)} > {_fmt(checks[name]['allowed'][k])}"
            for k, v in checks[name]["max_abs_diff"].items()
            if v is None or not v <= checks[name]["allowed"][k]) + ")" for name in failed)
        print(f"\nWARNING: {title}: correctness check failed against ours: {what or ', '.join(sorted(bad))}; "
              f"every ratio and bandwidth fraction of {', '.join(sorted(bad))} in this row is NOT VALID "
              f"(kept, listed in not_valid)", flush=True)


def _fmt(v):
    return "missing" if v is None else f"{v:.3g}"


def _summarise(res):
    """``checks_ok_by_section`` and ``checks_ok`` (every row of every section run so far), and ``criteria``."""
    by = {}
    for section in ("selective_scan", "decode_step", "causal_conv1d"):
        if section in res:
            by[section] = all(r.get("checks_ok", True) for r in res[section])
    if "reference_small" in res:
        by["reference_small"] = res["reference_small"].get("checks_ok", True)
    res["checks_ok_by_section"] = by
    res["checks_ok"] = all(by.values())
    res["criteria"] = _criteria(res)


# the numbers the issues are judged on: (what, section, key template ({p}: our column), op, threshold, columns
# whose failed checks invalidate it, only at decode batch)
CRITERIA = [
    ("our forward at most 1.0x mamba-ssm's selective_scan_fn", "selective_scan", "ratio_{p}_over_mamba_ssm.fwd",
     "<=", 1.0, ("{p}", "mamba_ssm"), None),
    ("our forward+backward at most 1.0x mamba-ssm's", "selective_scan", "ratio_{p}_over_mamba_ssm.fwd_bwd", "<=",
     1.0, ("{p}", "mamba_ssm"), None),
    ("our forward at least 60 % of the copy bandwidth", "selective_scan", "{p}.fwd_fraction_of_copy_bw", ">=", 0.6,
     ("{p}",), None),
    ("Triton forward within 1.5x of our CUDA forward", "selective_scan", "ratio_emma_triton_over_{p}.fwd", "<=",
     1.5, ("emma_triton", "{p}"), None),
    ("one decode step (selective_state_update) under 10 us, device time (.graph)", "decode_step",
     "{p}.selective_state_update.graph", "<", 10.0, ("{p}.selective_state_update",), 1),
    ("our Triton decode step no slower than mamba-ssm's Triton selective_state_update, device time (.graph)",
     "decode_step", "ratio_emma_triton_over_mamba_ssm_triton.selective_state_update.graph", "<=", 1.0,
     ("emma_triton.selective_state_update", "mamba_ssm_triton.selective_state_update"), None),
]


def _criteria(res) -> list:
    """One entry per criterion and row: the value (None: not measured), the threshold, ``meets``, and ``valid``
    (False when a failed correctness check touches it)."""
    p = f"emma_{res.get('ours')}"
    out = []
    for text, section, key, op, threshold, cols, only_b in CRITERIA:
        key = key.format(p=p)
        for row in res.get(section, []):
            if only_b is not None and row.get("b") != only_b:
                continue
            value = row.get(key, row.get("times_us", {}).get(key))
            bad = set(row.get("not_valid_columns", []))
            valid = None if value is None else (key not in row.get("not_valid", [])
                                                and not bad & {c.format(p=p) for c in cols})
            meets = None if value is None else {"<=": value <= threshold, "<": value < threshold,
                                                ">=": value >= threshold}[op]
            where = (f"selective_scan b={row['b']} d={row['d']} n={row['n']} L={row['L']}" if section ==
                     "selective_scan" else f"decode_step b={row['b']} d={row['d']} n={row['n']}")
            out.append(dict(criterion=text, row=where, key=key, value=value, threshold=f"{op} {threshold:g}",
                            meets=meets, valid=valid))
    return out


# ---------------------------------------------------------------------------------------------------------
# measurements


def _scan_section(env, res, mssm_scan, backends, shapes):
    rows = res.setdefault("selective_scan", [])
    for shape in shapes:
        rows.append(_scan_row(env, res, mssm_scan, backends, *shape))
        if env.cuda:
            torch.cuda.empty_cache()  # the row's inputs went out of scope with _scan_row


def _scan_row(env, res, mssm_scan, backends, b, d, n, l):
    """One shape of the scan table: the headline comparison interleaved (ours, mamba-ssm, our Triton forward),
    every other implementation's fwd and fwd+bwd median, correctness checks, ratios, bandwidth."""
    x = _scan_inputs(env, b, d, n, l, requires_grad=True)
    dout = torch.randn(b, d, l, device=env.device, generator=env.generator(1)).to(env.dtype)
    row = dict(b=b, d=d, n=n, L=l, dtype=_dtype_name(env.dtype), times_ms={})
    primary = f"emma_{env.primary}"

    def ours(backend, det=None, triton_fwd=None, cuda_fwd=None, cuda_bwd=None, triton_bwd=None,
             triton_row_atomics=None):
        """(context factory, forward): the backend and the variant's settings - the backward's too, read when the
        backward runs - are entered around the timed windows, not inside the timed calls."""
        @contextlib.contextmanager
        def ctx():
            with ops.use_backend(backend), _triton_forward(triton_fwd), cuda_forward(cuda_fwd), \
                    cuda_backward(cuda_bwd), _triton_backward(triton_bwd), \
                    _triton_setting("BWD_ROW_ATOMICS", triton_row_atomics):
                yield

        def fwd():
            return ops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                      x["delta_bias"], True, deterministic=det)
        return ctx, fwd

    def fwd_bwd(f):
        def fb():
            out = f()
            torch.autograd.backward(out, dout)
            for v in x.values():
                v.grad = None
        return fb

    impls = {f"emma_{bk}": ours(bk) for bk in backends}
    impls[f"{primary}_deterministic"] = ours(env.primary, True)
    if "triton" in backends:  # the other Triton forward (same backward), to decide the default on a GPU
        other = "sequential" if _triton_forward_impl() == "chunked" else "chunked"
        impls[f"emma_triton_{other}"] = ours("triton", triton_fwd=other)
        impls["emma_triton_seqbwd"] = ours("triton", triton_bwd="sequential")  # the sequential backward
        # the chunked backward's dB / dC summed over its block's channels before the atomics (10 barriers per
        # state index) instead of one row per channel (4x the atomics, no barrier): BWD_ROW_ATOMICS
        impls["emma_triton_blocksum"] = ours("triton", triton_row_atomics=False)
    seq = f"{primary}_seq"  # the CUDA state-sequential forward (same backward), to decide the default
    seqbwd, both = f"{primary}_seqbwd", f"{primary}_seq_seqbwd"  # the state-sequential backward, alone and with it
    if env.primary in ("cuda", "cuda-emu"):
        impls[seq] = ours(env.primary, cuda_fwd="seq")
        impls[seqbwd] = ours(env.primary, cuda_bwd="seq")
        impls[both] = ours(env.primary, cuda_fwd="seq", cuda_bwd="seq")
    if mssm_scan is not None:
        impls["mamba_ssm"] = (contextlib.nullcontext, lambda: mssm_scan(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], delta_softplus=True))
    t = row["times_ms"]
    # the headline comparison first, interleaved: the forward (ours, mamba-ssm, our Triton forward), then the
    # forward+backward (ours, mamba-ssm)
    with torch.no_grad():
        env.timed_interleaved(row, "fwd", {k: impls[k] for k in (primary, "mamba_ssm", "emma_triton")
                                           if k in impls})
    env.timed_interleaved(row, "fwd_bwd", {k: (impls[k][0], fwd_bwd(impls[k][1])) for k in (primary, "mamba_ssm")
                                           if k in impls and k not in row.get("errors", {})})
    for name, (ctx, f) in impls.items():
        if name in row.get("errors", {}):
            continue
        try:
            with ctx():
                # a backward variant's forward is the one of the variant it comes from, timed there
                if f"{name}.fwd" not in t and not name.endswith(("_deterministic", "_seqbwd", "_blocksum")):
                    with torch.no_grad():
                        env.timed(row, f"{name}.fwd", f)
                if f"{name}.fwd_bwd" not in t:
                    env.timed(row, f"{name}.fwd_bwd", fwd_bwd(f), warmup=2, iters=8)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        if env.cuda:
            torch.cuda.empty_cache()
    # correctness: every implementation's output and gradients against ours, on these inputs
    names = list(x)

    def outputs(ctx, f):
        with ctx():
            out = f()
            grads = torch.autograd.grad(out, [x[k] for k in names], dout, allow_unused=True)
        return {"out": out.detach(), **{f"d{k}": g for k, g in zip(names, grads)}}
    checks = _check_outputs(row, impls, primary, outputs, env.dtype, record_max_out=True)
    bad = _suspects(checks, primary, ["mamba_ssm"], row.get("errors", {}))
    _finish_checks(row, checks, bad, f"selective_scan b={b} d={d} n={n} L={l}")
    _ratios(row, t, primary, "mamba_ssm", bad=bad)
    _ratios(row, t, seq, "mamba_ssm", bad=bad)
    _ratios(row, t, seq, primary, bad=bad)
    for name in (seqbwd, both):
        _ratios(row, t, name, "mamba_ssm", kinds=("fwd_bwd",), bad=bad)
        _ratios(row, t, name, primary, kinds=("fwd_bwd",), bad=bad)
    _ratios(row, t, "emma_triton", primary, bad=bad)  # issue 4: Triton forward within 1.5x of CUDA
    for other in ("chunked", "sequential"):
        _ratios(row, t, f"emma_triton_{other}", primary, bad=bad)
    _ratios(row, t, "emma_triton_seqbwd", "emma_triton", kinds=("fwd_bwd",), bad=bad)
    _ratios(row, t, "emma_triton_seqbwd", "mamba_ssm", kinds=("fwd_bwd",), bad=bad)
    _ratios(row, t, "emma_triton_blocksum", "emma_triton", kinds=("fwd_bwd",), bad=bad)
    _ratios(row, t, f"{primary}_deterministic", primary, kinds=("fwd_bwd",), bad=bad)
    nbytes = _scan_bytes(b, d, n, l, env.dtype.itemsize)
    row["fwd_bytes_min"] = nbytes
    for name in (primary, seq, "emma_triton", "emma_triton_chunked", "emma_triton_sequential",
                 "mamba_ssm"):
        if f"{name}.fwd" in t:
            _fraction_of_copy(row, res, name, t[f"{name}.fwd"], nbytes, bad=bad)
    if "triton" in backends:
        row["emma_triton_forward_impl"] = _triton_forward_impl()
    return row


def _ref_section(env, res):
    b, d, n, l = env.ref_shape
    x = _scan_inputs(env, b, d, n, l, requires_grad=True)
    dout = torch.randn(b, d, l, device=env.device, generator=env.generator(1)).to(env.dtype)
    row = dict(b=b, d=d, n=n, L=l, dtype=_dtype_name(env.dtype), times_ms={})
    names = list(x)

    def f():
        return ops.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)

    def fb():
        torch.autograd.backward(f(), dout)
    results = {}
    for backend in (env.primary, "torch"):
        with ops.use_backend(backend):
            with torch.no_grad():
                env.timed(row, f"{backend}.fwd", f, warmup=1, iters=3)
            env.timed(row, f"{backend}.fwd_bwd", fb, warmup=1, iters=3)
            out = f()
            grads = torch.autograd.grad(out, [x[k] for k in names], dout, allow_unused=True)
            results[backend] = {"out": out.detach(), **{f"d{k}": g for k, g in zip(names, grads)}}
    checks = {"torch": _compare(results["torch"], results[env.primary], env.dtype)}
    row["max_abs_diff_torch_vs_" + env.primary] = checks["torch"]["max_abs_diff"]["out"]
    bad = _suspects(checks, env.primary, ["torch"])
    _finish_checks(row, checks, bad, f"reference b={b} d={d} n={n} L={l}")
    for kind in ("fwd", "fwd_bwd"):
        key = f"speedup_{env.primary}_over_reference.{kind}"
        row[key] = row["times_ms"][f"torch.{kind}"] / row["times_ms"][f"{env.primary}.{kind}"]
        if bad:
            _not_valid(row, key)
    res["reference_small"] = row


def _conv_section(env, res, cc_fn, backends, quick):
    shapes = env.scan_shapes[:1] if quick else env.scan_shapes
    res["causal_conv1d"] = []
    for (b, d, _, l) in shapes:
        res["causal_conv1d"].append(_conv_row(env, res, cc_fn, backends, b, d, l))
        if env.cuda:
            torch.cuda.empty_cache()


def _conv_row(env, res, cc_fn, backends, b, d, l):
    """One shape of the conv table (width 4, SiLU): ours (each backend) vs causal-conv1d, fwd and fwd+bwd, and
    each one's output and gradients against ours."""
    g = env.generator()
    x = torch.randn(b, d, l, device=env.device, generator=g).to(env.dtype).requires_grad_()
    w = torch.randn(d, 4, device=env.device, generator=g).to(env.dtype).requires_grad_()
    bias = torch.randn(d, device=env.device, generator=g).to(env.dtype).requires_grad_()
    dout = torch.randn(b, d, l, device=env.device, generator=g).to(env.dtype)
    row = dict(b=b, d=d, L=l, width=4, dtype=_dtype_name(env.dtype), times_ms={})
    primary = f"emma_{env.primary}"

    def ours(backend):
        return (lambda: ops.use_backend(backend)), (lambda: ops.causal_conv1d(x, w, bias, "silu"))
    impls = {f"emma_{bk}": ours(bk) for bk in backends}
    if cc_fn is not None:
        impls["causal_conv1d"] = (contextlib.nullcontext, lambda: cc_fn(x, w, bias, activation="silu"))
    for name, (ctx, f) in impls.items():
        try:
            with ctx():
                with torch.no_grad():
                    env.timed(row, f"{name}.fwd", f)

                def fb(f=f):
                    torch.autograd.backward(f(), dout)
                    x.grad = w.grad = bias.grad = None
                env.timed(row, f"{name}.fwd_bwd", fb)
        except Exception as e:  # noqa: BLE001
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"

    def outputs(ctx, f):
        with ctx():
            out = f()
            dx, dw, db = torch.autograd.grad(out, [x, w, bias], dout, allow_unused=True)
        return {"out": out.detach(), "dx": dx, "dweight": dw, "dbias": db}
    checks = _check_outputs(row, impls, primary, outputs, env.dtype)
    bad = _suspects(checks, primary, ["causal_conv1d"], row.get("errors", {}))
    _finish_checks(row, checks, bad, f"causal_conv1d b={b} d={d} L={l}")
    t = row["times_ms"]
    _ratios(row, t, primary, "causal_conv1d", bad=bad)
    _ratios(row, t, "emma_triton", primary, bad=bad)
    nbytes = _conv_bytes(b, d, l, 4, env.dtype.itemsize)
    row["fwd_bytes_min"] = nbytes
    for name in (primary, "emma_triton", "causal_conv1d"):
        if f"{name}.fwd" in t:
            _fraction_of_copy(row, res, name, t[f"{name}.fwd"], nbytes, bad=bad)
    return row


def _decode_section(env, res, mssm_ssu, cc_update, backends):
    """One decode step (selective_state_update, causal_conv1d_update) per batch size: CUDA-graphed (device time,
    the criteria's column) and eager; each step's output and updated state checked against ours."""
    rows = []
    d, n, wdt = env.decode_dim, 16, 4
    primary = f"emma_{env.primary}"
    ssu_name, conv_name = "selective_state_update", "causal_conv1d_update"
    for b in env.decode_batches:
        g = env.generator()
        r = lambda *s: torch.randn(*s, device=env.device, generator=g)  # noqa: E731
        state = r(b, d, n)
        x, dt, z = r(b, d).to(env.dtype), r(b, d).to(env.dtype), r(b, d).to(env.dtype)
        A = -torch.rand(d, n, device=env.device, generator=g) - 0.5
        B, C = r(b, n).to(env.dtype), r(b, n).to(env.dtype)
        D, dt_bias = r(d), r(d)
        conv_state, cw, cb = r(b, d, wdt).to(env.dtype), r(d, wdt).to(env.dtype), r(d).to(env.dtype)
        state0, conv_state0 = state.clone(), conv_state.clone()
        row = dict(b=b, d=d, n=n, dtype=_dtype_name(env.dtype), state_dtype="float32", times_us={})
        # name -> (context factory, step(its state) -> out, "ssu" | "conv")
        impls = {}
        for bk in backends:
            use = (lambda bk=bk: ops.use_backend(bk))
            impls[f"emma_{bk}.{ssu_name}"] = (use, lambda st: ops.selective_state_update(
                st, x, dt, A, B, C, D, z, dt_bias, True), "ssu")
            impls[f"emma_{bk}.{conv_name}"] = (use, lambda st: ops.causal_conv1d_update(x, st, cw, cb, "silu"),
                                               "conv")
        # the raw kernel entry, without the Python input checks: launch cost only
        kern = ops._load(env.primary)
        impls[f"{primary}_raw.{ssu_name}"] = (contextlib.nullcontext, lambda st: kern.selective_state_update(
            st, x, dt, A, B, C, D, z, dt_bias, True), "ssu")
        if mssm_ssu is not None:
            impls[f"mamba_ssm_triton.{ssu_name}"] = (contextlib.nullcontext, lambda st: mssm_ssu(
                st, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True), "ssu")
        if cc_update is not None:
            impls[f"causal_conv1d.{conv_name}"] = (contextlib.nullcontext,
                                                   lambda st: cc_update(x, st, cw, cb, "silu"), "conv")
        # correctness first, from copies of the initial states (the timed steps below update theirs)
        results, errors = {}, {}
        for name, (ctx, step, kind) in impls.items():
            st = (state0 if kind == "ssu" else conv_state0).clone()
            try:
                with ctx():
                    out = step(st)
                results[name] = {"out": out, "state": st}
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
        checks, bad = {}, set()
        for op, kind, peer in ((ssu_name, "ssu", f"mamba_ssm_triton.{ssu_name}"),
                               (conv_name, "conv", f"causal_conv1d.{conv_name}")):
            mine = f"{primary}.{op}"
            op_checks = {name: _compare(results[name], results[mine], env.dtype) for name in results
                         if impls[name][2] == kind and name != mine and mine in results}
            checks.update(op_checks)
            bad |= _suspects(op_checks, mine, [peer], errors)
        for name, (ctx, step, kind) in impls.items():
            if name in errors:
                continue
            st = state if kind == "ssu" else conv_state
            try:
                with ctx():
                    f = (lambda step=step, st=st: step(st))
                    row["times_us"][f"{name}.eager"] = env.eager_step_us(f)
                    graph = env.graph_step_us(f)
                    if graph is not None:  # off a GPU: no graphs
                        row["times_us"][f"{name}.graph"] = graph
            except Exception as e:  # noqa: BLE001
                errors[name] = f"{type(e).__name__}: {e}"
        if errors:
            row["errors"] = errors
        _finish_checks(row, checks, bad, f"decode step b={b} d={d} n={n}")
        t = row["times_us"]
        for mode in ("graph", "eager"):  # issue 4: our Triton step no slower than mamba-ssm's Triton step
            for ours in (primary, "emma_triton"):
                num, den = f"{ours}.{ssu_name}", f"mamba_ssm_triton.{ssu_name}"
                if f"{num}.{mode}" in t and f"{den}.{mode}" in t:
                    key = f"ratio_{ours}_over_mamba_ssm_triton.{ssu_name}.{mode}"
                    row[key] = t[f"{num}.{mode}"] / t[f"{den}.{mode}"]
                    if num in bad or den in bad:
                        _not_valid(row, key)
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

    After the warm-up and the first copy-bandwidth measurement, the sections run in the order of what issues 3
    and 4 must show (the scan at the first shape, the decode step, the scan at the other shapes, then the conv
    and the reference), and ``save(res)``, when given, is called after each, so a run stopped by a time limit
    still leaves every finished section (``res["complete"]`` False; its bandwidth fractions then over the start's
    copy bandwidth alone). Last, the copy bandwidth is measured again and the fractions recomputed over the
    larger of the two.
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
               repeats=env.repeats or (f"per measurement (headline comparison {env.pair_repeats} interleaved rounds; "
                                       "other scan columns fwd 10, fwd+bwd 8; conv 10; reference 3)"),
               max_seconds=env.max_seconds, window_ms=env.window_ms, warmup_seconds=env.warmup_seconds,
               scan_shapes=[list(s) for s in (env.scan_shapes[:1] if quick else env.scan_shapes)],
               decode_columns=DECODE_COLUMNS)
    how = (f"per call = a window of K back-to-back calls / K, K so that a window lasts >= {env.window_ms:g} ms "
           "(calls_per_window), context managers entered outside the windows; median over the windows after a "
           "warm-up; ours, mamba-ssm and our Triton forward interleaved (alternating order) over "
           f"{env.repeats or env.pair_repeats} rounds after {env.warmup_seconds:g} s of their calls")
    if env.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        prop = torch.cuda.get_device_properties(0)
        res.update(device=torch.cuda.get_device_name(0), sm_count=prop.multi_processor_count,
                   capability=f"{prop.major}.{prop.minor}", cuda=torch.version.cuda,
                   timing=f"CUDA events ({QUEUE_AHEAD_CYCLES} GPU-sleep cycles queued ahead of each start event); "
                          + how)
    else:
        res.update(device="cpu", cuda=None, timing="wall clock; " + how)
    res["gpu_warmup_s"] = env.warm_up()
    start = env.copy_bandwidth_gbs()
    res["copy_bandwidth"] = dict(start_GBps=start, end_GBps=None, bytes=env.copy_bytes,
                                 reference="start_GBps (the end of the run has not measured it again)")
    res["copy_bandwidth_GBps"] = start  # the reference every *_fraction_of_copy_bw is over
    mssm_scan = mssm_ssu = cc_fn = cc_update = None
    if "peers" not in skip:
        mssm_scan, mssm_ssu, res["mamba_ssm_import"] = _import_mamba_ssm()
        cc_fn, cc_update, res["causal_conv1d_import"] = _import_causal_conv1d()
    backends = [env.primary]
    if "triton" not in skip and res["backends"].get("triton") == "available":
        backends.append("triton")
    res["complete"] = False
    steps = [lambda: _scan_section(env, res, mssm_scan, backends, env.scan_shapes[:1]),
             lambda: _decode_section(env, res, mssm_ssu, cc_update, backends)]
    if not quick:
        steps.append(lambda: _scan_section(env, res, mssm_scan, backends, env.scan_shapes[1:]))
    steps.append(lambda: _conv_section(env, res, cc_fn, backends, quick))
    if "ref" not in skip:
        steps.append(lambda: _ref_section(env, res))
    for step in steps:
        step()
        _summarise(res)
        save(res)
    end = env.copy_bandwidth_gbs()
    res["copy_bandwidth"].update(end_GBps=end, reference="max of start_GBps and end_GBps")
    res["copy_bandwidth_GBps"] = max(start, end)
    _refresh_fractions(res)
    _summarise(res)
    res["complete"] = True
    save(res)
    print_table(res)
    return res


def _valid_mark(row, key):
    return "  NOT VALID (failed check)" if key in row.get("not_valid", []) else ""


def _print_checks(row):
    if row.get("checks_ok") is False:
        print(f"  checks FAILED: {', '.join(row.get('checks_failed') or [])}; not valid: "
              f"{', '.join(row.get('not_valid_columns') or [])}")
    elif "checks_ok" in row:
        print(f"  checks ok ({len(row.get('checks', {}))} implementations against ours)")


def _print_row(title, row, times_key, unit, width=52):
    print(f"\n{title}")
    for k, v in row[times_key].items():
        print(f"  {k:{width}s} {v:9.3f} {unit}")
    for k, v in row.items():  # ratios, bandwidth, sanity differences
        if k.startswith(("ratio", "max_abs", "speedup")) or k.endswith(("_GBps", "_fraction_of_copy_bw")):
            print(f"  {k:{width}s} {_num(v)}{_valid_mark(row, k)}")
    _print_checks(row)
    if row.get("errors"):
        print(f"  errors: {row['errors']}")


def _num(v):
    return f"{'-':>9s}" if v is None else f"{v:9.4g}"


def _print_decode(row, width=56):
    print(f"\ndecode step b={row['b']} d={row['d']} n={row['n']} {row['dtype']}, us per step: graph = device time "
          "(the column the criteria use), eager = wall time per call, host launch included")
    t = row["times_us"]
    names = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in t))
    print(f"  {'':{width}s} {'graph':>9s} {'eager':>9s}")
    for name in names:
        print(f"  {name:{width}s} {_num(t.get(name + '.graph'))} {_num(t.get(name + '.eager'))}")
    for k, v in row.items():
        if k.startswith("ratio"):
            print(f"  {k:{width + 10}s} {_num(v)}{_valid_mark(row, k)}")
    _print_checks(row)
    if row.get("errors"):
        print(f"  errors: {row['errors']}")


def print_table(res: dict) -> None:
    print(f"\n{res['device']}  torch {res['torch']}  cuda {res['cuda']}  triton {res['triton']}  "
          f"mamba_ssm {res['mamba_ssm_version']}  causal_conv1d {res['causal_conv1d_version']}")
    cb = res.get("copy_bandwidth", {})
    print(f"device-to-device copy: {res['copy_bandwidth_GBps']:.0f} GB/s (start {_num(cb.get('start_GBps')).strip()}"
          f", end {_num(cb.get('end_GBps')).strip()}; reference: {cb.get('reference', 'start')})")
    for row in res.get("selective_scan", []):
        _print_row(f"selective_scan b={row['b']} d={row['d']} n={row['n']} L={row['L']} {row['dtype']}",
                   row, "times_ms", "ms")
    for row in res.get("decode_step", []):
        _print_decode(row)
    for row in res.get("causal_conv1d", []):
        _print_row(f"causal_conv1d b={row['b']} d={row['d']} L={row['L']} w=4 {row['dtype']}", row, "times_ms", "ms")
    if "reference_small" in res:
        row = res["reference_small"]
        print(f"\nreference (torch loop) b={row['b']} d={row['d']} L={row['L']}: " +
              ", ".join(f"{k} {v:.3f} ms" for k, v in row["times_ms"].items()))
        _print_checks(row)
    if res.get("criteria"):
        print("\ncriteria (decode: .graph, device time; .eager beside it in the table above)")
        for c in res["criteria"]:
            verdict = ("not measured" if c["value"] is None else
                       ("meets" if c["meets"] else "misses") + ("" if c["valid"] else ", NOT VALID (failed check)"))
            print(f"  {c['row']:34s} {c['key']:62s} {_num(c['value'])} {c['threshold']:>7s}  {verdict}")
    if res.get("checks_ok") is False:
        failed = [s for s, ok in res.get("checks_ok_by_section", {}).items() if not ok]
        print(f"\nWARNING: correctness checks FAILED in {', '.join(failed)}: the ratios and fractions marked NOT VALID "
              "compare implementations that do not compute the same result (numbers kept; see each row's checks)")


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
