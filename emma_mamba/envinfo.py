"""`emma-mamba env`: what to attach to a bug report, and what to check after ``pip install`` on a GPU machine.

Versions (emma_mamba and where it is installed, Python, the platform, torch and its CUDA, triton, the model
libraries and the optional peers), the compiled extension ``emma_mamba._C`` (importable, with CUDA kernels, for
which architectures), the GPUs (each one's compute capability, and whether the build's architectures cover it,
with the rebuild command where they do not), the kernel backends (available or why not) and the one the ops
pick for CPU and for CUDA tensors, and the environment variables that change the kernels or their dispatch.
``--json`` prints the same as one JSON object (stable keys) for scripts and benchmark records.

Quick and inert: no model is built and no kernel compiled. The Triton kernels' module is imported (defining
``@triton.jit`` functions compiles nothing), the CUDA emulator is never built (``cuda-emu`` is reported, not
loaded), the model libraries are read from their package metadata and only the optional peers are imported
(a peer that fails to import, as mamba_ssm does without its CUDA extension, is reported with the error). The
backends are probed without touching the dispatch's caches: a process that asks for this report and then runs
ops picks its backends as if it had not (``_default`` is read, never written; loads are not cached).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import warnings

# import name -> distribution name; imported: only the peers (their import is the check that they work)
PACKAGES = {
    "torch": "torch",
    "triton": "triton",
    "numpy": "numpy",
    "transformers": "transformers",
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "torchvision": "torchvision",
}
PEERS = {"mamba_ssm": "mamba_ssm", "causal_conv1d": "causal_conv1d", "mambapy": "mambapy"}
LMMS_EVAL_GROUP = "lmms_eval.models"  # the entry-point group lmms-eval finds outside models in
LMMS_EVAL_TARGET = "emma_mamba.eval.lmms_eval_model:manifest"

# variables read at run time by emma_mamba.ops, emma_mamba/kernels or csrc (and CUDA_VISIBLE_DEVICES, which
# decides the GPUs there are); value: what it changes
RUNTIME_VARS = {
    "EMMA_MAMBA_BACKEND": "forces one backend for every device (when not empty)",
    "EMMA_MAMBA_DETERMINISTIC": "bitwise-reproducible gradients by default",
    "EMMA_DETERMINISTIC_PARTIAL_MB": "the deterministic backward's dB/dC partials budget (cuda, triton)",
    "EMMA_TRITON_SCAN_FWD": "Triton scan forward: chunked | sequential (read at import)",
    "EMMA_TRITON_SCAN_BWD": "Triton scan backward: chunked | sequential (read at import)",
    "EMMA_CUDA_SCAN_FWD": "CUDA scan forward: warp | seq (read per call)",
    "EMMA_CUDA_SCAN_BWD": "CUDA scan backward: warp | seq (read per call)",
    "EMMA_CPU_ISA": "CPU kernels: auto | avx512 | avx2 | scalar",
    "TRITON_INTERPRET": "=1: Triton kernels run in the interpreter (CPU tensors); read by triton at import",
    "EMMA_CUDA_EMU_SCHEDULE": "thread schedule of the cuda-emu backend",
    "EMMA_MAMBA_CSRC": "csrc/ folder the cuda-emu backend builds from",
    "CUDA_VISIBLE_DEVICES": "the GPUs torch sees",
}
# read by setup.py: they apply to the next build, not to the extension loaded now
BUILD_VARS = ("EMMA_CUDA_ARCHS", "EMMA_SKIP_CUDA_BUILD", "CUDA_HOME", "EMMA_NVCC_THREADS", "MAX_JOBS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_text(report))
    return 0


# ---------------------------------------------------------------------------------------------------------
# collection

def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a broken dist-info is reported as unknown, never a crash
        return None


def _spec_found(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def package_status(name: str, dist: str, try_import: bool = False) -> dict:
    """{'distribution', 'version', 'installed', 'imported', 'import_error'} of one package.

    The version is the distribution's metadata (the module's ``__version__`` if it was imported and has no
    metadata); ``imported`` is None where no import was tried."""
    version = _dist_version(dist)
    found = _spec_found(name)
    out = {"distribution": dist, "version": version, "installed": version is not None or found,
           "imported": None, "import_error": None}
    if try_import and out["installed"]:
        import importlib

        try:
            # a package that prints or warns while importing must not spoil --json's stdout
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
            out["imported"] = True
            if version is None:
                out["version"] = getattr(mod, "__version__", None)
        except Exception as e:  # noqa: BLE001 - e.g. mamba_ssm without its CUDA extension: report it
            out["imported"] = False
            out["import_error"] = _short(e)
    return out


def _install_info() -> dict:
    import emma_mamba

    info = {"version": emma_mamba.__version__, "location": os.path.dirname(os.path.abspath(emma_mamba.__file__)),
            "editable": None, "installed_from": None, "distribution_version": _dist_version("emma_mamba")}
    try:
        from importlib import metadata

        # the installed dist-info records how pip installed it; run from the checkout's root (`python -m`), the
        # setuptools egg-info there is found first and says nothing of it, so look at every one
        raw = next((text for d in metadata.distributions(name="emma_mamba")
                    if (text := d.read_text("direct_url.json"))), None)
        if raw:
            direct = json.loads(raw)
            info["editable"] = bool(direct.get("dir_info", {}).get("editable", False))
            info["installed_from"] = direct.get("url")
        elif info["distribution_version"] is not None and \
                os.path.basename(os.path.dirname(info["location"])) in ("site-packages", "dist-packages"):
            info["editable"] = False  # installed from an index or a wheel (a legacy develop install: unknown)
    except Exception:  # noqa: BLE001 - not installed (run from a source tree) or no direct_url.json
        pass
    return info


def _source_dir(install: dict) -> str | None:
    url = install.get("installed_from") or ""
    return url[len("file://"):] if url.startswith("file://") else None


def rebuild_command(archs: list[str], install: dict) -> str:
    """The command that rebuilds emma_mamba._C's CUDA kernels for ``archs`` (['75'] -> EMMA_CUDA_ARCHS=75)."""
    value = ";".join(archs)
    var = f'EMMA_CUDA_ARCHS="{value}"' if ";" in value else f"EMMA_CUDA_ARCHS={value}"
    src = _source_dir(install)
    if install.get("editable"):
        cd = f"cd {src} && " if src else ""
        return f"{cd}{var} pip install --no-build-isolation -e ."
    return f"{var} pip install --no-build-isolation --no-deps --force-reinstall {src or '.'}" + (
        "" if src else "  (in a checkout of the source)")


def _torch_info(torch) -> dict:
    cudnn = None
    with contextlib.suppress(Exception):
        cudnn = torch.backends.cudnn.version()
    return {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "cudnn": cudnn, "num_threads": torch.get_num_threads()}


def cpu_isa_of(ext) -> tuple[str | None, str | None]:
    """(the instruction set the compiled CPU scan kernels run with now: EMMA_CPU_ISA's, or this CPU's best; the
    error instead, where EMMA_CPU_ISA names an unknown set or one this CPU lacks) of extension module ``ext``;
    (None, None) for a build without the query."""
    if not hasattr(ext, "cpu_isa"):
        return None, None
    try:
        return ext.cpu_isa(), None
    except RuntimeError as e:
        return None, str(e).splitlines()[0].removeprefix("emma_mamba: ") or type(e).__name__  # TORCH_CHECK's line


def _extension_info() -> dict:
    out = {"importable": False, "error": None, "path": None, "with_cuda": None, "cuda_archs": None,
           "built_from_these_sources": None, "sources": None, "cpu_isa": None, "cpu_isa_error": None,
           "built_against_torch": None, "torch_mismatch": None, "fix": None}
    try:
        from emma_mamba import _C
    except Exception as e:  # noqa: BLE001 - ImportError, or an OSError of a broken build
        from emma_mamba.ops import import_fix

        out["error"], out["fix"] = _short(e), import_fix(e)
        return out
    from emma_mamba.ops import torch_mismatch

    out.update(importable=True, path=getattr(_C, "__file__", None), with_cuda=bool(getattr(_C, "with_cuda", False)),
               cuda_archs=getattr(_C, "cuda_archs", None), built_against_torch=getattr(_C, "torch_version", None),
               torch_mismatch=torch_mismatch(_C))
    out["cpu_isa"], out["cpu_isa_error"] = cpu_isa_of(_C)
    from emma_mamba.ops import build_freshness

    try:
        out["built_from_these_sources"], out["sources"] = build_freshness(_C)
    except OSError as e:
        out["sources"] = f"the sources could not be read ({_short(e)})"
    return out


def _gpu_info(torch, ops, archs: str | None, with_cuda: bool | None) -> dict:
    out = {"cuda_available": False, "count": 0, "devices": [], "error": None}
    try:
        if not torch.cuda.is_available():
            return out
        out["cuda_available"] = True
        out["count"] = torch.cuda.device_count()
        for i in range(out["count"]):
            cc = tuple(torch.cuda.get_device_capability(i))
            mem = None
            with contextlib.suppress(Exception):
                mem = round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)
            covered = None
            if with_cuda and archs:
                covered = bool(ops.cuda_archs_cover(archs, cc))
            elif with_cuda is False:
                covered = False
            out["devices"].append({"index": i, "name": torch.cuda.get_device_name(i), "capability": list(cc),
                                   "sm": f"{cc[0]}{cc[1]}", "memory_gib": mem, "covered": covered})
    except Exception as e:  # noqa: BLE001 - a broken driver is something to report
        out["error"] = _short(e)
    return out


def _emulator_info(ops) -> dict:
    """cuda-emu, reported without building it (loading it compiles csrc/cuda for the CPU: minutes)."""
    out = {"available": None, "reason": "not loaded: loading it builds the CUDA emulator (use_backend('cuda-emu'))",
           "runs_on": ["cpu"]}
    try:
        from .ops import cuda_emulator as emu  # a cheap import: it builds nothing until load()

        if emu._module is not None:
            return {**out, "available": True, "reason": None}
        src = emu.csrc_dir()
        missing = [s for s in emu._SOURCES + emu._DEPENDS if not (src / s).is_file()]
        if missing:
            out.update(available=False, reason=f"the source tree is needed: {src} lacks {', '.join(missing)}")
        else:
            out["reason"] += f"; sources found at {src}"
    except Exception as e:  # noqa: BLE001
        out["reason"] += f" ({_short(e)})"
    return out


def collect() -> dict:
    """The report as a dict (the --json output)."""
    import torch

    from emma_mamba import ops

    install = _install_info()
    packages = {name: package_status(name, dist) for name, dist in PACKAGES.items()}
    packages.update({name: package_status(name, dist, try_import=True) for name, dist in PEERS.items()})
    ext = _extension_info()
    gpus = _gpu_info(torch, ops, ext["cuda_archs"], ext["with_cuda"] if ext["importable"] else None)

    backends = {}
    for name in ops.BACKENDS:
        ok, reason = ops.probe_backend(name)
        runs_on = ops.runs_on(name)
        # available: its kernels load; usable_now: and there are tensors here it runs on (a GPU for cuda)
        usable = ok and ("cpu" in runs_on or ("cuda" in runs_on and gpus["cuda_available"]))
        backends[name] = {"available": ok, "usable_now": usable, "reason": reason, "runs_on": runs_on}
    backends["cuda-emu"] = _emulator_info(ops)

    dispatch = {
        "preference": ops.preference(),
        "cpu": ops.explain_backend("cpu", backends),
        "cuda": ops.explain_backend("cuda", backends) if gpus["cuda_available"] else None,
    }
    report = {
        "emma_mamba": install,
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "torch": _torch_info(torch),
        "packages": packages,
        "lmms_eval": lmms_eval_info(),
        "extension": ext,
        "gpus": gpus,
        "backends": backends,
        "dispatch": dispatch,
        "env": {k: os.environ.get(k) for k in RUNTIME_VARS},
        "build_env": {k: os.environ.get(k) for k in BUILD_VARS},
        "warnings": [],
    }
    report["warnings"] = _warnings(report, torch)
    return report


def lmms_eval_info() -> dict:
    """lmms-eval (read from its metadata, not imported): its version, whether emma_mamba's model is in its
    entry-point group (``python -m lmms_eval --model emma_mamba``), and whether the ``filelock._api`` module that
    lmms-eval 0.7 imports exists (filelock 4 removed it)."""
    import importlib.metadata as md
    import importlib.util

    out = package_status("lmms_eval", "lmms-eval")
    out["model_registered"] = any(ep.name == "emma_mamba" and ep.value == LMMS_EVAL_TARGET
                                  for ep in md.entry_points().select(group=LMMS_EVAL_GROUP))
    out["filelock_api"] = None
    if out["installed"]:
        try:
            out["filelock_api"] = importlib.util.find_spec("filelock._api") is not None
        except ImportError:  # no filelock at all
            out["filelock_api"] = False
    return out


def _warnings(r: dict, torch) -> list[str]:
    out = []
    ext, gpus, install = r["extension"], r["gpus"], r["emma_mamba"]
    lm = r["lmms_eval"]
    if lm["installed"] and not lm["model_registered"]:
        src = _source_dir(install)
        how = (f"cd {src} && pip install --no-build-isolation -e ." if install.get("editable") and src else
               "pip install --no-build-isolation -e . in the source checkout")
        out.append(f"lmms-eval is installed but emma_mamba's model is not in its '{LMMS_EVAL_GROUP}' entry points "
                   f"(this install of emma_mamba predates it): `python -m lmms_eval --model emma_mamba` fails until "
                   f"emma_mamba is installed again: {how}")
    if lm["installed"] and lm["filelock_api"] is False and str(lm["version"] or "").startswith("0.7."):
        out.append(f"lmms-eval {lm['version']} imports filelock._api, which this filelock "
                   f"({_dist_version('filelock') or 'not installed'}) lacks: its evaluations fail at start; "
                   f"pip install 'filelock<4'")
    if not ext["importable"]:
        out.append(f"emma_mamba._C is not importable ({ext['error']}): the cuda and cpu backends are unavailable; "
                   f"{ext['fix']}")
    elif ext["torch_mismatch"]:
        out.append(ext["torch_mismatch"])
    if ext["built_from_these_sources"] is False:
        out.append(ext["sources"])
    if ext.get("cpu_isa_error"):
        out.append(f"{ext['cpu_isa_error']}: the CPU backend's scan fails on every call until it is unset or fixed")
    devices = gpus["devices"]
    if ext["importable"] and devices:
        pick = (r["dispatch"]["cuda"] or {}).get("backend")
        if pick == "cuda":  # forced, or chosen before: ops choose it themselves only when every GPU is covered
            then = "ops run on the cuda backend all the same (forced, or chosen earlier), whose kernels fail there"
        else:
            then = f"CUDA tensors run on the {pick} backend" if pick else "ops on CUDA tensors fail"
        if not ext["with_cuda"]:
            sms = sorted({d["sm"] for d in devices}, key=int)
            out.append(f"emma_mamba._C was built without the CUDA kernels (no nvcc or a CPU torch at build time, or "
                       f"EMMA_SKIP_CUDA_BUILD=1): {then}. To build them (nvcc of "
                       f"torch's CUDA {r['torch']['cuda']} major version): {rebuild_command(sms, install)}")
        elif ext["cuda_archs"]:
            bad = [d for d in devices if d["covered"] is False]
            if bad:
                sms = sorted({d["sm"] for d in devices}, key=int)  # every GPU here: covered ones need theirs too
                names = ", ".join(f"GPU {d['index']} {d['name']} (sm_{d['sm']})" for d in bad)
                built = "sm_" + ext["cuda_archs"].replace(";", ", sm_")
                out.append(f"emma_mamba._C's CUDA kernels were built for {built} and cannot run on {names}: "
                           f"{then}. Fix: {rebuild_command(sms, install)}")
    if not gpus["cuda_available"] and os.path.exists("/dev/nvidiactl"):
        if torch.version.cuda is None:
            out.append(f"an NVIDIA driver is present but torch {torch.__version__} is a CPU build: install a CUDA "
                       f"build of torch to use the GPU")
        elif os.environ.get("CUDA_VISIBLE_DEVICES") is None:
            out.append(f"an NVIDIA driver is present but torch (CUDA {torch.version.cuda}) sees no GPU: is the "
                       f"driver too old for CUDA {torch.version.cuda}?")
    if gpus["cuda_available"] and os.environ.get("TRITON_INTERPRET") == "1":
        out.append("TRITON_INTERPRET=1 is set on a machine with a GPU: the Triton kernels run in the interpreter, "
                   "CUDA tensors too (slowly); unset it to compile them")
    if gpus["error"]:
        out.append(f"querying the GPUs failed: {gpus['error']}")
    for dev, pick in r["dispatch"].items():
        if isinstance(pick, dict) and pick.get("error"):
            out.append(f"ops on {dev.upper() if dev == 'cpu' else 'CUDA'} tensors will fail: {pick['error']}")
    return out


# ---------------------------------------------------------------------------------------------------------
# text

def _pkg_line(name: str, p: dict) -> str:
    if not p["installed"]:
        text = "not installed"
    else:
        text = p["version"] or "installed (version unknown)"
        if p["imported"] is False:
            text += f", import fails: {p['import_error']}"
    if p["distribution"] != name and p["installed"]:
        text += f" ({p['distribution']})"
    return f"  {name:<15}{text}"


def format_text(r: dict) -> str:
    e, t, x, g = r["emma_mamba"], r["torch"], r["extension"], r["gpus"]
    lines = ["emma-mamba env", ""]
    where = e["location"]
    if e["editable"]:
        where += f" (editable install of {e['installed_from']})"
    elif e["editable"] is False:
        where += " (installed" + (f" from {e['installed_from']})" if e["installed_from"] else ")")
    elif e["distribution_version"] is None:
        where += " (not pip-installed: imported from the source tree)"
    lines.append(f"  {'emma_mamba':<15}{e['version']} at {where}")
    lines.append(f"  {'python':<15}{r['python']['version']} ({r['python']['implementation']}, "
                 f"{r['python']['executable']})")
    lines.append(f"  {'platform':<15}{r['platform']}")
    cuda = f"CUDA {t['cuda']}" if t["cuda"] else (f"ROCm/HIP {t['hip']}" if t["hip"] else "CPU build")
    cudnn = f", cuDNN {t['cudnn']}" if t["cudnn"] else ""
    lines.append(f"  {'torch':<15}{t['version']} ({cuda}{cudnn}; {t['num_threads']} CPU "
                 f"thread{'s' if t['num_threads'] != 1 else ''})")
    for name, p in r["packages"].items():
        if name != "torch":
            lines.append(_pkg_line(name, p))
    lm = r["lmms_eval"]
    lines.append(_pkg_line("lmms_eval", lm) + ("" if not lm["installed"] else
                                               ": model emma_mamba registered" if lm["model_registered"] else
                                               ": model emma_mamba NOT registered (see warnings)"))

    lines += ["", "compiled extension emma_mamba._C"]
    if not x["importable"]:
        lines.append(f"  not importable: {x['error']}")
    else:
        lines.append(f"  {'path':<15}{x['path']}")
        if not x["with_cuda"]:
            lines.append(f"  {'CUDA kernels':<15}no (CPU kernels only)")
        elif x["cuda_archs"]:
            archs = x["cuda_archs"].split(";")
            plain = [a for a in archs if a.isdigit()]
            ptx = f", PTX of compute_{max(plain, key=int)} for newer GPUs" if plain else ""
            lines.append(f"  {'CUDA kernels':<15}yes, for {', '.join('sm_' + a for a in archs)}{ptx}")
        else:
            lines.append(f"  {'CUDA kernels':<15}yes (architectures not recorded: an older build)")
        isa = os.environ.get("EMMA_CPU_ISA", "")
        why = f" (EMMA_CPU_ISA={isa})" if isa not in ("", "auto") else " (this CPU's best)"
        lines.append(f"  {'CPU kernels':<15}" + (f"{x['cpu_isa']}{why}" if x["cpu_isa"] else
                                                 f"FAIL: {x['cpu_isa_error']}" if x["cpu_isa_error"] else
                                                 "instruction set not recorded: an older build"))
        built = x["built_against_torch"]
        lines.append(f"  {'built against':<15}" + (f"torch {built}" + (" (ANOTHER torch: rebuild, see warnings)"
                                                                       if x["torch_mismatch"] else "")
                                                   if built else "torch version not recorded: an older build"))
        fresh = x["built_from_these_sources"]
        lines.append(f"  {'sources':<15}" + ("as built (csrc/ unchanged since)" if fresh else
                                             "CHANGED since the build: rebuild (see warnings)" if fresh is False
                                             else x["sources"]))

    lines += ["", f"GPUs: {g['count'] if g['cuda_available'] else 'none'}"
              + ("" if g["cuda_available"] else " (torch.cuda.is_available() is False)")]
    for d in g["devices"]:
        mem = f", {d['memory_gib']} GiB" if d["memory_gib"] is not None else ""
        cov = {True: "covered by the build", False: "NOT covered by the build", None: "coverage unknown"}[d["covered"]]
        lines.append(f"  {d['index']}: {d['name']} (sm_{d['sm']}{mem}): {cov}")
    if g["error"]:
        lines.append(f"  error: {g['error']}")

    lines += ["", "backends"]
    for name, b in r["backends"].items():
        if b["available"] is None:
            text = b["reason"]
        elif not b["available"]:
            text = f"unavailable: {b['reason']}"
        else:
            text = "available"
            if name == "triton" and "cpu" not in b["runs_on"]:
                now = os.environ.get("TRITON_INTERPRET")
                state = ("not set" if now is None else "set after triton was imported: too late" if now == "1"
                         else f"it is {now!r}")
                text += (": CUDA tensors" + ("" if g["cuda_available"] else " (no GPU here)") + "; CPU tensors "
                         f"only with TRITON_INTERPRET=1 before triton is imported ({state})")
            elif name == "triton":
                text += ": CPU and CUDA tensors, in the interpreter (TRITON_INTERPRET=1)"
            elif name == "cuda":
                text += ": CUDA tensors" + ("" if g["cuda_available"] else " (no GPU here: nothing to run on now)")
            elif name == "cpu":
                text += ": CPU tensors"
            elif name == "torch":
                text += ": the fp32 reference, any device"
        lines.append(f"  {name:<10}{text}")

    d = r["dispatch"]
    pref = "; ".join(f"{dev.upper() if dev == 'cpu' else 'CUDA'} tensors {' > '.join(o)}"
                     for dev, o in d["preference"].items())
    lines += ["", f"dispatch (preference: {pref}; EMMA_MAMBA_BACKEND forces one)"]
    for dev, label in (("cpu", "CPU tensors"), ("cuda", "CUDA tensors")):
        pick = d[dev]
        if pick is None:
            lines.append(f"  {label:<14}-> (no GPU)")
        elif pick["error"]:
            lines.append(f"  {label:<14}-> error: {pick['error']}" + (f" [{pick['why']}]" if pick["why"] else ""))
        else:
            lines.append(f"  {label:<14}-> {pick['backend']} ({pick['why']})")

    set_vars = {k: v for k, v in r["env"].items() if v is not None}
    lines += ["", "environment (kernels and dispatch)"]
    if set_vars:
        lines += [f"  {k}={v}   ({RUNTIME_VARS[k]})" for k, v in set_vars.items()]
    else:
        lines.append("  none set")
    build = {k: v for k, v in r["build_env"].items() if v is not None}
    if build:
        lines.append("  for the next build: " + " ".join(f"{k}={v}" for k, v in build.items()))

    if r["warnings"]:
        lines.append("")
        lines += [f"WARNING: {w}" for w in r["warnings"]]
    return "\n".join(lines)
