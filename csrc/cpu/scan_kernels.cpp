// The chunk kernels of scan_kernels.h for each instruction set, and the runtime choice between them.
//
// One source (scan_kernels_impl.inc) is compiled three times against a 16-lane vector type `V`:
//   * avx512: one __m512 per V           (GCC `#pragma GCC target("avx512f,...")` region)
//   * avx2:   two __m256 per V, with FMA  (`#pragma GCC target("avx2,fma")` region)
//   * scalar: float[16], portable C++     (any architecture, any compiler)
// so the extension is built with the baseline flags, runs on any x86-64 (and compiles elsewhere), and uses
// the widest vectors the running CPU has. The SIMD paths need GCC's target pragmas (clang and others get the
// scalar path only).
//
// exp dominates the scan (one per time step and state lane). vexp is the Cephes expf scheme: split
// x = k ln2 + r with |r| <= ln2/2 (ln2 in two parts, so r is exact to fp32), a degree-5 polynomial for e^r
// and the exponent bits set directly for 2^k; max relative error about 2 ulp. Inputs are clamped to
// [-87.3, 88]: below, e^x (< 1.2e-38) returns ~1e-38 instead of 0, which no fp32 tolerance can see.
#include "scan_kernels.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/util/Exception.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EMMA_X86_SIMD 1
#include <immintrin.h>
// The vector types never cross a non-inlined ABI boundary; GCC's note about AVX argument passing is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own "undefined" helper vectors.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define EMMA_X86_SIMD 0
#endif

namespace emma {
namespace cpu {
namespace scan {

namespace {
constexpr float kExpLo = -87.3f, kExpHi = 88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace

// Each V's operators are namespace-scope functions, not in-class friends: GCC does not apply a
// `#pragma GCC target` region to friend definitions, and the intrinsics would then fail to inline.

// ---------------------------------------------------------------------------------------------------------
// portable scalar
namespace scalar {

inline float exp1(float x) {
  x = std::fmin(std::fmax(x, kExpLo), kExpHi);
  const float k = std::rint(x * kLog2e);
  float r = std::fma(k, -kLn2Hi, x);
  r = std::fma(k, -kLn2Lo, r);
  float p = std::fma(kP0, r, kP1);
  p = std::fma(p, r, kP2);
  p = std::fma(p, r, kP3);
  p = std::fma(p, r, kP4);
  p = std::fma(p, r, kP5);
  p = std::fma(p, r * r, r) + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct V {
  float v[kLanes];
  static V load(const float* p) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = p[i]; return r; }
  void store(float* p) const { for (int i = 0; i < kLanes; ++i) p[i] = v[i]; }
  static V set1(float x) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = x; return r; }
  static V zero() { return set1(0.f); }
  float sum() const {  // pairwise, the same tree as the vector paths
    float s[kLanes];
    for (int i = 0; i < kLanes; ++i) s[i] = v[i];
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) s[i] += s[i + w];
    return s[0];
  }
};
inline V operator+(const V& a, const V& b) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
inline V operator*(const V& a, const V& b) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
inline V fmadd(const V& a, const V& b, const V& c) {
    V r; for (int i = 0; i < kLanes; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return r;
  }
inline V vexp(const V& x) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = exp1(x.v[i]); return r; }

#include "scan_kernels_impl.inc"

}  // namespace scalar

#if EMMA_X86_SIMD
// ---------------------------------------------------------------------------------------------------------
// AVX2 + FMA: two 8-lane halves
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  const __m256i ki = _mm256_cvtps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)));  // round to nearest
  const __m256 k = _mm256_cvtepi32_ps(ki);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(ki, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

struct V {
  __m256 lo, hi;
  static V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  void store(float* p) const { _mm256_storeu_ps(p, lo); _mm256_storeu_ps(p + 8, hi); }
  static V set1(float x) { const __m256 s = _mm256_set1_ps(x); return {s, s}; }
  static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  float sum() const {
    const __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    return _mm_cvtss_f32(s4);
  }
};
inline V operator+(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V operator*(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vexp(V x) { return {exp8(x.lo), exp8(x.hi)}; }

#include "scan_kernels_impl.inc"

}  // namespace avx2
#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------
// AVX-512: one register per V
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace avx512 {

struct V {
  __m512 v;
  static V load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return {_mm512_set1_ps(x)}; }
  static V zero() { return {_mm512_setzero_ps()}; }
  float sum() const {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
    return _mm_cvtss_f32(s4);
  }
};
inline V operator+(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V fmadd(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V vexp(V xv) {
    __m512 x = _mm512_min_ps(_mm512_max_ps(xv.v, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
    const __m512i ki = _mm512_cvtps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)));
    const __m512 k = _mm512_cvtepi32_ps(ki);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kP0), r, _mm512_set1_ps(kP1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(ki, _mm512_set1_epi32(127)), 23);
    return {_mm512_mul_ps(p, _mm512_castsi512_ps(bits))};
  }

#include "scan_kernels_impl.inc"

}  // namespace avx512
#pragma GCC pop_options
#endif  // EMMA_X86_SIMD

// ---------------------------------------------------------------------------------------------------------
// runtime choice

namespace {
const ScanKernels kScalar{"scalar", &scalar::fwd_chunk, &scalar::bwd_chunk};
#if EMMA_X86_SIMD
const ScanKernels kAvx2{"avx2", &avx2::fwd_chunk, &avx2::bwd_chunk};
const ScanKernels kAvx512{"avx512", &avx512::fwd_chunk, &avx512::bwd_chunk};

bool has_avx512() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return v;
}
bool has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}
#else
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif
}  // namespace

const ScanKernels& select_scan_kernels() {
  const char* env = std::getenv("EMMA_CPU_ISA");  // read per call (cheap), so tests can switch paths
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") {
#if EMMA_X86_SIMD
    if (has_avx512()) return kAvx512;
    if (has_avx2()) return kAvx2;
#endif
    return kScalar;
  }
  if (want == "scalar") return kScalar;
#if EMMA_X86_SIMD
  if (want == "avx2") {
    TORCH_CHECK(has_avx2(), "emma_mamba: EMMA_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    return kAvx2;
  }
  if (want == "avx512") {
    TORCH_CHECK(has_avx512(), "emma_mamba: EMMA_CPU_ISA=avx512 but this CPU lacks AVX-512F/DQ");
    return kAvx512;
  }
#endif
  TORCH_CHECK(false, "emma_mamba: EMMA_CPU_ISA=", want, " is not an instruction set this build has; use "
              "auto, scalar", EMMA_X86_SIMD ? ", avx2 or avx512" : "");
}

}  // namespace scan
}  // namespace cpu
}  // namespace emma
