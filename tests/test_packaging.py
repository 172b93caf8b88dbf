"""What `pip install` of the project gives a user who does not work in the checkout: the sdist must carry every
file the build and the package need (headers included, not only the sources setup.py lists), and an installed
package must find its shipped recipes, so `emma-mamba quickstart` and `--config configs/....yaml` work from any
directory. The oracle is the tracked file list (git) and a fresh process that sees only the installed layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from emma_mamba.config import ConfigError, resolve_config_path, shipped_config_dir, shipped_configs

REPO = Path(__file__).resolve().parents[1]


def _setup_py(args, cwd=REPO, timeout=300):
    env = dict(os.environ, EMMA_SKIP_CUDA_BUILD="1")  # no compile happens here; skip the nvcc lookup too
    r = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _tracked(*folders):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", *folders], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line}


# ---------------------------------------------------------------------------------------------- recipes by name


def test_shipped_recipes_are_the_checkout_configs_here():
    assert shipped_config_dir() == REPO / "configs"
    names = set(shipped_configs())
    assert {p.stem for p in (REPO / "configs").glob("*.yaml")} == names
    assert {"quickstart", "quickstart_fast", "train_tiny_stage1", "model_tiny"} <= names


def test_a_recipe_resolves_by_path_then_by_shipped_name(tmp_path, monkeypatch):
    shipped = shipped_configs()["train_tiny_stage1"]
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for arg in ("configs/train_tiny_stage1.yaml", "train_tiny_stage1.yaml", "train_tiny_stage1"):
        assert resolve_config_path(arg) == shipped
    # a file the user has wins over the shipped recipe of the same name
    (tmp_path / "configs").mkdir()
    mine = tmp_path / "configs" / "train_tiny_stage1.yaml"
    mine.write_text("stage: pretrain\n")
    assert resolve_config_path("configs/train_tiny_stage1.yaml") == Path("configs/train_tiny_stage1.yaml")
    # a path into another folder, or an absolute one, is never silently replaced by a shipped recipe
    for arg in ("elsewhere/train_tiny_stage1.yaml", str(tmp_path / "x" / "train_tiny_stage1.yaml"), "no_such_recipe"):
        with pytest.raises(ConfigError, match=r"run config not found: .*shipped recipes, usable by name: .*"
                                              r"train_tiny_stage1"):
            resolve_config_path(arg, "run config")


def test_configs_command_lists_and_copies(tmp_path, capsys):
    from emma_mamba.cli import main

    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    for name in shipped_configs():
        assert f"  {name} " in out
    assert "EMMA-Mamba 2.8B, stage 1 (alignment)" in out  # the recipe's first comment line

    dest = tmp_path / "mine"
    assert main(["configs", "--copy", str(dest), "train_tiny_stage1", "model_tiny.yaml"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["model_tiny.yaml", "train_tiny_stage1.yaml"]
    assert (dest / "model_tiny.yaml").read_text() == shipped_configs()["model_tiny"].read_text()
    capsys.readouterr()
    # an edited copy is never overwritten by accident
    (dest / "model_tiny.yaml").write_text("# edited\n")
    assert main(["configs", "--copy", str(dest), "model_tiny"]) == 2
    assert "already exist" in capsys.readouterr().err and (dest / "model_tiny.yaml").read_text() == "# edited\n"
    assert main(["configs", "--copy", str(dest), "model_tiny", "--overwrite"]) == 0
    assert (dest / "model_tiny.yaml").read_text() == shipped_configs()["model_tiny"].read_text()
    assert main(["configs", "--copy", str(dest), "model_huge"]) == 2
    assert "no shipped recipe named model_huge" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- sdist and install


def test_sdist_carries_every_tracked_source_header_and_recipe(tmp_path):
    # docs/: the pages the README (the sdist's long description too) links
    # benchmarks/ (the results the docs cite), .ci/run (the README's test command), the licence and its notice
    want = _tracked("csrc", "configs", "emma_mamba", "tests", "docs", "benchmarks", "setup.py", "setup.cfg",
                    "README.md", ".ci/run", "LICENSE", "NOTICE")
    assert {"LICENSE", "NOTICE", ".ci/run"} <= want
    _setup_py(["egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir", str(tmp_path)])
    (sdist,) = tmp_path.glob("emma_mamba-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    missing = sorted(f for f in want if f not in names and not f.endswith((".gitignore", ".gitkeep")))
    assert not missing, f"the sdist lacks tracked files: {missing}"
    # the headers the kernel sources include, which setup.py's source lists do not name
    assert {"csrc/ops.h", "csrc/cpu/common.h", "csrc/cpu/scan_kernels_impl.inc", "csrc/cuda/common.cuh",
            "csrc/cuda/selective_scan.cu"} <= names


def test_installed_package_finds_its_recipes_from_any_directory(tmp_path):
    """build_py lays the package out as a wheel installs it (configs/ inside emma_mamba/, next to the kernels); a process
    that sees only that layout, started in an empty directory, lists the recipes and resolves the README's
    `--config configs/train_tiny_stage1.yaml` and the quickstart's default recipe."""
    lib = tmp_path / "lib"
    out = _setup_py(["build_py", "--build-lib", str(lib)])
    assert "absent from the `packages` configuration" not in out  # setuptools' warning for a data-only folder
    for asset in _tracked("emma_mamba/assets"):
        assert (lib / asset).read_bytes() == (REPO / asset).read_bytes(), asset
    installed = lib / "emma_mamba" / "configs"
    for name, src in shipped_configs().items():
        assert (installed / f"{name}.yaml").read_bytes() == src.read_bytes()
    assert (lib / "emma_mamba" / "kernels" / "selective_scan.py").is_file()
    assert (lib / "emma_mamba" / "py.typed").is_file()  # PEP 561: type checkers read the package's annotations
    assert not (lib / "configs").exists()

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(lib))
    code = ("import emma_mamba, sys; from emma_mamba.cli import main; "
            "from emma_mamba.config import shipped_config_dir; from emma_mamba.quickstart import recipe_path, "
            "load_quickstart_config; print('PKG', emma_mamba.__file__); print('DIR', shipped_config_dir()); "
            "print('QS', recipe_path(None), load_quickstart_config(recipe_path(None, fast=True)).data); "
            "sys.exit(main(['pretrain', '--config', 'configs/train_tiny_stage1.yaml', '--print-config']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == f"PKG {lib / 'emma_mamba' / '__init__.py'}"
    assert lines[1] == f"DIR {installed}"
    assert lines[2].startswith(f"QS {installed / 'quickstart.yaml'} {{")
    assert "stage: pretrain" in r.stdout and "name: tiny" in r.stdout
    assert f"using the shipped recipe {installed / 'train_tiny_stage1.yaml'}" in r.stderr


def test_a_cuda_toolkit_of_another_major_version_is_named_before_compiling(tmp_path):
    """nvcc 12.x against a torch built with CUDA 13 (or the reverse): torch's extension builder would refuse it
    deep inside the build; setup.py says which versions disagree and the ways out, before compiling anything."""
    import torch

    if torch.version.cuda is None:
        pytest.skip("torch without CUDA: setup.py never looks for nvcc")
    major = int(torch.version.cuda.split(".")[0])
    other = major - 1
    fake = tmp_path / "cuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "include").mkdir()
    (fake / "include" / "cuda_runtime.h").write_text("")
    nvcc = fake / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}.4, V{other}.4.131'\n")
    nvcc.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("EMMA_SKIP_CUDA_BUILD", "CUDA_PATH")}
    env["CUDA_HOME"] = str(fake)
    r = subprocess.run([sys.executable, "setup.py", "-q", "--version"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    msg = r.stderr + r.stdout
    assert f"is {other}.4, but torch" in msg and f"built with CUDA {torch.version.cuda}" in msg, msg[-2000:]
    assert "EMMA_SKIP_CUDA_BUILD=1" in msg
