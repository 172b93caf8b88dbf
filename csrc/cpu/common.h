// Helpers shared by the CPU kernels: argument checks with messages that name the op and the argument, and
// conversions between the tensors' storage dtypes (fp32/fp16/bf16) and the fp32 working arrays the kernels
// compute in (all accumulation is fp32, whatever the input dtype).
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace emma {
namespace cpu {

// TORCH_CHECK with the op's Python-visible name in front: "emma_mamba._C.<op>_cpu: <message>".
#define EMMA_CHECK(cond, op, ...) TORCH_CHECK((cond), "emma_mamba._C.", op, "_cpu: ", __VA_ARGS__)

inline std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

inline std::string dtype_list(std::initializer_list<at::ScalarType> dts) {
  std::string r;
  for (auto dt : dts) r += (r.empty() ? "" : ", ") + std::string(c10::toString(dt));
  return r;
}

// What every tensor argument of a kernel must be: defined, on the CPU, of one of `dtypes`, of exactly `shape`.
inline void check_arg_meta(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                           std::initializer_list<at::ScalarType> dtypes) {
  EMMA_CHECK(t.defined(), op, name, " is an undefined tensor");
  EMMA_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got one on ", t.device());
  EMMA_CHECK(t.sizes().equals(shape), op, name, " must have shape ", shape_str(shape), ", got ",
             shape_str(t.sizes()));
  bool ok = false;
  for (auto dt : dtypes) ok = ok || t.scalar_type() == dt;
  EMMA_CHECK(ok, op, name, " must have dtype in (", dtype_list(dtypes), "), got ", t.scalar_type());
}

// A tensor argument a kernel reads through raw pointers as a contiguous array.
inline void check_arg(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                      std::initializer_list<at::ScalarType> dtypes) {
  check_arg_meta(op, name, t, shape, dtypes);
  EMMA_CHECK(t.is_contiguous(), op, name, " must be contiguous (its strides are ", shape_str(t.strides()),
             "); call .contiguous() first");
}

// An argument read row by row with its own strides: only its last dimension must have unit stride (the mixer's x
// and z are views of one in_proj output; see emma_mamba/ops/_checks.py).
inline void check_rows_arg(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                           std::initializer_list<at::ScalarType> dtypes) {
  check_arg_meta(op, name, t, shape, dtypes);
  EMMA_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, op, name, " must have unit stride along its last dimension "
             "(its strides are ", shape_str(t.strides()), "); call .contiguous() first");
}

inline void check_opt_rows_arg(const char* op, const char* name, const std::optional<at::Tensor>& t,
                               at::IntArrayRef shape, std::initializer_list<at::ScalarType> dtypes) {
  if (t.has_value() && t->defined()) check_rows_arg(op, name, *t, shape, dtypes);
}

inline void check_opt_arg(const char* op, const char* name, const std::optional<at::Tensor>& t,
                          at::IntArrayRef shape, std::initializer_list<at::ScalarType> dtypes) {
  if (t.has_value() && t->defined()) check_arg(op, name, *t, shape, dtypes);
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline bool is_float_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

// dst[i] = float(src[offset + i]) for i < count, src of storage dtype `dt`.
inline void load_f32(const void* src, at::ScalarType dt, int64_t offset, int64_t count, float* dst) {
  switch (dt) {
    case at::kFloat:
      std::memcpy(dst, static_cast<const float*>(src) + offset, sizeof(float) * count);
      break;
    case at::kHalf: {
      const c10::Half* p = static_cast<const c10::Half*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(src) + offset;
      for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(p[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "emma_mamba: unsupported dtype ", dt);
  }
}

// dst[offset + i] = src[i] rounded to the storage dtype `dt` (round-to-nearest-even for fp16/bf16).
inline void store_f32(void* dst, at::ScalarType dt, int64_t offset, int64_t count, const float* src) {
  switch (dt) {
    case at::kFloat:
      std::memcpy(static_cast<float*>(dst) + offset, src, sizeof(float) * count);
      break;
    case at::kHalf: {
      c10::Half* p = static_cast<c10::Half*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) p[i] = c10::Half(src[i]);
      break;
    }
    case at::kBFloat16: {
      c10::BFloat16* p = static_cast<c10::BFloat16*>(dst) + offset;
      for (int64_t i = 0; i < count; ++i) p[i] = c10::BFloat16(src[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "emma_mamba: unsupported dtype ", dt);
  }
}

inline float load_one(const void* src, at::ScalarType dt, int64_t offset) {
  float v;
  load_f32(src, dt, offset, 1, &v);
  return v;
}

// Prefetch src[offset, offset + count) (storage dtype dt) into the cache. The kernels walk many rows at a
// stride of a whole sequence (one short segment per channel and chunk): too many streams for the hardware
// prefetcher, so each segment would start with cache misses.
inline void prefetch_f32(const void* src, at::ScalarType dt, int64_t offset, int64_t count, bool for_write) {
#if defined(__GNUC__)
  const int64_t es = dt == at::kFloat ? 4 : 2;
  const char* p = static_cast<const char*>(src) + offset * es;
  const int64_t bytes = count * es;
  if (for_write) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 1, 3);
  } else {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
  }
#else
  (void)src, (void)dt, (void)offset, (void)count, (void)for_write;
#endif
}

// softplus with torch's default threshold (x > 20: x), and its derivative (sigmoid, 1 above the threshold).
inline float softplus_f(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }
inline float sigmoid_f(float x) { return 1.f / (1.f + std::exp(-x)); }

// Flush denormals to zero while a kernel runs on this thread: a decaying state otherwise spends hundreds of
// cycles per op in denormal arithmetic. Restores the caller's mode on scope exit.
class DenormalGuard {
 public:
  DenormalGuard() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~DenormalGuard() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(saved_);
#endif
  }
  DenormalGuard(const DenormalGuard&) = delete;
  DenormalGuard& operator=(const DenormalGuard&) = delete;

 private:
  unsigned int saved_ = 0;
};

}  // namespace cpu
}  // namespace emma
