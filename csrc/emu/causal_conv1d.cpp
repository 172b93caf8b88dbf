// csrc/cuda/causal_conv1d.cu compiled by the host compiler for the CPU emulator (see cuda_emu.h).
#include "../cuda/causal_conv1d.cu"
