"""A dry run of ``benchmarks/gpu/run_all.sh``, the one script a lent GPU runs (README "Status").

Device time is 15 minutes per task and a GPU is lent to few tasks, so a stage that dies on a renamed option, a moved
test file or a ``-k`` expression that no longer selects anything loses a whole call. Here the script runs for real
under bash with ``python3``, ``nvidia-smi`` and ``nvcc`` replaced by stubs on ``PATH`` that record their command
lines; then every recorded command is checked against the code it would start: an ``emma-mamba`` command's and each
benchmark's options through their own argument parsers (``run`` is not called), a pytest command's files against
the tree and its ``-m``/``-k``/``--ignore`` selection against the tests collected (at least one `gpu` test), a
``python3 -c`` snippet compiled. Each stage plan of the script's header is run, the 15-minute ``budget`` first.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu" / "run_all.sh"
PLANS = ["budget", "peers tests bench", "alltests latency prefill", "compile memory", "peers mamba2 wheels"]

_STUB = """#!/usr/bin/env bash
# records its command line and does nothing: one line per call (arguments separated by \\x1f), written by one
# printf so that the calls of the script's background job and of its foreground do not interleave
rec=$(printf '%s\\037' "$(basename "$0")" "$@")
printf '%s\\n' "${rec//$'\\n'/\\\\n}" >> "$STUB_LOG"
exit 0
"""


class _Parsed(Exception):
    """Raised once a parser has accepted a command line, so that nothing runs."""


def _dry_run(plan: str, tmp: Path) -> list[list[str]]:
    """run_all.sh with ``plan`` under the stubs: the stubs' recorded command lines, in order."""
    bin_dir, scratch, peers = tmp / "bin", tmp / "scratch", tmp / "peers"
    for d in (bin_dir, scratch, peers):
        d.mkdir(exist_ok=True)
    for name in ("python3", "nvidia-smi", "nvcc"):
        f = bin_dir / name
        f.write_text(_STUB)
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    log = tmp / f"calls_{plan.replace(' ', '_')}.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log),
           "SCRATCH": str(scratch), "OUT": str(tmp / "out")}
    for k in ("DEADLINE", "PEER_SET", "TESTS_CAP", "SEQ_TESTS_CAP", "SEQ_LATE", "BENCH_CAP", "TRITON_EARLY"):
        env.pop(k, None)
    r = subprocess.run(["bash", str(SCRIPT), str(peers.relative_to(tmp)), plan], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=120)
    # the script runs from the repository root: its paths are relative to it; here cwd only decides where PEERS is
    assert r.returncode == 0, f"run_all.sh {plan!r} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "all done" in r.stdout, r.stdout[-2000:]
    calls = [[a.replace("\\n", "\n") for a in line.split("\x1f")[:-1]] for line in log.read_text().splitlines()]
    return [c for c in calls if c[0] == "python3"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """{plan: [python3 argv without 'python3', ...]}"""
    out = {}
    for plan in PLANS:
        tmp = tmp_path_factory.mktemp("run_all")
        out[plan] = [c[1:] for c in _dry_run(plan, tmp)]
    return out


def _pytest_calls(recorded) -> list[list[str]]:
    seen, calls = set(), []
    for argvs in recorded.values():
        for a in argvs:
            if a[:2] == ["-m", "pytest"] and tuple(a) not in seen:
                seen.add(tuple(a))
                calls.append(a[2:])
    return calls


def test_each_plan_runs_its_stages(recorded):
    """The budget plan starts, in its order: our build, the cuda tests (filling the wait for mamba-ssm's build),
    the whole kernel benchmark (no --quick: L=2048 and L=8192), the reduced latency run, the cuda tests' seq
    variants, then the other gpu tests (the Triton kernels' right after the cuda ones); each other plan what its
    header says."""
    def kinds(argvs):
        out = []
        for a in argvs:
            if a[:1] == ["setup.py"]:
                out.append("build")
            elif a[:2] == ["-m", "pytest"]:
                cuda = "tests/ops/test_cuda_backend.py" in a[2:3]
                triton = a[2:3] == ["tests/ops/test_triton_backend.py"] and "tests" not in a
                out.append("pytest:" + (("cuda-seq" if "-k" in a else "cuda") if cuda else
                                        "triton" if triton else "others"))
            elif a[:2] == ["-m", "emma_mamba.bench.kernels_gpu"]:
                out.append("bench")
            elif a[:4] == ["-m", "emma_mamba.cli", "bench", "latency"]:
                out.append("latency")
            elif a[:1] and a[0].startswith("benchmarks/"):
                out.append(Path(a[0]).stem)
        return out
    assert kinds(recorded["budget"]) == ["build", "pytest:cuda", "pytest:triton", "bench", "latency",
                                         "pytest:cuda-seq", "pytest:others"]
    others = [a for a in recorded["budget"] if a[:2] == ["-m", "pytest"]][-1]
    assert "--ignore=tests/ops/test_triton_backend.py" in others  # run early in this plan, not twice
    bench = next(a for a in recorded["budget"] if a[:2] == ["-m", "emma_mamba.bench.kernels_gpu"])
    assert "--quick" not in bench  # issue 3 needs the scan at L=8192 too
    lat = next(a for a in recorded["budget"] if a[:4] == ["-m", "emma_mamba.cli", "bench", "latency"])
    assert "--peer" not in lat and "--compile" not in lat and "--cuda-graphs" in lat
    assert kinds(recorded["peers tests bench"]) == ["build", "pytest:cuda", "pytest:cuda-seq", "bench"]
    assert kinds(recorded["alltests latency prefill"]) == ["build", "pytest:others", "latency", "prefill_batching"]
    full_lat = next(a for a in recorded["alltests latency prefill"] if a[:4] == ["-m", "emma_mamba.cli", "bench",
                                                                                 "latency"])
    assert "--peer" in full_lat and "--compile" in full_lat
    assert kinds(recorded["compile memory"]) == ["build", "compile_lm", "activation_memory", "mixer_copies"]
    assert kinds(recorded["peers mamba2 wheels"]) == ["build", "mamba2_layer"]


def test_every_command_parses(recorded, monkeypatch, tmp_path):
    """Each emma-mamba command and benchmark script the plans start accepts its options (their own parsers;
    nothing runs), and every ``python3 -c`` snippet compiles."""
    from emma_mamba import cli

    orig_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        orig_parse(self, args, namespace)  # argparse's own errors exit here
        raise _Parsed
    checked = set()
    for plan, argvs in recorded.items():
        for a in argvs:
            where = f"run_all.sh {plan!r}: python3 {shlex.join(a)}"
            if tuple(a) in checked:
                continue
            checked.add(tuple(a))
            if a[0] == "-c":
                compile(a[1], where, "exec")
            elif a[:2] == ["-m", "emma_mamba.cli"]:
                argv = a[2:]
                path = next(tuple(argv[:n]) for n in (2, 1) if tuple(argv[:n]) in cli.COMMANDS)
                mod = __import__(cli.COMMANDS[path][0], fromlist=["run"])
                ran = []
                with monkeypatch.context() as m:
                    m.setattr(mod, "run", lambda args: ran.append(args) or 0)
                    try:
                        rc = cli.main(argv)
                    except SystemExit as e:  # argparse's error: the message is on stderr
                        pytest.fail(f"{where}: exit {e.code}")
                    assert rc == 0, where
                assert ran, where
            elif a[:2] == ["-m", "emma_mamba.bench.kernels_gpu"] or a[0].startswith("benchmarks/"):
                if a[0] == "-m":
                    from emma_mamba.bench import kernels_gpu
                    main, argv = kernels_gpu.main, a[2:]
                else:
                    assert (REPO / a[0]).is_file(), where
                    main, argv = runpy.run_path(str(REPO / a[0]), run_name="run_all_dry_run")["main"], a[1:]
                with monkeypatch.context() as m:
                    m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
                    with pytest.raises(_Parsed):
                        try:
                            main(argv)
                        except SystemExit as e:  # argparse's error: the message is on stderr
                            pytest.fail(f"{where}: exit {e.code}")
            elif a[:1] == ["setup.py"]:
                assert a[1:3] == ["build_ext", "--inplace"], where
            elif a[:2] == ["-m", "pytest"]:
                continue  # test_every_pytest_stage_selects_gpu_tests
            elif a[:2] == ["-m", "pip"] or a[:1] == ["-"]:
                continue  # installs of the carried wheels; the peers' setup.py edit (only with their sdists)
            else:
                pytest.fail(f"{where}: a command this test does not know how to check")


def _selection(args: list[str]):
    """(paths, ignored, marker expression, keyword expression) of a pytest command line."""
    paths, ignored, mark, kw = [], [], None, None
    it = iter(args)
    for x in it:
        if x == "-m":
            mark = next(it)
        elif x == "-k":
            kw = next(it)
        elif x.startswith("--ignore="):
            ignored.append(x.split("=", 1)[1])
        elif x in ("-p", "-o", "--timeout", "--tb"):
            next(it)
        elif not x.startswith("-"):
            paths.append(x)
    return paths, ignored, mark, kw


def _gpu_items_from_session(session):
    return [(item.nodeid, set(item.keywords)) for item in session.items if "gpu" in item.keywords]


def _gpu_items_collected():
    r = subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", "-q", "-m", "gpu", "-o",
                        "addopts=", "-p", "no:cacheprovider", "-p", "no:xdist"], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    return [(i, {p for p in i.replace("::", "/").replace("[", "/").rstrip("]").split("/")}) for i in ids]


def test_every_pytest_stage_selects_gpu_tests(recorded, request):
    """Every pytest command of every plan names files that exist and selects at least one `gpu` test (its -m,
    -k and --ignore applied to the tests collected: this run's own collection where it holds them all, else a
    collection of its own)."""
    from _pytest.mark.expression import Expression

    calls = _pytest_calls(recorded)
    assert calls
    for args in calls:
        paths, ignored, mark, _ = _selection(args)
        assert mark == "gpu", args
        for p in paths + ignored:
            assert (REPO / p).exists(), f"pytest {shlex.join(args)}: {p} does not exist"

    def chosen(items, args):
        paths, ignored, _, kw = _selection(args)
        expr = Expression.compile(kw) if kw else None
        out = []
        for nodeid, words in items:
            file = nodeid.split("::")[0]
            if not any(file == p or file.startswith(p.rstrip("/") + "/") for p in paths):
                continue
            if any(file == p or file.startswith(p.rstrip("/") + "/") for p in ignored):
                continue
            if expr is not None and not expr.evaluate(lambda s, **_: any(s.lower() in w.lower() for w in words)):
                continue
            out.append(nodeid)
        return out
    items = _gpu_items_from_session(request.session)
    if not all(chosen(items, a) for a in calls):  # a partial run (one file, -k, -m): collect the gpu tests here
        items = _gpu_items_collected()
    for args in calls:
        picked = chosen(items, args)
        assert picked, f"pytest {shlex.join(args)} selects no gpu test"
        if "--ignore=tests/ops/test_cuda_backend.py" in args:
            assert not any(n.startswith("tests/ops/test_cuda_backend.py") for n in picked)
