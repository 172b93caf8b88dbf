"""`emma-mamba bench lm` on tiny shapes: options checked before any work, --quick under explicit shapes, the
targets stated for Mamba-1 only, the machine record, Ctrl-C."""

import json

import pytest

pytest.importorskip("transformers")

from emma_mamba.bench import lm as bench_lm  # noqa: E402

TINY = ["--d-model", "32", "--n-layer", "1", "--vocab-size", "256", "--prompt-len", "16", "--new-tokens", "3",
        "--decode-prompt-len", "4", "--repeats", "1", "--warmup", "0", "--threads", "1"]


@pytest.mark.parametrize("extra, msg", [
    (["--d-state", "0"], "argument --d-state: must be >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--d-model", "0"], "argument --d-model: must be >= 1, got 0"),
])
def test_bad_options_are_argparse_errors(extra, msg, tmp_path, run_cli):
    rc, _, err = run_cli(["bench", "lm", "--out", str(tmp_path / "l.json")] + extra)
    assert rc == 2 and msg in err, err


def test_bad_out_fails_before_the_models_are_built(tmp_path, run_cli):
    rc, _, err = run_cli(["bench", "lm", "--out", str(tmp_path)] + TINY)
    assert rc == 2 and "is a directory" in err


def test_quick_fills_only_what_is_not_given():
    import argparse

    p = argparse.ArgumentParser()
    bench_lm.add_arguments(p)
    args = p.parse_args(["--quick", "--d-model", "64", "--new-tokens", "5"])
    assert bench_lm.resolve_shapes(args) == {"d_model": 64, "new_tokens": 5}
    assert (args.d_model, args.n_layer, args.prompt_len, args.new_tokens) == (64, 4, 256, 5)
    args = p.parse_args([])
    bench_lm.resolve_shapes(args)
    assert (args.d_model, args.n_layer, args.prompt_len, args.new_tokens) == (768, 24, 2048, 256)
    assert bench_lm.default_out(args) == "bench_results/lm_cpu_768x24.json"


def test_mamba1_run_with_quick_and_explicit_shapes(tmp_path, run_cli):
    out = tmp_path / "l.json"
    rc, stdout, _ = run_cli(["bench", "lm", "--quick", "--out", str(out)] + TINY)
    assert rc == 0
    res = json.loads(out.read_text())
    sh = res["shapes"]
    assert (sh["d_model"], sh["n_layer"], sh["prompt_len"], sh["new_tokens"]) == (32, 1, 16, 3)  # explicit wins
    assert res["quick"] is True and res["explicit_over_quick"]["d_model"] == 32
    assert res["targets"] == bench_lm.TARGETS and set(res["targets_met"]) == set(bench_lm.TARGETS)
    assert "target >= 3x" in stdout
    m = res["machine"]
    for key in ("argv", "loadavg_1_5_15_before", "loadavg_1_5_15_after", "cpu_model", "cpu_count", "cpu_isa",
                "emma_mamba", "git_commit", "transformers"):
        assert key in m, key
    assert res["complete"] is True and "interrupted" not in res


def test_mamba2_run_states_no_mamba1_target(tmp_path, run_cli):
    out = tmp_path / "l2.json"
    rc, stdout, _ = run_cli(["bench", "lm", "--ssm-layer", "mamba2", "--headdim", "16", "--d-state", "16",
                             "--out", str(out)] + TINY)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["ssm_layer"] == "mamba2" and res["targets"] is None and res["targets_met"] is None
    assert "target" not in stdout and "prefill_speedup:" in stdout and "NOT met" not in stdout


def test_ctrl_c_writes_the_finished_part(tmp_path, monkeypatch, run_cli):
    real, calls = bench_lm._median_time, []

    def median_time(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # transformers' prefill: ours is measured
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bench_lm, "_median_time", median_time)
    out = tmp_path / "l.json"
    rc, _, err = run_cli(["bench", "lm", "--out", str(out)] + TINY)
    assert rc == 130 and err.strip().splitlines() == [f"interrupted (the finished sections are in {out})"]
    res = json.loads(out.read_text())
    assert res["interrupted"] is True and res["complete"] is False
    assert "prefill_s_ours" in res["results"] and "prefill_s_transformers" not in res["results"]
    assert "ratios" not in res
