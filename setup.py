"""Build of emma_mamba and its compiled extension emma_mamba._C.

The C++ CPU kernels are always built. The CUDA kernels in csrc/cuda are built too when torch has CUDA and
nvcc is found, for the architectures in EMMA_CUDA_ARCHS (default "80;90"); EMMA_SKIP_CUDA_BUILD=1 skips
them. torch must be installed first, and pip must run with --no-build-isolation (as for flash-attn and
mamba-ssm), or pip would download a second torch to build against:

    pip install --no-build-isolation -e ".[test]"
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("emma_mamba: torch must be installed before building (pip install torch), and pip needs "
             "--no-build-isolation: pip install --no-build-isolation -e .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """CUDA_HOME from the environment, the nvcc on PATH (following wrapper scripts) or the usual places."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, "r", errors="ignore") as f:
                for tok in f.read(4096).split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return os.path.realpath(c)
    return None


def nvcc_version(cuda_home):
    """(major, minor) of the toolkit's nvcc ("Cuda compilation tools, release 13.0, V13.0.88"), or None."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_cuda_versions(cuda_home):
    """torch's extension builder refuses an nvcc whose major version differs from torch's CUDA (a minor
    difference only warns): say so before any compiling, with the ways out."""
    have = nvcc_version(cuda_home)
    want = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    if have is not None and have[0] != want[0]:
        sys.exit(f"emma_mamba: the CUDA toolkit at {cuda_home} is {have[0]}.{have[1]}, but torch "
                 f"{torch.__version__} was built with CUDA {want[0]}.{want[1]}; the CUDA kernels need the same "
                 f"major version. Point CUDA_HOME at a CUDA {want[0]}.x toolkit, install a torch built for CUDA "
                 f"{have[0]}.x, or set EMMA_SKIP_CUDA_BUILD=1 to build the CPU kernels only (CUDA tensors then run "
                 f"on the Triton kernels if triton is installed, else on the torch reference).")


def cuda_lib_dir(cuda_home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        p = os.path.join(cuda_home, sub)
        if glob.glob(os.path.join(p, "libcudart.so*")):
            return p
    return None


def cuda_extra_include_dirs(cuda_home):
    """torch's CUDA headers include cusparse.h/cublas_v2.h; a minimal toolkit (nvcc + cudart only) lacks
    them, but the pip nvidia-* wheels that torch depends on ship them: add their include folder."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    dirs = []
    for base in sys.path:
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cusparse.h")) or os.path.isfile(os.path.join(inc, "cublas_v2.h")):
                dirs.append(os.path.realpath(inc))
    return list(dict.fromkeys(dirs))


def cuda_archs() -> list[str]:
    """EMMA_CUDA_ARCHS (default 80;90) as a list like ['80', '90']."""
    out = []
    for a in os.environ.get("EMMA_CUDA_ARCHS", "80;90").replace(",", ";").split(";"):
        a = a.strip().lower().replace("sm_", "").replace(".", "")
        if not a:
            continue
        if not a.rstrip("a").isdigit():
            sys.exit(f"emma_mamba: EMMA_CUDA_ARCHS entry {a!r} is not an architecture like 80 or 90")
        out.append(a)
    return out


def cuda_arch_flags():
    """SASS for every listed architecture, and the newest one's PTX too, which the driver compiles for GPUs newer
    than any listed (e.g. Blackwell from an 80;90 build), as PyTorch's '+PTX' does."""
    archs = cuda_archs()
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    ptx = max((a for a in archs if a.isdigit()), key=int, default=None)  # not an arch-specific '90a'
    if ptx is not None:
        flags += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
    return flags


def csrc_digest() -> str:
    """emma_mamba._csrc_digest.csrc_digest of csrc/, loaded from its file (the package is not importable yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_emma_csrc_digest",
                                                  os.path.join(ROOT, "emma_mamba", "_csrc_digest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.csrc_digest(os.path.join(ROOT, "csrc"))


def build_plan():
    """Decide what to compile; returns (extension, with_cuda, reason_if_no_cuda)."""
    cpp_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # the sources' digest, recorded in the extension: ops warns when a checkout's csrc/ has changed since
    # and the torch it is built against: torch has no ABI across versions, so ops names a mismatch
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DEMMA_EXT_NAME=_C", f'-DEMMA_CSRC_DIGEST="{csrc_digest()}"',
           f'-DEMMA_TORCH_VERSION="{torch.__version__}"']
    if _truthy("EMMA_SKIP_CUDA_BUILD"):
        reason = "EMMA_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} was built without CUDA"
    else:
        cuda_home = find_cuda_home()
        reason = None if cuda_home else "nvcc was not found (set CUDA_HOME)"
    if reason is not None:
        ext = CppExtension("emma_mamba._C", cpp_sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
        return ext, False, reason

    check_cuda_versions(cuda_home)
    os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it
    import torch.utils.cpp_extension as cpp_ext
    cpp_ext.CUDA_HOME = cuda_home
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
            "-lineinfo", "-DEMMA_WITH_CUDA", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "--threads", os.environ.get("EMMA_NVCC_THREADS", "2")] + cuda_arch_flags()
    extra_inc = cuda_extra_include_dirs(cuda_home)
    if extra_inc:  # after the toolkit's own include folder, so its cuda_runtime.h keeps matching nvcc
        nvcc += ["-I" + os.path.join(cuda_home, "include")] + ["-I" + d for d in extra_inc]
    lib_dir = cuda_lib_dir(cuda_home)
    archs = ";".join(cuda_archs())  # recorded in the extension: ops checks the GPU against it
    ext = CUDAExtension("emma_mamba._C", cpp_sources + cu_sources,
                        extra_compile_args={"cxx": cxx + ["-DEMMA_WITH_CUDA", f'-DEMMA_CUDA_ARCH_LIST="{archs}"'],
                                            "nvcc": nvcc},
                        library_dirs=[lib_dir] if lib_dir else [], extra_link_args=["-fopenmp"])
    return ext, True, None


class Build(BuildExtension):
    """BuildExtension that says, in one message, what was built and why a failure happened."""

    def build_extensions(self):
        print(f"emma_mamba: building emma_mamba._C with {'CPU + CUDA' if WITH_CUDA else 'CPU'} kernels"
              + ("" if WITH_CUDA else f" only ({NO_CUDA_REASON})")
              + (f" for {os.environ.get('EMMA_CUDA_ARCHS', '80;90')}" if WITH_CUDA else ""), flush=True)
        try:
            super().build_extensions()
        except Exception as e:
            hint = ("the CUDA kernels (csrc/cuda) failed to compile; set EMMA_SKIP_CUDA_BUILD=1 to build the "
                    "CPU kernels only, or EMMA_CUDA_ARCHS to target other GPUs" if WITH_CUDA else
                    "the C++ CPU kernels (csrc/cpu) failed to compile: a C++20 compiler with OpenMP is needed")
            raise RuntimeError(f"emma_mamba: building emma_mamba._C failed: {hint}. "
                               f"The compiler output above names the first error. ({type(e).__name__}: {e})") from e


EXT, WITH_CUDA, NO_CUDA_REASON = build_plan()

with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="emma_mamba",
    version="0.1.0",
    description="A Mamba-based multimodal LLM on its own selective-scan kernels (CUDA, Triton, C++ CPU)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE", "NOTICE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Operating System :: POSIX :: Linux",
    ],
    python_requires=">=3.10",
    # configs/ sits at the top of the repository (the design's layout) and installs inside the package. The Triton
    # kernels live in emma_mamba/kernels/: a top-level kernels/ folder was importable as `kernels` wherever the
    # repository root is on sys.path (setup.py's own folder, `python -m` from the root, pytest's rootdir) and
    # shadowed the PyPI package `kernels` that transformers 5.2x depends on, whose egg_info writer setuptools
    # loads on every build: `pip install -e .` with transformers installed failed (No module named
    # 'kernels._internals').
    # emma_mamba/assets (the tokenizer, the chat page) holds no Python but is listed as a package, so setuptools
    # (>= 69) does not warn that it "would be ignored" and ship it only as package data
    packages=find_packages(include=["emma_mamba", "emma_mamba.*"]) + ["emma_mamba.assets", "emma_mamba.configs"],
    package_dir={"emma_mamba.configs": "configs"},
    package_data={"emma_mamba": ["py.typed"], "emma_mamba.assets": ["*"], "emma_mamba.configs": ["*.yaml"]},
    include_package_data=True,
    ext_modules=[EXT],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.6",  # tested: 2.6, 2.11 (CPU tests), 2.11 (CUDA build), 2.14, 2.15 (CI); FSDP2 needs 2.6
        "einops",
        "numpy",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "tqdm",
        "pillow",
        # the vision tower (open_clip's ViTs, read through forward_intermediates) is the model's, not an option:
        # without it neither the quickstart nor a checkpoint runs
        "open_clip_torch>=3.0",
        "torchvision",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3.2", "transformers>=4.40", "mambapy",
                 "open_clip_torch>=3.0", "timm", "torchvision", "scikit-image", "matplotlib", "ninja",
                 "openai",  # the real client against `serve` (tests/models/test_openai_client.py)
                 "scipy",  # the pixel oracle of tests/data/test_shapes_pixels.py (also scikit-image's dependency)
                 "openpyxl"],  # the .xlsx reader checking tests/eval/test_mmbench_submission.py (pandas' engine)
        "vision": ["timm"],  # the dual encoder's second tower (DINOv2; open_clip's towers are a base requirement)
        "peers": ["mambapy", "transformers>=4.40"],
        "plot": ["matplotlib"],
        "wandb": ["wandb"],
        # `python -m lmms_eval --model emma_mamba` (emma_mamba/eval/lmms_eval_model.py); lmms-eval 0.7.3 imports
        # filelock._api, which filelock 4 removed
        "lmms-eval": ["lmms-eval>=0.7.3,<0.8", "filelock<4"],
    },
    entry_points={"console_scripts": ["emma-mamba=emma_mamba.cli:main"],
                  # `python -m lmms_eval --model emma_mamba` (lmms-eval finds its models in this group)
                  "lmms_eval.models": ["emma_mamba=emma_mamba.eval.lmms_eval_model:manifest"]},
)
