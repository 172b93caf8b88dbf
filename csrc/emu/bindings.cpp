// Python bindings of the emulated CUDA kernels (emma_mamba/ops/cuda_emulator.py builds this module): the
// six kernel entry points of csrc/ops.h under the same names as emma_mamba._C's <op>_cuda, plus the
// emulator's scheduling settings.
#include <torch/python.h>

#include "../ops.h"
#include "cuda_emu.h"

namespace emma_emu { namespace selftest {
at::Tensor run(const std::string& name, int threads, int arg0, int arg1);
} }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "emma_mamba's CUDA kernels run on the CPU by an emulator (tests only; see csrc/emu/cuda_emu.h)";
  m.def("selective_scan_fwd", &emma::cuda::selective_scan_fwd);
  m.def("selective_scan_bwd", &emma::cuda::selective_scan_bwd);
  m.def("causal_conv1d_fwd", &emma::cuda::causal_conv1d_fwd);
  m.def("causal_conv1d_bwd", &emma::cuda::causal_conv1d_bwd);
  m.def("selective_state_update", &emma::cuda::selective_state_update);
  m.def("causal_conv1d_update", &emma::cuda::causal_conv1d_update);
  m.def(
      "set_schedule",
      [](const std::string& order, uint64_t seed) {
        auto& s = emma_emu::settings();
        if (order == "forward") s.order = emma_emu::Order::Forward;
        else if (order == "reverse") s.order = emma_emu::Order::Reverse;
        else if (order == "random") s.order = emma_emu::Order::Random;
        else throw std::invalid_argument("schedule must be forward, reverse or random, got '" + order + "'");
        s.seed = seed;
        s.launches = 0;
      },
      "Order in which runnable threads (and blocks) run between synchronisation points.",
      py::arg("order"), py::arg("seed") = 0);
  m.def("selftest", &emma_emu::selftest::run, "Run one of the emulator's own test kernels (csrc/emu/selftest.cpp).",
        py::arg("name"), py::arg("threads"), py::arg("arg0") = 0, py::arg("arg1") = 32);
}
