// csrc/cuda/state_update.cu compiled by the host compiler for the CPU emulator (see cuda_emu.h).
#include "../cuda/state_update.cu"
