// csrc/cuda's kernels compiled by the host compiler for the CPU emulator (see cuda_emu.h), with the emulator's
// self-test kernels: one translation unit, so torch's headers (most of each file's compile time) are parsed once.
#include "../cuda/selective_scan.cu"
#include "../cuda/causal_conv1d.cu"
#include "../cuda/state_update.cu"
#include "selftest.cpp"
