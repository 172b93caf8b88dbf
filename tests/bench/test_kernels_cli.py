"""`emma-mamba bench kernels`: its options checked before any work, the CPU table on tiny shapes (raw repeats,
--max-seconds cuts, skipped peers, failed memory children, Ctrl-C), and the GPU path's options (driven here with
kernels_gpu's measuring replaced: no GPU needed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from emma_mamba.bench import kernels, kernels_gpu

TINY = ["--device", "cpu", "--shapes", "16x4x24", "--batch", "1", "--repeats", "2", "--threads", "1"]


def _one_row(run_cli, out, *options):
    """A CPU run of one shape at batch 1 -> (exit status, stdout, its row in the JSON)."""
    rc, stdout, _ = run_cli(["bench", "kernels", "--device", "cpu", "--batch", "1", *options, "--out", str(out)])
    return rc, stdout, json.loads(out.read_text())["results"][0] if rc == 0 else None


@pytest.mark.parametrize("extra, msg", [
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--batch", "2", "1", "2"], "argument --batch: given more than once: 2"),
    (["--shapes", "0x16x64"], "argument --shapes: '0x16x64': every size must be >= 1"),
    (["--shapes", "64x4"], "argument --shapes: '64x4' is not DxNxL"),
    (["--shapes", "64x4x8", "64x4x8"], "argument --shapes: given more than once: 64x4x8"),
    (["--max-seconds", "-1"], "argument --max-seconds: must be >= 0"),
    (["--seq-bwd-max-len", "0"], "argument --seq-bwd-max-len: must be >= 1, got 0"),
])
def test_bad_options_are_argparse_errors_before_any_work(extra, msg, tmp_path, run_cli):
    rc, _, err = run_cli(["bench", "kernels", "--device", "cpu", "--out", str(tmp_path / "k.json")] + extra)
    assert rc == 2 and msg in err, err
    assert not (tmp_path / "k.json").exists()


def test_a_shape_too_large_for_the_memory_is_refused_before_any_work(tmp_path, monkeypatch, run_cli):
    # 4 bytes x (10 x 16 + 16) per (batch, d, seqlen) element: 4096 x 16 x 4096 at batch 2 needs ~22 GiB
    monkeypatch.setattr(kernels, "_mem_available", lambda: 8 * 2**30)
    out = tmp_path / "k.json"
    rc, stdout, _ = run_cli(["bench", "kernels", "--device", "cpu", "--shapes", "64x4x8", "4096x16x4096", "--batch",
                             "1", "2", "--out", str(out)])
    assert "--shapes 4096x16x4096 at --batch 2 needs ~22.0 GiB" in str(rc) and "8.0 GiB is available" in str(rc)
    assert "--skip ref peers" in str(rc) and not out.exists() and "ours" not in stdout
    # without the reference and the peers, two floats per element: ~4.5 GiB fits
    assert kernels.memory_problem(kernels.argparse.Namespace(
        shapes=[(4096, 16, 4096)], batch=[2], skip=["ref", "peers"])) is None
    monkeypatch.setattr(kernels, "_mem_available", lambda: None)  # not Linux: not checked
    assert kernels.memory_problem(kernels.argparse.Namespace(shapes=[(4096, 16, 4096)], batch=[2], skip=[])) is None


def test_bad_out_fails_before_the_run(tmp_path, monkeypatch, run_cli):
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_cli(["bench", "kernels", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 2 and "is a directory" in err
    rc, _, err = run_cli(["bench", "kernels", "--device", "cpu", "--out", str(tmp_path / "afile" / "k.json")])
    assert rc == 2 and f"{tmp_path / 'afile'} is a file" in err
    # the default path is checked too: here ./bench_results is a file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench_results").write_text("x")
    rc, out, err = run_cli(["bench", "kernels"] + TINY)
    assert "--out: cannot create the folder" in str(rc) and "ours" not in out


def test_default_out_is_bench_results_not_the_committed_folder(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_cli(["bench", "kernels"] + TINY + ["--skip", "ref", "peers", "memory"])
    assert rc == 0
    assert (tmp_path / "bench_results" / "kernels_cpu.json").is_file()
    assert not (tmp_path / "benchmarks").exists()


def test_json_records_repeats_raw_times_and_the_machine(tmp_path, monkeypatch, run_cli):
    out = tmp_path / "k.json"
    argv = ["bench", "kernels"] + TINY + ["--batch", "2", "1", "--skip", "ref", "peers", "memory", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["emma-mamba"] + argv)  # what the command line records
    rc, _, _ = run_cli(argv)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["repeats"] == 2 and res["max_seconds"] == 20.0 and res["complete"] is True
    assert [r["batch"] for r in res["results"]] == [1, 2]  # --batch sorted
    for row in res["results"]:
        assert len(row["fwd_runs_s"]["ours"]) == len(row["fwd_bwd_runs_s"]["ours"]) == 2
        assert row["fwd_s"]["ours"] == pytest.approx(sorted(row["fwd_runs_s"]["ours"])[0] / 2
                                                     + sorted(row["fwd_runs_s"]["ours"])[1] / 2)
        assert len(row["exp_floor_runs_s"]) == 2 and row["cut_by_max_seconds"] == []
    m = res["machine"]
    for key in ("argv", "loadavg_1_5_15_before", "loadavg_1_5_15_after", "cpu_model", "processor", "cpu_count",
                "emma_mamba", "git_commit", "cpu_isa", "torch", "python", "threads", "torch_threads"):
        assert key in m, key
    assert m["processor"] and m["threads"] == 1 and m["argv"] == ["emma-mamba"] + argv


def test_max_seconds_cut_is_recorded(tmp_path, run_cli):
    rc, stdout, row = _one_row(run_cli, tmp_path / "k.json", "--shapes", "16x4x24", "--repeats", "3",
                               "--max-seconds", "0", "--skip", "ref", "peers", "memory")
    assert rc == 0
    assert len(row["fwd_runs_s"]["ours"]) == 1
    assert set(row["cut_by_max_seconds"]) == {"ours.fwd", "ours.fwd_bwd", "exp_floor"}
    assert "(--max-seconds: fwd 1 of 3 runs" in stdout


def test_skipping_pscan_with_the_sequential_backward_untimed(tmp_path, run_cli):
    """--skip mambapy_pscan at L > --seq-bwd-max-len: no mambapy backward was timed (it used to crash in min())."""
    pytest.importorskip("mambapy")
    rc, stdout, row = _one_row(run_cli, tmp_path / "k.json", "--shapes", "16x4x40", "--repeats", "1",
                               "--seq-bwd-max-len", "32", "--skip", "ref", "memory", "mambapy_pscan")
    assert rc == 0
    assert "mambapy_seq" in row["fwd_s"] and "mambapy_seq" not in row["fwd_bwd_s"]
    assert "fwd_speedup_vs_best_mambapy" in row["ratios"]
    assert "fwd_bwd_speedup_vs_best_mambapy" not in row["ratios"]
    table = stdout.split("| b | d |")[1]
    assert "nan" not in table and "| - | - |" in table


def test_table_prints_a_dash_for_what_was_not_measured(capsys):
    row = {"batch": 1, "d": 8, "dstate": 4, "seqlen": 16, "fwd_s": {"ours": 1e-3}, "fwd_bwd_s": {"ours": 2e-3},
           "peak_mem_fwd_bwd_bytes": {}, "exp_floor_s": 1e-3, "ratios": {"fwd_vs_exp_floor": 1.0}}
    kernels.print_table({"results": [row]})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "nan" not in line and line.count("| - |") >= 2


def test_a_failed_memory_child_says_why(tmp_path, monkeypatch, run_cli):
    monkeypatch.setattr(kernels, "_MEM_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    mem, why = kernels.peak_memory_fwd_bwd("ours", 1, 8, 4, 16)
    assert mem is None and why.startswith("killed by SIGKILL")
    monkeypatch.setattr(kernels, "_MEM_CHILD", "import sys; sys.exit('no memory for you')")
    out = tmp_path / "k.json"
    rc, stdout, _ = run_cli(["bench", "kernels"] + TINY + ["--skip", "ref", "peers", "--out", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["peak_mem_fwd_bwd_bytes"] == {"ours": None}
    assert row["peak_mem_fwd_bwd_errors"]["ours"] == "exit status 1: no memory for you"
    assert "peak memory ours           no number: exit status 1: no memory for you" in stdout


def test_ctrl_c_writes_the_finished_rows(tmp_path, monkeypatch, run_cli):
    calls = []
    real = kernels.time_exp_floor

    def floor(*a):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(kernels, "time_exp_floor", floor)
    out = tmp_path / "k.json"
    rc, _, err = run_cli(["bench", "kernels"] + TINY + ["--batch", "1", "2", "--skip", "ref", "peers", "memory",
                                                     "--out", str(out)])
    assert rc == 130
    assert err.strip().splitlines() == [f"interrupted (the finished sections are in {out})"]
    res = json.loads(out.read_text())
    assert res["interrupted"] is True and res["complete"] is False
    assert [r["batch"] for r in res["results"]] == [1]


def _sigint_as_at_a_terminal():
    """The child's SIGINT as a terminal's Ctrl-C meets it: a pytest started as a background job (``cmd &``) has
    SIGINT ignored, which its children would inherit (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_in_a_real_process(tmp_path):
    """A real Ctrl-C: exit status 130, one line, no traceback, the first row on disk."""
    out = tmp_path / "k.json"
    p = subprocess.Popen([sys.executable, "-m", "emma_mamba.cli", "bench", "kernels", "--device", "cpu",
                          "--shapes", "16x4x24", "512x16x4096", "--batch", "1", "--repeats", "1000",
                          "--max-seconds", "60", "--threads", "1", "--skip", "peers", "memory",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=_sigint_as_at_a_terminal)
    try:
        for line in p.stdout:  # the first shape done (its row saved), the second being timed
            if line.startswith("  -> exp floor"):
                break
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err
    res = json.loads(out.read_text())
    assert res["interrupted"] is True and [r["d"] for r in res["results"]] == [16]


def test_bench_help_prints_the_commands(run_cli):
    rc, out, _ = run_cli(["bench", "--help"])
    assert rc == 0 and "bench kernels" in out and "bench lm" in out and "bench latency" in out


# ------------------------------------------------------------------------------------------------ --device cuda

@pytest.fixture
def fake_gpu(monkeypatch):
    """torch "sees" a GPU and kernels_gpu's measuring is replaced: what the GPU path gets, and when it saves."""
    seen = {}

    def run_on(env, args=None, save=None, res=None):
        seen.update(env=env, args=args)
        res.update(selective_scan=[{"b": 1}], complete=False)
        save(res)
        seen["first_save"] = json.loads(open(seen["out"]).read())  # on disk before the run goes on
        if seen.get("interrupt"):
            raise KeyboardInterrupt
        res.update(decode_step=[{"b": 1}], complete=True)
        save(res)
        return res

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(kernels_gpu, "run_on", run_on)
    return seen


@pytest.mark.parametrize("extra, named", [
    (["--threads", "2"], "--threads"),
    (["--seq-bwd-max-len", "64"], "--seq-bwd-max-len"),
    (["--skip", "memory"], "--skip memory"),
    (["--skip", "mambapy_pscan"], "--skip mambapy_pscan"),
])
def test_cuda_refuses_the_cpu_only_options(extra, named, fake_gpu, tmp_path, run_cli):
    rc, _, _ = run_cli(["bench", "kernels", "--device", "cuda", "--out", str(tmp_path / "k.json")] + extra)
    assert named in str(rc) and "CPU-only" in str(rc)
    assert "env" not in fake_gpu


@pytest.mark.parametrize("extra, named", [(["--quick"], "--quick"), (["--skip", "triton"], "--skip triton")])
def test_cpu_refuses_the_cuda_only_options(extra, named, tmp_path, run_cli):
    rc, _, _ = run_cli(["bench", "kernels", "--device", "cpu", "--out", str(tmp_path / "k.json")] + extra)
    assert named in str(rc) and "--device cuda only" in str(rc)


def test_cuda_takes_shapes_batch_repeats_max_seconds_quick_skip(fake_gpu, tmp_path, run_cli):
    out = tmp_path / "k.json"
    fake_gpu["out"] = out
    rc, _, _ = run_cli(["bench", "kernels", "--device", "cuda", "--shapes", "256x16x512", "128x8x1024",
                     "--batch", "4", "2", "--repeats", "3", "--max-seconds", "5", "--quick",
                     "--skip", "peers", "triton", "--out", str(out)])
    assert rc == 0
    env, args = fake_gpu["env"], fake_gpu["args"]
    assert env.scan_shapes == [(2, 256, 16, 512), (4, 256, 16, 512), (2, 128, 8, 1024), (4, 128, 8, 1024)]
    assert env.repeats == 3 and env.max_seconds == 5.0 and env.device.type == "cuda"
    assert args.quick and args.skip == ["peers", "triton"]
    # saved after each section, each time with the machine record
    assert fake_gpu["first_save"]["selective_scan"] == [{"b": 1}] and "decode_step" not in fake_gpu["first_save"]
    assert "loadavg_1_5_15_after" in fake_gpu["first_save"]["machine"]
    assert json.loads(out.read_text())["complete"] is True


def test_cuda_defaults_to_kernels_gpu_shapes_and_takes_batch_alone(fake_gpu, tmp_path, run_cli):
    fake_gpu["out"] = tmp_path / "k.json"
    assert run_cli(["bench", "kernels", "--device", "cuda", "--out", str(fake_gpu["out"])])[0] == 0
    assert fake_gpu["env"].scan_shapes == kernels_gpu.SCAN_SHAPES and fake_gpu["env"].repeats is None
    assert run_cli(["bench", "kernels", "--device", "cuda", "--batch", "1", "--out", str(fake_gpu["out"])])[0] == 0
    assert fake_gpu["env"].scan_shapes == [(1, d, n, l) for (_, d, n, l) in kernels_gpu.SCAN_SHAPES]


def test_cuda_ctrl_c_keeps_the_finished_sections(fake_gpu, tmp_path, run_cli):
    out = tmp_path / "k.json"
    fake_gpu.update(out=out, interrupt=True)
    rc, _, err = run_cli(["bench", "kernels", "--device", "cuda", "--quick", "--out", str(out)])
    assert rc == 130 and err.startswith("interrupted")
    res = json.loads(out.read_text())
    assert res["interrupted"] is True and res["selective_scan"] == [{"b": 1}] and "decode_step" not in res


def test_gpu_module_records_every_repeat_and_the_cuts():
    """kernels_gpu itself (on the CPU, tiny shapes): --repeats sets every median's count, each repeat is kept, and
    --max-seconds 0 cuts each measurement to one run, said in the row."""
    env = kernels_gpu._Env("cpu", "cpu", scan_shapes=[(1, 8, 4, 16)], ref_shape=(1, 8, 4, 8), decode_batches=[1],
                           decode_dim=8, copy_bytes=1 << 16, dtype=torch.float32, repeats=3, max_seconds=1e9)

    class Args:
        quick, skip = True, ["triton", "peers", "ref"]
    res = kernels_gpu.run_on(env, Args())
    assert res["repeats"] == 3 and res["max_seconds"] == 1e9
    row = res["selective_scan"][0]
    assert all(len(v) == 3 for v in row["runs_ms"].values()) and "cut_by_max_seconds" not in row
    assert set(row["runs_ms"]) == set(row["times_ms"])
    env.max_seconds = 0.0
    row = kernels_gpu._conv_row(env, res, None, ["cpu"], 1, 8, 16)
    assert all(len(v) == 1 for v in row["runs_ms"].values())
    assert set(row["cut_by_max_seconds"]) == {"emma_cpu.fwd", "emma_cpu.fwd_bwd"}


def test_mambapy_gets_its_own_layout_and_computes_the_same_scan(monkeypatch):
    """mambapy's scans are timed on contiguous (b, l, d) tensors, as a mambapy MambaBlock holds them (transposed
    views of our (b, d, l) inputs made its scans walk strided memory: ~1.9x slower, which the table credited to
    our kernel); the conversion happens before the timed calls, and each peer's output, turned back to
    (b, d, l), equals ours (the benchmark records that agreement per shape)."""
    pytest.importorskip("mambapy")
    from mambapy.mamba import MambaBlock

    from emma_mamba.bench import kernels

    impls = kernels.implementations(["ref"])
    seen = []
    real = MambaBlock.selective_scan

    def spy(self, x, delta, A, B, C, D):
        seen.append([t.is_contiguous() and t.shape[1] == 24 for t in (x, delta, B, C)])
        return real(self, x, delta, A, B, C, D)

    monkeypatch.setattr(MambaBlock, "selective_scan", spy)
    fwd, fb = kernels.time_impl(impls["mambapy_pscan"], 2, 8, 4, 24, repeats=2, max_seconds=5)
    assert seen and all(all(s) for s in seen), seen  # every call: (b, l=24, .) and contiguous
    assert fwd["median"] > 0 and fb["median"] > 0
    diffs = kernels.agreement(impls, 2, 8, 4, 24)
    assert set(diffs) == {"mambapy_pscan", "mambapy_seq"} and max(diffs.values()) < 1e-4, diffs
