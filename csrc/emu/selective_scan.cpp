// csrc/cuda/selective_scan.cu compiled by the host compiler for the CPU emulator (see cuda_emu.h).
#include "../cuda/selective_scan.cu"
