"""The GPU kernel benchmark's method, checked where the CPU can check it (``emma_mamba/bench/kernels_gpu.py``).

* Timing: K back-to-back calls per timed window, K calibrated until a window lasts ``window_ms``, per call =
  window / K (a fake clock: the arithmetic, and a fixed per-window cost amortised over K); context managers are
  entered outside the windows; the headline comparison is interleaved, its order reversed every other round.
* The forward's minimum bytes, by hand for a tiny shape and against the tensors the benchmark builds.
* Correctness checks: a stand-in peer that returns a wrong result makes ``checks_ok`` false (row, section,
  overall), the ratios it touches ``not_valid`` (numbers kept), the criteria not valid, and a warning printed.
* The copy bandwidth measured at the start and at the end, the fractions over the larger.
* The decode rows say which column the criteria use.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from emma_mamba.bench import kernels_gpu as kg
from emma_mamba.ops import reference as ref

from .test_kernels_gpu_smoke import _fake_causal_conv1d, _fake_mamba_ssm


def _env(**kw):
    base = dict(scan_shapes=[(1, 8, 4, 20)], ref_shape=(1, 8, 4, 8), decode_batches=[1], decode_dim=8,
                copy_bytes=1 << 16, dtype=torch.float32)
    base.update(kw)
    return kg._Env("cpu", "cpu", **base)


class _Args:
    quick = True
    skip = ["triton", "ref"]


# ------------------------------------------------------------------------------------------------ timing


def test_calls_per_window_by_hand():
    assert kg.calls_per_window(0.4, 5.0) == 13      # ceil(5 / 0.4)
    assert kg.calls_per_window(0.5, 5.0) == 10
    assert kg.calls_per_window(6.0, 5.0) == 1       # one call already fills a window
    assert kg.calls_per_window(0.4, 0.0) == 1       # windows off (the CPU default): one call each
    assert kg.calls_per_window(1e-6, 5.0) == kg.MAX_CALLS_PER_WINDOW
    assert kg.calls_per_window(0.0, 5.0) == kg.MAX_CALLS_PER_WINDOW


def test_median_is_per_call_over_windows_of_k_calls_with_a_fake_clock(monkeypatch):
    """Each call advances a fake clock by 0.4 ms: K = 13 (the first window of 1 call says 0.4 ms; 13 of them
    make 5.2 >= 5 ms), every window's per-call time is 5.2 / 13 = 0.4, and the calls made are the warm-up, the
    calibration windows (1 + 13) and the timed ones (iters x 13)."""
    clock = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(kg.time, "perf_counter", lambda: clock["t"])

    def fn():
        clock["t"] += 0.4e-3
        clock["calls"] += 1
    env = _env(window_ms=5.0, max_seconds=1e9)
    ms = env.median_ms(fn, warmup=3, iters=7)
    assert env.last_k == 13 and ms == pytest.approx(0.4)
    assert env.last_runs == pytest.approx([0.4] * 7) and not env.last_cut
    assert clock["calls"] == 3 + 1 + 13 + 7 * 13


def test_a_windows_fixed_cost_is_amortised_over_k(monkeypatch):
    """A window that costs 2 ms beyond its calls (say, the host's first launch) and 0.5 ms per call: the
    calibration grows K 1 -> 2 -> 4 -> 8 (2.5, 3, 4, then 6 ms >= 5), and the per-call time reported is
    (2 + 8 x 0.5) / 8 = 0.75 ms, not the 2.5 ms of a window per call."""
    env = _env(window_ms=5.0)
    seen = []

    def window(fn, k):
        seen.append(k)
        return 2.0 + 0.5 * k
    monkeypatch.setattr(env, "window", window)
    ms = env.median_ms(lambda: None, warmup=0, iters=5)
    assert seen == [1, 2, 4, 8] + [8] * 5
    assert env.last_k == 8 and ms == pytest.approx(0.75) and env.last_runs == pytest.approx([0.75] * 5)


def test_the_real_cpu_window_runs_k_calls(monkeypatch):
    """The wall-clock window itself: K calls back to back, K above 1 for a call far shorter than window_ms; the
    row records K (calls_per_window) beside each median."""
    env = _env(window_ms=2.0, repeats=3)
    res = {"copy_bandwidth_GBps": 1.0}
    row = kg._conv_row(env, res, None, ["cpu"], 1, 8, 16)
    assert row["calls_per_window"]["emma_cpu.fwd"] > 1
    assert set(row["calls_per_window"]) == set(row["times_ms"])
    assert all(len(v) == 3 for v in row["runs_ms"].values())


def test_interleaved_order_alternates_and_contexts_stay_outside_the_windows(monkeypatch):
    """Three implementations over 4 rounds: A B C, C B A, A B C, C B A; each call runs inside its own context,
    which is never entered or left inside a timed window; after the warm-up calls each gets the same number of
    windows, one per round."""
    env = _env(window_ms=0.0)
    state = {"window": False, "ctx": None}
    real_window = env.window

    def window(fn, k):
        state["window"] = True
        try:
            return real_window(fn, k)
        finally:
            state["window"] = False
    monkeypatch.setattr(env, "window", window)

    def make(name):
        @contextlib.contextmanager
        def ctx():
            assert not state["window"], "context entered inside a timed window"
            state["ctx"] = name
            yield
            assert not state["window"], "context left inside a timed window"
            state["ctx"] = None

        def fn():
            assert state["ctx"] == name
        return ctx, fn
    got = env.interleaved_ms({n: make(n) for n in "ABC"}, warmup=2, iters=4)
    assert env.last_order == list("ABC" "CBA" "ABC" "CBA")
    assert set(got) == set("ABC") and all(len(runs) == 4 and k == 1 and not cut for _, runs, k, cut in got.values())


def test_interleaved_drops_a_failing_implementation_and_keeps_the_others():
    env = _env()

    def boom():
        raise RuntimeError("no kernel")
    row = {"times_ms": {}}
    env.timed_interleaved(row, "fwd", {"ours": (contextlib.nullcontext, lambda: None),
                                       "peer": (contextlib.nullcontext, boom)}, iters=3)
    assert set(row["times_ms"]) == {"ours.fwd"} and "no kernel" in row["errors"]["peer"]
    assert row["interleaved"]["fwd"]["names"] == ["ours"] and row["interleaved"]["fwd"]["rounds"] == 3


def test_headline_pair_is_interleaved_in_the_scan_row(monkeypatch):
    """In a scan row, ours and mamba-ssm are timed interleaved (30 rounds by default), forward and
    forward+backward; the deterministic column is timed on its own."""
    monkeypatch.setattr(kg, "_import_mamba_ssm", _fake_mamba_ssm)
    monkeypatch.setattr(kg, "_import_causal_conv1d", _fake_causal_conv1d)
    orders = []
    real = kg._Env.interleaved_ms

    def spy(self, calls, **kw):
        out = real(self, calls, **kw)
        orders.append(list(self.last_order))
        return out
    monkeypatch.setattr(kg._Env, "interleaved_ms", spy)
    res = kg.run_on(_env(), _Args())
    row = res["selective_scan"][0]
    assert row["interleaved"]["fwd"]["names"] == ["emma_cpu", "mamba_ssm"]
    assert row["interleaved"]["fwd_bwd"]["names"] == ["emma_cpu", "mamba_ssm"]
    assert row["interleaved"]["fwd"]["rounds"] == kg.PAIR_REPEATS == 30
    pair = ["emma_cpu", "mamba_ssm"]
    assert orders[0] == (pair + pair[::-1]) * 15 and orders[1] == orders[0]
    assert len(row["runs_ms"]["emma_cpu.fwd"]) == 30 and len(row["runs_ms"]["emma_cpu_deterministic.fwd_bwd"]) == 8
    assert "interleaved" in res["timing"] and res["window_ms"] == 0.0


# ------------------------------------------------------------------------------------------------ bytes


def test_scan_bytes_by_hand():
    # b=1, d=2, n=3, L=5, bf16: u, delta, z 3 x 10 x 2 = 60; B, C 2 x 15 x 2 = 60; A 6 x 4 = 24;
    # D, delta_bias 2 x 2 x 4 = 16; out 10 x 2 = 20
    assert kg._scan_bytes(1, 2, 3, 5, 2) == 60 + 60 + 24 + 16 + 20 == 180


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_scan_bytes_are_every_input_once_and_the_output_once(dtype):
    b, d, n, l = 2, 6, 4, 9
    x = kg._scan_inputs(_env(dtype=dtype), b, d, n, l, requires_grad=False)
    read = sum(v.numel() * v.element_size() for v in x.values())
    written = b * d * l * dtype.itemsize  # out, in the inputs' dtype
    assert kg._scan_bytes(b, d, n, l, dtype.itemsize) == read + written


def test_conv_bytes_by_hand():
    # b=1, d=2, L=5, width 4, bf16: x 10 x 2 + weight 8 x 2 + bias 2 x 2 + out 10 x 2
    assert kg._conv_bytes(1, 2, 5, 4, 2) == 20 + 16 + 4 + 20


# ------------------------------------------------------------------------------------------------ checks


def _wrong_mamba_ssm():
    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=False):
        return ref.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus) * 1.5

    def ssu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        return ref.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return scan, ssu, "wrong stand-in"


def test_a_wrong_peer_fails_the_checks_and_invalidates_its_ratios(monkeypatch, capsys):
    monkeypatch.setattr(kg, "_import_mamba_ssm", _wrong_mamba_ssm)
    monkeypatch.setattr(kg, "_import_causal_conv1d", _fake_causal_conv1d)
    res = kg.run_on(_env(), _Args())
    out = capsys.readouterr().out
    row = res["selective_scan"][0]
    assert row["checks_ok"] is False and row["checks_failed"] == ["mamba_ssm"]
    assert row["checks"]["mamba_ssm"]["ok"] is False and row["checks"]["emma_cpu_deterministic"]["ok"] is True
    assert row["checks"]["mamba_ssm"]["max_abs_diff"]["out"] > row["checks"]["mamba_ssm"]["allowed"]["out"]
    # which side is wrong is unknown: both columns' ratios and fractions are not valid, but kept
    assert set(row["not_valid_columns"]) == {"emma_cpu", "mamba_ssm"}
    for key in ("ratio_emma_cpu_over_mamba_ssm.fwd", "ratio_emma_cpu_over_mamba_ssm.fwd_bwd",
                "emma_cpu.fwd_fraction_of_copy_bw", "mamba_ssm.fwd_fraction_of_copy_bw",
                "ratio_emma_cpu_deterministic_over_emma_cpu.fwd_bwd"):
        assert key in row["not_valid"] and row[key] > 0
    assert res["checks_ok"] is False
    assert res["checks_ok_by_section"] == {"selective_scan": False, "decode_step": True, "causal_conv1d": True}
    crit = {c["key"]: c for c in res["criteria"] if c["row"].startswith("selective_scan")}
    assert crit["ratio_emma_cpu_over_mamba_ssm.fwd"]["valid"] is False
    assert crit["ratio_emma_cpu_over_mamba_ssm.fwd"]["value"] == row["ratio_emma_cpu_over_mamba_ssm.fwd"]
    assert "WARNING: selective_scan b=1 d=8 n=4 L=20: correctness check failed" in out
    assert "NOT VALID" in out and "WARNING: correctness checks FAILED in selective_scan" in out
    json.dumps(res)


def test_a_wrong_decode_peer_invalidates_the_decode_ratios(monkeypatch):
    def wrong():
        scan, _, _ = _fake_mamba_ssm()

        def ssu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
            out = ref.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
            state.mul_(2)  # a wrong state update
            return out
        return scan, ssu, "wrong stand-in"
    monkeypatch.setattr(kg, "_import_mamba_ssm", wrong)
    monkeypatch.setattr(kg, "_import_causal_conv1d", _fake_causal_conv1d)
    res = kg.run_on(_env(), _Args())
    row = res["decode_step"][0]
    assert row["checks_ok"] is False and row["checks_failed"] == ["mamba_ssm_triton.selective_state_update"]
    assert row["checks"]["mamba_ssm_triton.selective_state_update"]["max_abs_diff"]["out"] == pytest.approx(0, abs=1e-5)
    assert row["checks"]["causal_conv1d.causal_conv1d_update"]["ok"] is True
    assert row["not_valid"] == ["ratio_emma_cpu_over_mamba_ssm_triton.selective_state_update.eager"]
    assert res["checks_ok_by_section"]["decode_step"] is False and res["checks_ok_by_section"]["selective_scan"]


def test_suspects_by_hand():
    ok, bad = {"ok": True}, {"ok": False}
    # a variant disagrees while the peer agrees with ours: only the variant
    assert kg._suspects({"peer": ok, "variant": bad}, "ours", ["peer"]) == {"variant"}
    # the peer disagrees: ours too (nothing says which side is wrong)
    assert kg._suspects({"peer": bad, "variant": ok}, "ours", ["peer"]) == {"peer", "ours"}
    # no peer checked and a variant disagrees: ours too
    assert kg._suspects({"variant": bad}, "ours", ["peer"]) == {"variant", "ours"}
    assert kg._suspects({"peer": ok}, "ours", ["peer"]) == set()


def test_compare_tolerance_and_nan():
    want = {"out": torch.tensor([1.0, -2.0]), "du": torch.tensor([4.0, 0.0])}
    rtol, atol = kg.TOL[torch.bfloat16]
    allowed = 2 * (atol + rtol * 2.0)  # relative to the largest |ours|
    c = kg._compare({"out": torch.tensor([1.0, -2.0 + 0.9 * allowed]), "du": want["du"]}, want, torch.bfloat16)
    assert c["ok"] and c["allowed"]["out"] == pytest.approx(allowed)
    assert c["allowed"]["du"] == pytest.approx(2 * (2 * atol + 2 * rtol * 4.0))  # du: 2x the output's
    assert not kg._compare({"out": torch.tensor([1.0, -2.0 + 1.1 * allowed]), "du": want["du"]}, want,
                           torch.bfloat16)["ok"]
    assert not kg._compare({"out": torch.tensor([1.0, float("nan")]), "du": want["du"]}, want, torch.bfloat16)["ok"]
    assert not kg._compare({"out": want["out"]}, want, torch.bfloat16)["ok"]  # a gradient missing


# ------------------------------------------------------------------------------------------------ copy, decode


def test_copy_bandwidth_at_start_and_end_the_fractions_over_the_larger(monkeypatch):
    monkeypatch.setattr(kg, "_import_mamba_ssm", _fake_mamba_ssm)
    monkeypatch.setattr(kg, "_import_causal_conv1d", _fake_causal_conv1d)
    env = _env()
    measured = iter([100.0, 200.0])
    monkeypatch.setattr(env, "copy_bandwidth_gbs", lambda: next(measured))
    saves = []
    res = kg.run_on(env, _Args(), lambda r: saves.append(json.loads(json.dumps(r))))
    assert res["copy_bandwidth"]["start_GBps"] == 100.0 and res["copy_bandwidth"]["end_GBps"] == 200.0
    assert res["copy_bandwidth_GBps"] == 200.0 and "max" in res["copy_bandwidth"]["reference"]
    row = res["selective_scan"][0]
    assert row["emma_cpu.fwd_fraction_of_copy_bw"] == pytest.approx(row["emma_cpu.fwd_GBps"] / 200.0)
    first = saves[0]["selective_scan"][0]  # saved before the end's measurement: over the start's
    assert first["emma_cpu.fwd_fraction_of_copy_bw"] == pytest.approx(first["emma_cpu.fwd_GBps"] / 100.0)


def test_decode_columns_are_described_and_the_criteria_use_graph(monkeypatch, capsys):
    monkeypatch.setattr(kg, "_import_mamba_ssm", _fake_mamba_ssm)
    monkeypatch.setattr(kg, "_import_causal_conv1d", _fake_causal_conv1d)
    res = kg.run_on(_env(), _Args())
    out = capsys.readouterr().out
    assert set(res["decode_columns"]) == {"graph", "eager"}
    assert "criteria use" in res["decode_columns"]["graph"] and "host launch" in res["decode_columns"]["eager"]
    decode = [c for c in res["criteria"] if c["row"].startswith("decode_step")]
    assert {c["key"] for c in decode} == {"emma_cpu.selective_state_update.graph",
                                          "ratio_emma_triton_over_mamba_ssm_triton.selective_state_update.graph"}
    assert all(c["value"] is None for c in decode)  # no CUDA graphs off a GPU: not measured, never the eager one
    assert "graph = device time (the column the criteria use)" in out and "eager = wall time per call" in out
    # the GPU's decode criterion, on a row as a GPU run writes it
    fake = {"ours": "cuda", "decode_step": [{"b": 1, "d": 5120, "n": 16, "times_us": {
        "emma_cuda.selective_state_update.graph": 4.0, "emma_cuda.selective_state_update.eager": 30.0}}]}
    (step,) = [c for c in kg._criteria(fake) if c["value"] is not None]
    assert step["value"] == 4.0 and step["meets"] is True and step["valid"] is True and step["threshold"] == "< 10"
