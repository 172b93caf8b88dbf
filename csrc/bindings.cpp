// Python bindings of emma_mamba._C: <op>_cpu always, <op>_cuda when built with the CUDA kernels.
#include <torch/python.h>

#include <string>

#include "cpu/scan_kernels.h"
#include "ops.h"

#define EMMA_BIND(ns, suffix)                                                                          \
  m.def("selective_scan_fwd_" suffix, &emma::ns::selective_scan_fwd, "selective scan forward");        \
  m.def("selective_scan_bwd_" suffix, &emma::ns::selective_scan_bwd, "selective scan backward");       \
  m.def("causal_conv1d_fwd_" suffix, &emma::ns::causal_conv1d_fwd, "causal conv1d forward");           \
  m.def("causal_conv1d_bwd_" suffix, &emma::ns::causal_conv1d_bwd, "causal conv1d backward");          \
  m.def("selective_state_update_" suffix, &emma::ns::selective_state_update, "selective scan step");   \
  m.def("causal_conv1d_update_" suffix, &emma::ns::causal_conv1d_update, "causal conv1d step");

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "emma_mamba compiled kernels (see emma_mamba.ops for the public API)";
#ifdef EMMA_CSRC_DIGEST
  m.attr("csrc_digest") = EMMA_CSRC_DIGEST;  // of the sources built (emma_mamba/_csrc_digest.py)
#endif
#ifdef EMMA_TORCH_VERSION
  m.attr("torch_version") = EMMA_TORCH_VERSION;  // torch.__version__ at the build (no ABI across versions)
#endif
  EMMA_BIND(cpu, "cpu")
  // what the CPU selective scan runs on now: this CPU's best, or EMMA_CPU_ISA's (read per call, as the kernels
  // do; an unknown or unsupported value raises the kernels' own error)
  m.def("cpu_isa", [] { return std::string(emma::cpu::scan::select_scan_kernels().isa); },
        "instruction set of the CPU selective-scan kernels a call would use now (avx512, avx2 or scalar)");
#ifdef EMMA_WITH_CUDA
  EMMA_BIND(cuda, "cuda")
  m.attr("with_cuda") = true;
#ifdef EMMA_CUDA_ARCH_LIST
  m.attr("cuda_archs") = EMMA_CUDA_ARCH_LIST;  // e.g. "80;90": SASS for each, PTX of the newest
#endif
#else
  m.attr("with_cuda") = false;
#endif
}
