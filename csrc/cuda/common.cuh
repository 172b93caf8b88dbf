// Shared helpers of the CUDA kernels in csrc/cuda: dtype conversion, vectorised loads/stores of K
// consecutive elements, input checks and the (small) dtype dispatch.
//
// Template fan-out is deliberately small: the sequence kernels are instantiated only over the input dtype
// (fp32/fp16/bf16) and, for the selective scan, whether variable B/C are stored in the input dtype or in
// fp32. Every optional input (z, D, delta_bias, seq_idx, initial state, B/C layout) is a run-time flag,
// uniform across a warp, so it costs a predictable branch rather than another kernel instantiation.
#pragma once

#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>
#ifdef EMMA_CUDA_EMULATION
// compiled by the host compiler and run on the CPU by csrc/emu (tests; see cuda_emu.h)
#include "../emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// the three constructs the emulator replaces: where a tensor must live, dynamic shared memory, a launch
#define EMMA_DEVICE_TENSOR(t) ((t).is_cuda())
#define EMMA_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#define EMMA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace emma {
namespace cuda {

#define EMMA_CHECK(cond, ...) TORCH_CHECK(cond, "emma_mamba._C (cuda): ", __VA_ARGS__)

#define EMMA_CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<at::Half>(at::Half v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<at::BFloat16>(at::BFloat16 v) { return static_cast<float>(v); }

template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

// Loads K consecutive elements p[0..K) as floats. `valid` elements are in range (the rest read as `fill`);
// `vec` says the caller checked that p is 16-byte aligned so full groups can use 16-byte loads.
template <typename T, int K>
__device__ __forceinline__ void load_k(const T* __restrict__ p, float (&out)[K], int valid, bool vec,
                                       float fill = 0.f) {
  constexpr int kPer16 = 16 / sizeof(T);
  if (vec && valid >= K && (K % kPer16) == 0) {
#pragma unroll
    for (int v = 0; v < K / kPer16; ++v) {
      uint4 raw = reinterpret_cast<const uint4*>(p)[v];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer16; ++j) out[v * kPer16 + j] = to_f<T>(e[j]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i) out[i] = i < valid ? to_f<T>(p[i]) : fill;
  }
}

// Stores the first `valid` of K floats to p[0..K) in T.
template <typename T, int K>
__device__ __forceinline__ void store_k(T* __restrict__ p, const float (&in)[K], int valid, bool vec) {
  constexpr int kPer16 = 16 / sizeof(T);
  if (vec && valid >= K && (K % kPer16) == 0) {
#pragma unroll
    for (int v = 0; v < K / kPer16; ++v) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer16; ++j) e[j] = from_f<T>(in[v * kPer16 + j]);
      reinterpret_cast<uint4*>(p)[v] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (i < valid) p[i] = from_f<T>(in[i]);
  }
}

// a * h + b, where a = 0 (a step that starts a packed sequence, seq_idx; or a decay that underflowed) takes
// nothing from h: selected, not multiplied, since 0 * (a NaN or inf of the previous sequence) is NaN and carried it
// into the next one (the reference keeps it in its own sequence)
__device__ __forceinline__ float decay_add(float a, float h, float b) { return a == 0.f ? b : fmaf(a, h, b); }
// decay_add in a kernel for packed sequences; a plain FMA otherwise (the select costs ~20 % of the scan's state
// loop instructions, and without seq_idx only an underflowed decay is 0, where the reference's 0 * h is kept)
template <bool kPacked>
__device__ __forceinline__ float decay_step(float a, float h, float b) {
  return kPacked ? decay_add(a, h, b) : a * h + b;  // (as written before: the compiler's own contraction)
}
// The decay of composed steps, x * a: with packed sequences 0 stays 0 (a composed map that crosses a sequence start
// takes nothing from before it, whatever a NaN or inf comes before or after)
template <bool kPacked>
__device__ __forceinline__ float decay_mul(float x, float a) {
  return kPacked && (x == 0.f || a == 0.f) ? 0.f : x * a;
}

__device__ __forceinline__ float softplus_f(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float silu_f(float x) { return x * sigmoid_f(x); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  EMMA_CHECK(EMMA_DEVICE_TENSOR(t), op, ": ", name, " must be a CUDA tensor");
  EMMA_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}
inline void check_cuda(const std::optional<at::Tensor>& t, const char* op, const char* name) {
  if (t.has_value()) check_cuda(*t, op, name);
}
// An argument's exact shape, from the other arguments' sizes (the kernels index it by them: a wrong one is read
// past its end). The ops layer checks shapes first; these guard emma_mamba._C's and torch.ops' entry points.
inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  EMMA_CHECK(t.sizes().equals(shape), op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}
inline void check_shape(const std::optional<at::Tensor>& t, at::IntArrayRef shape, const char* op,
                        const char* name) {
  if (t.has_value()) check_shape(*t, shape, op, name);
}
// An input read row by row with its own strides (the mixer's x and z, views of in_proj's output): only its last
// dimension must have unit stride.
inline void check_cuda_rows(const at::Tensor& t, const char* op, const char* name) {
  EMMA_CHECK(EMMA_DEVICE_TENSOR(t), op, ": ", name, " must be a CUDA tensor");
  EMMA_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, op, ": ", name, " must have unit stride along its last dimension");
}
inline void check_cuda_rows(const std::optional<at::Tensor>& t, const char* op, const char* name) {
  if (t.has_value()) check_cuda_rows(*t, op, name);
}
// Whether 16-byte vector accesses may start at every row of t: its data and its strides (in bytes) over the
// leading dimensions are multiples of 16.
inline bool rows_aligned16(const at::Tensor& t) {
  if (!aligned16(t.data_ptr())) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if ((t.stride(i) * static_cast<int64_t>(t.element_size())) % 16 != 0) return false;
  return true;
}

template <typename T> const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Dispatch over the three float input dtypes; `scalar_t` names the type inside.
#define EMMA_DISPATCH_FLOAT(dtype, name, ...)                                                  \
  [&] {                                                                                          \
    switch (dtype) {                                                                             \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }              \
      case at::ScalarType::Half: { using scalar_t = at::Half; return __VA_ARGS__(); }            \
      case at::ScalarType::BFloat16: { using scalar_t = at::BFloat16; return __VA_ARGS__(); }    \
      default: EMMA_CHECK(false, name, ": unsupported dtype ", dtype);                           \
    }                                                                                            \
  }()

// Run-time typed scalar load (decode kernels: tiny, so no template fan-out over every dtype combination).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
inline DType dtype_code(at::ScalarType s) {
  switch (s) {
    case at::ScalarType::Float: return kF32;
    case at::ScalarType::Half: return kF16;
    case at::ScalarType::BFloat16: return kBF16;
    default: EMMA_CHECK(false, "unsupported dtype ", s);
  }
  return kF32;
}
__device__ __forceinline__ float load_dyn(const void* p, int dt, int64_t i) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
__device__ __forceinline__ void store_dyn(void* p, int dt, int64_t i, float v) {
  if (dt == kF32) static_cast<float*>(p)[i] = v;
  else if (dt == kF16) static_cast<__half*>(p)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

}  // namespace cuda
}  // namespace emma
