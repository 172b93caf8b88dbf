"""Where the CUDA kernels spill registers: ptxas's per-kernel report plus where each spill sits in the SASS.

    python setup.py build_ext --inplace        # once: this reads the build's own nvcc flags from build.ninja
    python benchmarks/cuda_sass.py [--arch 90] [--sources csrc/cuda/selective_scan.cu] [--out FILE]

ptxas says how many bytes a kernel spills, not where. Spills in the per-chunk prologue or epilogue cost a few
local-memory accesses per chunk; inside the loop over states they would cost one per element. This compiles each
source to a cubin for one architecture with the build's flags (``-Xptxas -v``), disassembles it with
``cuobjdump`` (the toolkit's, or the copy Triton's wheel ships), finds each kernel's loops (a backward branch and
its target) and reports, per kernel: registers, spill bytes, spill instructions (STL/LDL) in all, and for every
loop that runs the scan's arithmetic (MUFU: exp2; SHFL: the warp scan) its size and the spill instructions
inside it. Nothing runs on a GPU: this is the static code. Writes JSON (``--out``) with the toolkit's version.
"""

from __future__ import annotations

import argparse
import glob
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import add_out, machine, parse_args, run_script, write_result  # noqa: E402
SPILL = re.compile(r"^(?:@!?U?P\w+\s+)?(STL|LDL)\b")
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def build_flags(root: Path = ROOT) -> list[str]:
    """nvcc's flags of the last ``setup.py build_ext`` (its build.ninja), without its -gencode targets and its
    --threads: the kernels are inspected as they are built."""
    files = sorted(glob.glob(str(root / "build" / "temp*" / "build.ninja")))
    if not files:
        raise FileNotFoundError(f"no build.ninja under {root / 'build'}: run `python setup.py build_ext --inplace` "
                                f"with CUDA first")
    text = Path(files[-1]).read_text()
    flags = []
    for key in ("cuda_cflags", "cuda_post_cflags"):
        m = re.search(rf"^{key} = (.*)$", text, re.MULTILINE)
        if m is None:
            raise ValueError(f"{files[-1]}: no {key} (was the extension built without CUDA?)")
        flags += shlex.split(m.group(1))
    out, skip = [], 0
    for f in flags:
        if skip:
            skip -= 1
        elif f in ("-gencode", "--threads"):
            skip = 1
        elif f not in ("-c", "--compiler-options") and "-fPIC" not in f:  # ninja's quoting leaves "'-fPIC'"
            out.append(f)
    return out


def find_tool(name: str, nvcc: str) -> str:
    """``name`` beside nvcc, on PATH, or the copy Triton's wheel ships."""
    here = Path(nvcc).resolve().parent / name
    if here.is_file():
        return str(here)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    raise FileNotFoundError(f"{name} not found (beside {nvcc}, on PATH, or in Triton's wheel)")


def ptxas_report(log: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, spill store/load bytes and stack frame, from ``-Xptxas -v``."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), {})
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                       spill_load_bytes=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


def sass_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Per mangled kernel name: its (address, instruction) list from ``cuobjdump -sass``."""
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = INSTR.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def loops(instrs: list[tuple[int, str]]) -> list[dict]:
    """Each loop (a backward branch to a lower address) that runs scan arithmetic (MUFU or SHFL): its address
    range, instruction count, MUFU/SHFL count and the spill instructions inside, outermost last."""
    found = []
    for addr, text in instrs:
        m = BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in instrs if lo <= a <= addr]
            hot = sum(("MUFU" in t) or ("SHFL" in t) for t in body)
            if hot:
                found.append({"start": hex(lo), "end": hex(addr), "instructions": len(body), "mufu_shfl": hot,
                              "spill_instructions": sum(bool(SPILL.match(t)) for t in body)})
    return sorted(found, key=lambda x: x["instructions"])


def demangle_short(name: str) -> str:
    """``scan_fwd_kernel<bf16, fp32>`` from the mangled name of a kernel in an anonymous namespace (enough to
    tell the instances apart); the mangled name where it does not parse."""
    m = re.search(r"_cu_[0-9a-f]{8}(\d+)", name)
    if not m:
        return name
    start = m.end()
    ident = name[start:start + int(m.group(1))]
    rest = name[start + int(m.group(1)):]
    if not rest.startswith("I"):
        return ident
    names = {"N3c108BFloat16E": "bf16", "N3c104HalfE": "fp16", "f": "fp32", "S4_": None, "Lb1E": "packed",
             "Lb0E": ""}  # the bool of the scan kernels: the instance for packed sequences (seq_idx), or not
    args = []
    for a in re.findall(r"N3c108BFloat16E|N3c104HalfE|S4_|Lb[01]E|f", rest[1:rest.find("EEv") + 1]):
        args.append(args[0] if names[a] is None and args else names[a])
    args = [a for a in args if a]
    return f"{ident}<{', '.join(args)}>"


def inspect(source: Path, arch: str, flags: list[str], nvcc: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [nvcc, "--cubin", f"-arch=sm_{arch}", "-Xptxas", "-v", *flags, str(source), "-o", str(cubin)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"nvcc failed on {source}:\n{run.stderr[-3000:]}")
        report = ptxas_report(run.stdout + run.stderr)
        sass = subprocess.run([find_tool("cuobjdump", nvcc), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    kernels = []
    for name, instrs in sass_functions(sass).items():
        r = report.get(name, {})
        found = loops(instrs)
        kernels.append({"kernel": demangle_short(name), "mangled": name, **r,
                        "spill_instructions": sum(bool(SPILL.match(t)) for _, t in instrs), "hot_loops": found})
    return {"source": str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source), "kernels": kernels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="one SM architecture, e.g. 90 (default) or 80")
    p.add_argument("--sources", nargs="+", default=["csrc/cuda/selective_scan.cu"], help="CUDA sources to inspect")
    p.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    add_out(p, None, "write the report as JSON here")
    args = parse_args(p, argv)
    try:
        flags = build_flags()
        results = [inspect(ROOT / s if not Path(s).is_absolute() else Path(s), args.arch, flags, args.nvcc)
                   for s in args.sources]
    except (FileNotFoundError, ValueError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"cuda_sass: {e}", file=sys.stderr)
        return 2
    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"sm_{args.arch}, {version[-1] if version else 'nvcc'}")
    print(f"  {'kernel':46} {'regs':>4} {'spill st/ld B':>13} {'STL/LDL':>7}  loops with MUFU/SHFL, innermost "
          f"first: instructions/MUFU+SHFL/STL+LDL inside")
    for res in results:
        print(res["source"])
        for k in res["kernels"]:
            loop = "  ".join(f"{x['instructions']}/{x['mufu_shfl']}/{x['spill_instructions']}"
                             for x in k["hot_loops"]) or "-"
            print(f"  {k['kernel']:46} {k.get('registers', '?'):>4} "
                  f"{k.get('spill_store_bytes', '?'):>6}/{k.get('spill_load_bytes', '?'):<6} "
                  f"{k['spill_instructions']:>7}  {loop}")
    write_result({"benchmark": "cuda_sass", "arch": f"sm_{args.arch}", "nvcc": version[-1] if version else None,
                  "machine": machine(None, None), "results": results}, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
