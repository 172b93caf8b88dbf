"""The GPU kernel benchmark's code paths, driven on the CPU with tiny shapes.

GPU time is scarce: a benchmark that crashes on a typo wastes a device call. ``kernels_gpu.run_on`` takes the
device and the backend playing "ours" as parameters, so every section (scan, conv, decode, reference, the
ratios, bandwidth fractions and sanity differences) runs here with the ``cpu`` backend as "ours" and the
reference ops standing in for mamba-ssm and causal-conv1d (an independent oracle: the sanity differences
must be small). Only CUDA events and CUDA graphs are left to the GPU.
"""

import json

import pytest
import torch

from emma_mamba.bench import kernels_gpu as kg
from emma_mamba.ops import reference as ref


def _fake_mamba_ssm():
    def scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=False):  # selective_scan_fn's positional order
        return ref.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    def ssu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        return ref.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return scan, ssu, "reference stand-in"


def _fake_causal_conv1d():
    def fn(x, weight, bias=None, activation=None):
        return ref.causal_conv1d_ref(x, weight, bias, activation)

    def update(x, conv_state, weight, bias=None, activation=None):
        return ref.causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    return fn, update, "reference stand-in"


@pytest.fixture
def cpu_run(monkeypatch):
    monkeypatch.setattr(kg, "_import_mamba_ssm", _fake_mamba_ssm)
    monkeypatch.setattr(kg, "_import_causal_conv1d", _fake_causal_conv1d)
    env = kg._Env("cpu", "cpu", scan_shapes=[(2, 16, 4, 33), (1, 8, 4, 70)], ref_shape=(1, 8, 4, 16),
                  decode_batches=[1, 3], decode_dim=16, copy_bytes=1 << 20, dtype=torch.float32)

    class Args:
        quick = False
        skip = ["triton"]  # the interpreter would take minutes over the repeats
    saves = []

    def save(res):  # what main() writes to --out after each section
        saves.append(json.loads(json.dumps(res)))
    res = kg.run_on(env, Args(), save)
    res["_saves"] = saves
    return res


def test_sections_are_saved_as_they_finish_in_must_show_order(cpu_run):
    # a GPU run cut short by its time limit keeps every finished section: scan at the first (mamba-2.8b, L=2048)
    # shape, then the decode step, the other scan shapes (L=8192: issue 3 names it), the conv, the reference; the
    # last save also has the end's copy bandwidth
    seen = [(len(r.get("selective_scan", [])), "decode_step" in r, "causal_conv1d" in r, "reference_small" in r,
             r["complete"]) for r in cpu_run["_saves"]]
    assert seen == [(1, False, False, False, False), (1, True, False, False, False), (2, True, False, False, False),
                    (2, True, True, False, False), (2, True, True, True, False), (2, True, True, True, True)]
    assert [r["copy_bandwidth"]["end_GBps"] is None for r in cpu_run["_saves"]] == [True] * 5 + [False]
    assert all("start_GBps" in r["copy_bandwidth"]["reference"] for r in cpu_run["_saves"][:5])


def test_every_section_runs_and_is_json(cpu_run, capsys):
    res = json.loads(json.dumps({k: v for k, v in cpu_run.items() if k != "_saves"}))  # what --out writes
    assert res["device"] == "cpu" and res["ours"] == "cpu" and res["copy_bandwidth_GBps"] > 0
    assert [(r["b"], r["L"]) for r in res["selective_scan"]] == [(2, 33), (1, 70)]
    assert [(r["b"], r["L"]) for r in res["causal_conv1d"]] == [(2, 33), (1, 70)]
    assert [r["b"] for r in res["decode_step"]] == [1, 3]
    for section in ("selective_scan", "causal_conv1d", "decode_step"):
        for row in res[section]:
            assert "errors" not in row, row["errors"]
            assert row["checks_ok"] is True and "not_valid" not in row  # ours and the stand-ins agree
    assert res["checks_ok"] is True and res["reference_small"]["checks_ok"] is True
    assert res["checks_ok_by_section"] == dict.fromkeys(
        ("selective_scan", "decode_step", "causal_conv1d", "reference_small"), True)
    capsys.readouterr()
    kg.print_table(res)
    out = capsys.readouterr().out
    assert "selective_scan b=2 d=16 n=4 L=33 float32" in out and "decode step b=3" in out


def test_scan_row_times_ratios_and_sanity(cpu_run):
    for row in cpu_run["selective_scan"]:
        t = row["times_ms"]
        assert set(t) == {"emma_cpu.fwd", "emma_cpu.fwd_bwd", "emma_cpu_deterministic.fwd_bwd",
                          "mamba_ssm.fwd", "mamba_ssm.fwd_bwd"}
        assert all(v > 0 for v in t.values())
        for kind in ("fwd", "fwd_bwd"):
            assert row[f"ratio_emma_cpu_over_mamba_ssm.{kind}"] == pytest.approx(
                t[f"emma_cpu.{kind}"] / t[f"mamba_ssm.{kind}"])
        # the peer here is the reference: the kernel must agree with it (fp32 tolerance of DESIGN)
        assert row["max_abs_diff_mamba_ssm_vs_emma_cpu"] < 1e-4 * max(1.0, row["max_abs_out"])
        b, d, n, l = row["b"], row["d"], row["n"], row["L"]
        # u, delta, z, B, C read and out written in fp32 here; A (d, n), D, delta_bias (d) read once in fp32
        assert row["fwd_bytes_min"] == (4 * b * d * l + 2 * b * n * l) * 4 + d * n * 4 + 2 * d * 4
        assert row["emma_cpu.fwd_GBps"] == pytest.approx(row["fwd_bytes_min"] / (t["emma_cpu.fwd"] * 1e-3) / 1e9)
        assert row["emma_cpu.fwd_fraction_of_copy_bw"] == pytest.approx(
            row["emma_cpu.fwd_GBps"] / cpu_run["copy_bandwidth_GBps"])


def test_conv_and_decode_rows(cpu_run):
    for row in cpu_run["causal_conv1d"]:
        t = row["times_ms"]
        assert {"emma_cpu.fwd", "emma_cpu.fwd_bwd", "causal_conv1d.fwd", "causal_conv1d.fwd_bwd"} <= set(t)
        assert row["ratio_emma_cpu_over_causal_conv1d.fwd"] == pytest.approx(
            t["emma_cpu.fwd"] / t["causal_conv1d.fwd"])
    for row in cpu_run["decode_step"]:
        t = row["times_us"]
        # no CUDA graphs off a GPU: eager only
        assert all(k.endswith(".eager") for k in t)
        assert {"emma_cpu.selective_state_update.eager", "emma_cpu_raw.selective_state_update.eager",
                "emma_cpu.causal_conv1d_update.eager", "mamba_ssm_triton.selective_state_update.eager",
                "causal_conv1d.causal_conv1d_update.eager"} <= set(t)
        assert row["ratio_emma_cpu_over_mamba_ssm_triton.selective_state_update.eager"] == pytest.approx(
            t["emma_cpu.selective_state_update.eager"] / t["mamba_ssm_triton.selective_state_update.eager"])
    ref_row = cpu_run["reference_small"]
    assert ref_row["speedup_cpu_over_reference.fwd"] == pytest.approx(
        ref_row["times_ms"]["torch.fwd"] / ref_row["times_ms"]["cpu.fwd"])


def test_ratio_helper_by_hand():
    row = {}
    kg._ratios(row, {"a.fwd": 3.0, "b.fwd": 2.0, "a.fwd_bwd": 1.0}, "a", "b")
    assert row == {"ratio_a_over_b.fwd": 1.5}  # fwd_bwd of b missing: no ratio


TRITON_SCRIPT = """
import json, torch
from emma_mamba.bench import kernels_gpu as kg
env = kg._Env("cpu", "cpu", scan_shapes=[(1, 8, 4, 20)], ref_shape=(1, 8, 4, 16), decode_batches=[1],
              decode_dim=8, copy_bytes=1 << 20, dtype=torch.float32, repeats=1)  # (the interpreter is slow)
class Args:
    quick = False
    skip = ["peers", "ref"]
print("RESULT" + json.dumps(kg.run_on(env, Args())))
"""


def test_triton_columns_under_the_interpreter():
    """The Triton rows (both scan forwards, conv, decode steps) and their ratios, on Triton's CPU interpreter
    (a fresh process: the interpreter must be on before triton is first imported)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1", EMMA_TRITON_SCAN_FWD="chunked")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    scan, conv, dec = res["selective_scan"][0], res["causal_conv1d"][0], res["decode_step"][0]
    for row in (scan, conv, dec):
        assert "errors" not in row, row["errors"]
    assert scan["emma_triton_forward_impl"] == "chunked"
    for kind in ("fwd", "fwd_bwd"):
        assert scan[f"ratio_emma_triton_over_emma_cpu.{kind}"] == pytest.approx(
            scan["times_ms"][f"emma_triton.{kind}"] / scan["times_ms"][f"emma_cpu.{kind}"])
        assert f"ratio_emma_triton_sequential_over_emma_cpu.{kind}" in scan
        assert f"ratio_emma_triton_over_emma_cpu.{kind}" in conv
    # both Triton forwards compute the same function as ours
    assert scan["max_abs_diff_emma_triton_vs_emma_cpu"] < 1e-4 * max(1.0, scan["max_abs_out"])
    assert scan["max_abs_diff_emma_triton_sequential_vs_emma_cpu"] < 1e-4 * max(1.0, scan["max_abs_out"])
    assert {"emma_triton.selective_state_update.eager", "emma_triton.causal_conv1d_update.eager"} <= set(dec["times_us"])
    # the sequential backward's column: fwd+bwd timed, ratio against the default Triton backward
    assert scan["ratio_emma_triton_blocksum_over_emma_triton.fwd_bwd"] == pytest.approx(
        scan["times_ms"]["emma_triton_blocksum.fwd_bwd"] / scan["times_ms"]["emma_triton.fwd_bwd"])
    assert "emma_triton_blocksum.fwd" not in scan["times_ms"]  # its forward is emma_triton's
    assert scan["ratio_emma_triton_seqbwd_over_emma_triton.fwd_bwd"] == pytest.approx(
        scan["times_ms"]["emma_triton_seqbwd.fwd_bwd"] / scan["times_ms"]["emma_triton.fwd_bwd"])


def test_cuda_forward_variants_under_the_emulator(monkeypatch):
    """With the CUDA kernels as "ours" (under the CPU emulator): the scan row times both CUDA forwards, the
    default and the state-sequential one, and they compute the same function; and both backwards: the
    seq-backward columns' backward passes really run with EMMA_CUDA_SCAN_BWD=seq (it is read when the
    backward runs, after the forward returned)."""
    import os

    from emma_mamba.ops import _autograd

    seen = []
    real_backward = _autograd.SelectiveScanFn.backward

    def backward(ctx, *grads):
        seen.append(os.environ.get("EMMA_CUDA_SCAN_BWD"))
        return real_backward(ctx, *grads)

    monkeypatch.setattr(_autograd.SelectiveScanFn, "backward", staticmethod(backward))
    monkeypatch.setattr(kg, "_import_mamba_ssm", _fake_mamba_ssm)
    monkeypatch.setattr(kg, "_import_causal_conv1d", _fake_causal_conv1d)
    env = kg._Env("cpu", "cuda-emu", scan_shapes=[(1, 8, 16, 40)], ref_shape=(1, 8, 4, 16), decode_batches=[1],
                  decode_dim=8, copy_bytes=1 << 20, dtype=torch.float32)

    class Args:
        quick = True
        skip = ["triton", "ref"]
    res = kg.run_on(env, Args())
    row = res["selective_scan"][0]
    assert "errors" not in row, row.get("errors")
    t = row["times_ms"]
    assert {"emma_cuda-emu.fwd", "emma_cuda-emu_seq.fwd", "emma_cuda-emu_seq.fwd_bwd"} <= set(t)
    assert row["ratio_emma_cuda-emu_seq_over_emma_cuda-emu.fwd"] == pytest.approx(
        t["emma_cuda-emu_seq.fwd"] / t["emma_cuda-emu.fwd"])
    assert row["max_abs_diff_emma_cuda-emu_seq_vs_emma_cuda-emu"] < 1e-4 * max(1.0, row["max_abs_out"])
    assert row["max_abs_diff_mamba_ssm_vs_emma_cuda-emu"] < 1e-4 * max(1.0, row["max_abs_out"])
    for name in ("emma_cuda-emu_seqbwd", "emma_cuda-emu_seq_seqbwd"):
        assert row[f"ratio_{name}_over_emma_cuda-emu.fwd_bwd"] == pytest.approx(
            t[f"{name}.fwd_bwd"] / t["emma_cuda-emu.fwd_bwd"])
    assert "seq" in seen and None in seen  # the seq-backward columns ran it, the others the default
