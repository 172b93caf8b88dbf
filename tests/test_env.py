"""`emma-mamba env`: the report agrees with what it reports on (ops' own dispatch, the extension, package metadata),
fakes a GPU to check the architecture warning, and stays inert (no kernel compiled, ops' caches untouched)."""
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from emma_mamba import envinfo, ops
from emma_mamba.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """ops' selection caches emptied for the test and restored after it (a test that calls get_backend with a faked
    GPU must not leave its choice to the tests after it)."""
    for name in ("_default", "_kernel_cache", "_unavailable"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_forced", None)
    monkeypatch.delenv("EMMA_MAMBA_BACKEND", raising=False)


def _fake_gpu(monkeypatch, name, cc, archs="80;90"):
    from emma_mamba import _C

    monkeypatch.setattr(_C, "with_cuda", True, raising=False)
    monkeypatch.setattr(_C, "cuda_archs", archs, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=16 << 30))


def test_cpu_choice_is_ops_own_and_the_report_leaves_dispatch_as_it_was(fresh_dispatch):
    report = envinfo.collect()
    # nothing cached: a later op decides afresh (on whatever device is current then)
    assert ops._default == {} and ops._kernel_cache == {} and ops._unavailable == {}
    assert report["dispatch"]["cpu"]["backend"] == ops.get_backend("cpu")
    assert report["dispatch"]["cpu"]["error"] is None
    for name, state in ops.available_backends().items():  # the loaders' verdicts, through ops' own path
        assert report["backends"][name]["available"] == (state == "available"), name
        if state != "available":
            assert report["backends"][name]["reason"] in state


def test_extension_and_archs_are_the_builds():
    from emma_mamba import _C

    ext = envinfo.collect()["extension"]
    assert ext["importable"] is True
    assert ext["with_cuda"] == bool(_C.with_cuda)
    assert ext["cuda_archs"] == getattr(_C, "cuda_archs", None)
    assert ext["path"] == _C.__file__


def test_versions_are_the_package_metadatas():
    report = envinfo.collect()
    for name, p in report["packages"].items():
        try:
            want = metadata.version(p["distribution"])
        except metadata.PackageNotFoundError:
            want = None
        if want is not None:
            assert p["version"] == want and p["installed"], name
    assert report["torch"]["version"] == torch.__version__ and report["torch"]["cuda"] == torch.version.cuda
    assert report["emma_mamba"]["version"] == metadata.version("emma_mamba")
    assert Path(report["emma_mamba"]["location"]) == ROOT / "emma_mamba"
    assert report["python"]["version"] == "%d.%d.%d" % sys.version_info[:3]
    import site

    # pip's editable install leaves an __editable__ hook in site-packages
    hooks = [p for d in site.getsitepackages() for p in Path(d).glob("__editable__*emma_mamba*")]
    if hooks:
        assert report["emma_mamba"]["editable"] is True


def test_a_missing_optional_package_is_reported_as_not_installed(monkeypatch, capsys):
    real_version = metadata.version

    def version(dist):
        if dist == "mambapy":
            raise metadata.PackageNotFoundError(dist)
        return real_version(dist)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setitem(sys.modules, "mambapy", None)  # find_spec: None, import: ImportError
    p = envinfo.collect()["packages"]["mambapy"]
    assert p["installed"] is False and p["version"] is None
    assert main(["env"]) == 0
    assert re.search(r"^\s+mambapy\s+not installed$", capsys.readouterr().out, re.M)


def test_a_peer_that_fails_to_import_is_named_not_fatal(monkeypatch, tmp_path):
    """mamba_ssm installed without a working CUDA extension: its version from the metadata, the import error."""
    (tmp_path / "mamba_ssm").mkdir()
    (tmp_path / "mamba_ssm" / "__init__.py").write_text(
        "raise ImportError('libcudart.so.12: cannot open shared object file: No such file or directory')\n")
    (tmp_path / "mamba_ssm-2.2.4.dist-info").mkdir()
    (tmp_path / "mamba_ssm-2.2.4.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mamba_ssm\nVersion: 2.2.4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mamba_ssm", raising=False)
    r = envinfo.collect()
    p = r["packages"]["mamba_ssm"]
    assert p["installed"] is True and p["version"] == "2.2.4"
    assert p["imported"] is False and "libcudart.so.12" in p["import_error"]
    assert "import fails: ImportError: libcudart.so.12" in envinfo.format_text(r)


def test_env_forcing_torch_is_reported(monkeypatch, fresh_dispatch):
    monkeypatch.setenv("EMMA_MAMBA_BACKEND", "torch")
    r = envinfo.collect()
    assert ops.get_backend("cpu") == "torch"  # what the ops do under this variable
    assert r["dispatch"]["cpu"]["backend"] == "torch"
    assert "EMMA_MAMBA_BACKEND=torch" in r["dispatch"]["cpu"]["why"]
    assert r["env"]["EMMA_MAMBA_BACKEND"] == "torch"


def test_forcing_cuda_emu_does_not_build_it(monkeypatch, fresh_dispatch):
    from emma_mamba.ops import cuda_emulator

    def refuse(*a, **k):
        raise AssertionError("the report built the CUDA emulator")

    monkeypatch.setattr(cuda_emulator, "load", refuse)
    monkeypatch.setattr(cuda_emulator, "_module", None)
    monkeypatch.setenv("EMMA_MAMBA_BACKEND", "cuda-emu")
    r = envinfo.collect()
    assert r["dispatch"]["cpu"]["backend"] == "cuda-emu" and r["backends"]["cuda-emu"]["available"] is None


def test_unrunnable_forced_backend_is_a_warning_not_a_crash(monkeypatch, fresh_dispatch):
    monkeypatch.setenv("EMMA_MAMBA_BACKEND", "cuda")  # no CUDA tensors on a CPU: get_backend refuses
    with pytest.raises(ops.BackendUnavailableError) as e:
        ops.get_backend("cpu")
    r = envinfo.collect()
    assert r["dispatch"]["cpu"]["backend"] is None and r["dispatch"]["cpu"]["error"] == str(e.value)
    assert any(str(e.value) in w for w in r["warnings"])


def test_gpu_the_build_does_not_cover_gets_the_fix(monkeypatch, fresh_dispatch, capsys):
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5), archs="80;90")
    r = envinfo.collect()
    dev = r["gpus"]["devices"][0]
    assert r["gpus"]["count"] == 1 and dev["name"] == "Tesla T4" and dev["sm"] == "75" and dev["covered"] is False
    assert r["backends"]["cuda"]["available"] is False
    assert r["dispatch"]["cuda"]["backend"] == ops.get_backend("cuda") != "cuda"  # ops fall back as reported
    warning = [w for w in r["warnings"] if "Tesla T4" in w]
    assert len(warning) == 1 and "sm_75" in warning[0] and "sm_80, sm_90" in warning[0]
    # the README's build command with the GPU's architecture
    assert "pip install --no-build-isolation -e" in (ROOT / "README.md").read_text()
    assert re.search(r"EMMA_CUDA_ARCHS=75 pip install --no-build-isolation (-e \.|.*--force-reinstall)", warning[0])
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^WARNING: .*Tesla T4 \(sm_75\).*Fix: .*EMMA_CUDA_ARCHS=75 ", out, re.M)
    assert re.search(r"^\s+0: Tesla T4 \(sm_75, 16\.0 GiB\): NOT covered", out, re.M)


@pytest.mark.parametrize("name,cc", [("NVIDIA A10", (8, 6)), ("NVIDIA H100 80GB HBM3", (9, 0)),
                                     ("NVIDIA B200", (10, 0))])
def test_gpu_the_build_covers_gets_no_warning(monkeypatch, fresh_dispatch, name, cc):
    """sm_86 runs sm_80's SASS, sm_90 its own, sm_100 the PTX of compute_90 (README: the newest arch's PTX)."""
    _fake_gpu(monkeypatch, name, cc, archs="80;90")
    r = envinfo.collect()
    assert r["gpus"]["devices"][0]["covered"] is True
    assert not [w for w in r["warnings"] if name in w or "EMMA_CUDA_ARCHS" in w]
    assert "NOT covered" not in envinfo.format_text(r)


def test_rebuild_command():
    src = {"editable": True, "installed_from": "file:///src/emma"}
    assert envinfo.rebuild_command(["75"], src) == "cd /src/emma && EMMA_CUDA_ARCHS=75 pip install --no-build-isolation -e ."
    assert envinfo.rebuild_command(["75", "86"], src).endswith('EMMA_CUDA_ARCHS="75;86" pip install --no-build-isolation -e .')


def test_text_report(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for heading in ("compiled extension emma_mamba._C", "GPUs:", "backends", "dispatch", "environment"):
        assert re.search(rf"^{re.escape(heading)}", out, re.M), heading
    assert re.search(rf"^\s+torch\s+{re.escape(torch.__version__)} ", out, re.M)
    assert re.search(rf"^\s+CPU tensors\s+-> {ops.get_backend('cpu')} ", out, re.M)
    assert "{" not in out.split("\n", 1)[0]  # text, not JSON


def test_cli_json_in_a_fresh_process_compiles_nothing(tmp_path):
    """(No time limit asserted: a loaded CI machine makes timings flaky; the empty caches show that nothing was
    compiled, which is what would make it slow.)"""
    triton_cache, ext_cache = tmp_path / "triton", tmp_path / "torch_extensions"
    triton_cache.mkdir()
    ext_cache.mkdir()
    env = {**os.environ, "EMMA_MAMBA_BACKEND": "torch", "TRITON_CACHE_DIR": str(triton_cache),
           "TORCH_EXTENSIONS_DIR": str(ext_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "emma_mamba.cli", "env", "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)  # stdout is the JSON object alone
    assert list(r) == ["emma_mamba", "python", "platform", "torch", "packages", "lmms_eval", "extension", "gpus",
                       "backends", "dispatch", "env", "build_env", "warnings"]
    assert r["dispatch"]["cpu"]["backend"] == "torch" and "EMMA_MAMBA_BACKEND=torch" in r["dispatch"]["cpu"]["why"]
    assert list(triton_cache.iterdir()) == [] and list(ext_cache.iterdir()) == []
    # the same install as this process sees, though the checkout's emma_mamba.egg-info is found first from its root
    assert r["emma_mamba"]["editable"] == envinfo.collect()["emma_mamba"]["editable"]


def test_usable_now_needs_tensors_to_run_on(monkeypatch, fresh_dispatch):
    """`available` says a backend's kernels load; `usable_now` that there are tensors here it runs on: the cuda
    and triton backends need a GPU (triton on the CPU only under TRITON_INTERPRET=1), cpu and torch never do."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    b = envinfo.collect()["backends"]
    assert b["cpu"]["usable_now"] is True and b["torch"]["usable_now"] is True
    for name in ("cuda", "triton"):
        assert b[name]["usable_now"] is False  # no GPU, whatever `available` says
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", (9, 0), archs="90")
    b = envinfo.collect()["backends"]
    assert b["cuda"]["usable_now"] is True and b["triton"]["usable_now"] is b["triton"]["available"]


def test_lmms_eval_registration_is_what_lmms_eval_itself_finds():
    """The report's 'model registered' is lmms-eval's own registry's answer (its entry-point group read by
    lmms_eval.models), and 'filelock_api' whether lmms-eval 0.7's `import filelock._api` works."""
    import importlib

    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed")
    info = envinfo.collect()["lmms_eval"]
    try:
        from lmms_eval.models import get_model

        found = get_model("emma_mamba").__module__ == "emma_mamba.eval.lmms_eval_model"
    except Exception:  # noqa: BLE001 - lmms-eval raises ValueError for an unknown model
        found = False
    assert info["installed"] is True and info["model_registered"] is found
    try:
        importlib.import_module("filelock._api")
        api = True
    except ImportError:
        api = False
    assert info["filelock_api"] is api


def test_lmms_eval_without_our_model_or_with_filelock_4_gets_the_fix(monkeypatch, tmp_path, capsys):
    """An install of emma_mamba older than lmms-eval's model (no entry point) and a filelock without the module
    lmms-eval 0.7 imports: two warnings, each with its command."""
    import importlib.util

    (tmp_path / "lmms_eval-0.7.3.dist-info").mkdir()  # lmms-eval installed, as far as its metadata goes
    (tmp_path / "lmms_eval-0.7.3.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lmms-eval\nVersion: 0.7.3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(metadata, "entry_points", lambda: metadata.EntryPoints([]))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "filelock._api" else real_find_spec(name, *a))
    r = envinfo.collect()
    assert r["lmms_eval"]["installed"] and r["lmms_eval"]["model_registered"] is False
    assert r["lmms_eval"]["filelock_api"] is False
    (reg,) = [w for w in r["warnings"] if "entry points" in w]
    assert "python -m lmms_eval --model emma_mamba` fails" in reg and "pip install --no-build-isolation -e ." in reg
    (lock,) = [w for w in r["warnings"] if "filelock._api" in w]
    assert "lmms-eval 0.7.3" in lock and "pip install 'filelock<4'" in lock
    assert re.search(r"^\s+lmms_eval\s+0\.7\.3 \(lmms-eval\): model emma_mamba NOT registered", envinfo.format_text(r),
                     re.M)


def test_the_build_records_the_torch_it_was_built_against(capsys):
    """The extension records torch.__version__ at its build; env shows it, and says nothing more when it is this
    torch (as in every test run: CI builds against the torch it tests with)."""
    from emma_mamba import _C

    assert _C.torch_version == torch.__version__
    r = envinfo.collect()
    assert r["extension"]["built_against_torch"] == torch.__version__ and r["extension"]["torch_mismatch"] is None
    assert not any("another torch" in w or "built against torch" in w for w in r["warnings"])
    assert re.search(rf"built against +torch {re.escape(torch.__version__)}\n", envinfo.format_text(r))


def test_an_extension_built_against_another_torch_is_named_with_the_rebuild(monkeypatch, caplog):
    """torch keeps no C++ ABI across versions: an extension that imported but was built against another torch
    (a `pip install -U torch` after the build) is said once by the ops and by env, with the rebuild."""
    from emma_mamba import _C

    monkeypatch.setattr(_C, "torch_version", "2.0.0+cu118")
    r = envinfo.collect()
    want = f"emma_mamba._C was built against torch 2.0.0+cu118 but this is torch {torch.__version__}"
    assert any(w.startswith(want) and "pip install --no-build-isolation -e ." in w for w in r["warnings"])
    assert "torch 2.0.0+cu118 (ANOTHER torch: rebuild, see warnings)" in envinfo.format_text(r)
    monkeypatch.setattr(ops, "_stale_checked", False)
    caplog.clear()  # (collect() said it too when it was the first to load the extension: run alone or first)
    with caplog.at_level("WARNING", logger="emma_mamba.ops"):
        ops.warn_if_stale(_C)
        ops.warn_if_stale(_C)
    assert [m for m in caplog.messages if want in m] and len([m for m in caplog.messages if want in m]) == 1


def test_an_undefined_symbol_at_import_is_named_as_another_torch(monkeypatch, fresh_dispatch):
    """The usual way a built extension breaks: torch upgraded since, and the import fails on an undefined C++
    symbol. The ops' error and env's warning say that means another torch, and how to rebuild (they said only
    "build it")."""
    import emma_mamba

    class Broken:  # a finder that fails the import as the dynamic loader does
        def find_spec(self, name, path=None, target=None):
            if name == "emma_mamba._C":
                raise ImportError("/x/emma_mamba/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
            return None

    monkeypatch.delattr(emma_mamba, "_C", raising=False)  # (not loaded yet where this test runs first)
    monkeypatch.delitem(sys.modules, "emma_mamba._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken()] + sys.meta_path)
    with pytest.raises(ops.BackendUnavailableError) as e:
        ops._load_compiled("cpu")
    msg = str(e.value)
    assert "undefined symbol: _ZN3c10" in msg and f"built against another torch than this one (torch " \
        f"{torch.__version__})" in msg and "pip install --no-build-isolation -e ." in msg
    r = envinfo.collect()
    assert r["extension"]["importable"] is False
    assert any("not importable" in w and "built against another torch" in w for w in r["warnings"])
