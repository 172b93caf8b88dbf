"""emma_mamba.bench.record, the self-description and the output checks every benchmark shares, and the
benchmarks/*.py scripts' use of it (their default output under ./bench_results/, --out checked first)."""

import argparse
import glob
import json
import platform
import sys
from pathlib import Path

import pytest

from emma_mamba.bench import record

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_machine_info_describes_the_machine_and_the_run(monkeypatch):
    monkeypatch.setattr(platform, "processor", lambda: "")  # as on many Linux machines
    start = record.run_start(["python", "x.py", "--out", "y.json"])
    m = record.machine_info("cpu", 3, start)
    model = record.cpu_model()
    assert m["processor"] == (model or platform.machine()) and m["cpu_model"] == model
    assert m["cpu_count"] >= 1 and m["threads"] == 3 and m["device"] == "cpu" and m["backend"]
    assert m["argv"] == ["python", "x.py", "--out", "y.json"]
    assert m["loadavg_1_5_15_before"] == start["loadavg_1_5_15_before"]
    assert len(m["loadavg_1_5_15_after"]) == 3
    import emma_mamba
    from emma_mamba import _C

    assert m["emma_mamba"] == emma_mamba.__version__
    assert m["git_commit"] is None or len(m["git_commit"]) == 40
    if hasattr(_C, "cpu_isa"):
        assert m["cpu_isa"] == _C.cpu_isa()
    json.dumps(m)


def test_a_bad_emma_cpu_isa_is_recorded_as_env_reports_it(monkeypatch):
    from emma_mamba import _C, envinfo

    if not hasattr(_C, "cpu_isa"):
        pytest.skip("a build without the CPU kernels' ISA query")
    monkeypatch.setenv("EMMA_CPU_ISA", "bogus")
    err = envinfo._extension_info()["cpu_isa_error"]
    assert err.startswith("EMMA_CPU_ISA=bogus ") and record.cpu_isa() == f"error: {err}"
    monkeypatch.setenv("EMMA_CPU_ISA", "scalar")  # read at each call
    assert record.cpu_isa() == "scalar" == envinfo._extension_info()["cpu_isa"]


def test_git_commit_is_none_without_git(monkeypatch):
    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(record.subprocess, "run", no_git)
    assert record.git_commit() is None


def test_out_problem(tmp_path):
    (tmp_path / "f").write_text("x")
    assert record.out_problem(str(tmp_path / "new" / "deeper" / "r.json")) is None  # creatable
    assert record.out_problem(str(tmp_path / "f")) is None  # overwritten
    assert "is a directory" in record.out_problem(str(tmp_path))
    assert f"{tmp_path / 'f'} is a file" in record.out_problem(str(tmp_path / "f" / "r.json"))
    with pytest.raises(argparse.ArgumentTypeError):
        record.out_path(str(tmp_path))


def test_unique_and_sorted_list_options():
    p = argparse.ArgumentParser()
    p.add_argument("--c", type=int, nargs="+", action=record.SortedUnique)
    assert p.parse_args(["--c", "4", "1", "2"]).c == [1, 2, 4]
    with pytest.raises(SystemExit):
        p.parse_args(["--c", "4", "1", "4"])


def test_no_script_writes_into_the_committed_results_by_default():
    from tests.test_readme import script_parser

    for script in sorted(glob.glob(str(ROOT / "benchmarks" / "*.py"))):
        name = Path(script).relative_to(ROOT).as_posix()
        if name == "benchmarks/_common.py":
            continue
        src = Path(script).read_text()
        assert 'default="benchmarks/results' not in src, name
        parser = script_parser(name)
        parsers = [parser] + [a.choices[k] for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                              for k in a.choices]
        for p in parsers:
            for a in p._actions:
                if "--out" in a.option_strings:
                    assert a.default is None or a.default.startswith("bench_results/"), (name, a.default)
                    assert a.type is record.out_path, name


def test_a_script_checks_out_before_it_runs(tmp_path, capsys):
    from benchmarks import prefill_chunk_memory

    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:  # before the children run (12 s) and the write fails
        prefill_chunk_memory.main(["--seqlen", "96", "--chunks", "0", "--out", str(tmp_path / "f" / "r.json")])
    assert e.value.code == 2 and "argument --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        prefill_chunk_memory.main(["--threads", "0"])
    assert e.value.code == 2


def test_a_script_records_the_machine_and_the_run(tmp_path):
    from benchmarks import recall_probe

    out = tmp_path / "sub" / "r.json"
    assert recall_probe.main(["--steps", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("argv", "loadavg_1_5_15_before", "loadavg_1_5_15_after", "cpu_model", "cpu_count", "cpu_isa",
                "emma_mamba", "git_commit", "torch", "processor"):
        assert key in doc, key
    assert doc["argv"][1:] == ["--steps", "1", "--out", str(out)]


def test_prefill_batching_describes_itself_in_whole_sentences():
    from tests.test_readme import script_parser

    desc = script_parser("benchmarks/prefill_batching.py").description
    assert desc.endswith("on the same random-weight Mamba LM.") and "\n" not in desc
