// Kernels that exercise the emulator itself (tests/ops/test_cuda_emulator.py): shuffle semantics against a
// hand computation, a shared-memory race that the schedule orders expose, and undefined behaviour it must
// report instead of running.
#include <ATen/ATen.h>

#include "cuda_emu.h"

namespace emma_emu {
namespace selftest {
namespace {

// out[t, 0..3] = shfl_up / shfl_down / shfl_xor / shfl_idx of the value 100 * warp + lane
__global__ void shuffles(float* out, int delta, int width) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const float v = 100.f * warp + lane;
  out[4 * t + 0] = __shfl_up_sync(0xffffffffu, v, delta, width);
  out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, delta, width);
  out[4 * t + 2] = __shfl_xor_sync(0xffffffffu, v, delta, width);
  out[4 * t + 3] = __shfl_sync(0xffffffffu, v, delta, width);
}

// each thread reads its neighbour's shared-memory slot; `sync` puts the barrier the read needs in between
__global__ void neighbour(float* out, bool sync) {
  EMMA_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncthreads();
  out[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

// a static shared array that block 1 reads without writing: fresh shared memory (NaN), not what block 0 left
__global__ void static_fresh(float* out) {
  __shared__ float buf[64];
  if (blockIdx.x == 0) buf[threadIdx.x % 64] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[threadIdx.x % 64];
}

__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
}

__global__ void split_warp(float* out) {
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  else __syncthreads();
}

__global__ void partial_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1); }

}  // namespace

at::Tensor run(const std::string& name, int threads, int arg0, int arg1) {
  auto out = at::zeros({threads * 4}, at::kFloat);
  float* o = out.data_ptr<float>();
  const auto s = at::cuda::getCurrentCUDAStream();
  const size_t smem = threads * sizeof(float);
  if (name == "shuffles") EMMA_LAUNCH(shuffles, 1, threads, 0, s, o, arg0, arg1);
  else if (name == "neighbour") EMMA_LAUNCH(neighbour, 1, threads, smem, s, o, arg0 != 0);
  else if (name == "static_fresh") EMMA_LAUNCH(static_fresh, 2, threads, 0, s, o);
  else if (name == "shuffle_after_exit") EMMA_LAUNCH(shuffle_after_exit, 1, threads, 0, s, o);
  else if (name == "split_warp") EMMA_LAUNCH(split_warp, 1, threads, 0, s, o);
  else if (name == "partial_mask") EMMA_LAUNCH(partial_mask, 1, threads, 0, s, o);
  else throw std::invalid_argument("no self-test kernel named '" + name + "'");
  return out;
}

}  // namespace selftest
}  // namespace emma_emu
