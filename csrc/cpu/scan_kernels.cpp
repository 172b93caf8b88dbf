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
// The exponential dominates the scan (one per time step and state lane). The kernels take A pre-scaled by
// log2(e) and compute 2^y, y = dt * A log2(e): k = round(y), f = y - k in [-1/2, 1/2] (exact), 2^f by a
// degree-6 polynomial (a near-minimax fit, max relative error 1e-7 in fp32 Horner), and 2^k by the exponent
// bits (AVX-512: vscalefps, which also gives 0 for very negative y). Folding log2(e) into A adds one fp32
// rounding to the exponent, the same size as the rounding of dt * A that the reference itself makes.
//
// Each V's operators are namespace-scope functions, not in-class friends: GCC does not apply a
// `#pragma GCC target` region to friend definitions, and the intrinsics would then fail to inline.
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
// 2^f on [-1/2, 1/2]
constexpr float kE0 = 1.0f, kE1 = 6.931471825e-01f, kE2 = 2.402264625e-01f, kE3 = 5.550328642e-02f,
                kE4 = 9.618489072e-03f, kE5 = 1.339993090e-03f, kE6 = 1.534581097e-04f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
// log(1 + x) - x + x^2/2 = x^3 P(x) on [sqrt(1/2) - 1, sqrt(2) - 1] (Cephes logf)
constexpr float kL0 = 7.0376836292e-2f, kL1 = -1.1514610310e-1f, kL2 = 1.1676998740e-1f,
                kL3 = -1.2420140846e-1f, kL4 = 1.4249322787e-1f, kL5 = -1.6668057665e-1f,
                kL6 = 2.0000714765e-1f, kL7 = -2.4999993993e-1f, kL8 = 3.3333331174e-1f;
constexpr float kSqrt2 = 1.41421356237f;
}  // namespace

// ---------------------------------------------------------------------------------------------------------
// portable scalar
namespace scalar {

// Written so that a loop over 16 lanes vectorises with the baseline instruction set (SSE2 on x86-64,
// NEON on arm64): no libm calls, no branches.
inline float exp2_1(float y) {
  y = y < -127.f ? -127.f : y;
  y = y > 127.f ? 127.f : y;
  const float k = (y + 12582912.f) - 12582912.f;  // round to nearest (|y| < 2^22)
  const float f = y - k;
  float p = kE6;
  p = p * f + kE5; p = p * f + kE4; p = p * f + kE3; p = p * f + kE2; p = p * f + kE1; p = p * f + kE0;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // k = -127: 0
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
  float sum() const {  // pairwise
    float s[kLanes];
    for (int i = 0; i < kLanes; ++i) s[i] = v[i];
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) s[i] += s[i + w];
    return s[0];
  }
  // lane i = sum of row i of the row-major 16 x 16 block P
  static V row_sums(const float* P) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = load(P + i * kLanes).sum(); return r; }
};
#define EMMA_V_BINOP(OP) \
  inline V operator OP(const V& a, const V& b) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] OP b.v[i]; return r; }
EMMA_V_BINOP(+)
EMMA_V_BINOP(-)
EMMA_V_BINOP(*)
EMMA_V_BINOP(/)
#undef EMMA_V_BINOP
// a * b + c; without hardware FMA a separate multiply and add (std::fma would be a slow libm call)
inline V fmadd(const V& a, const V& b, const V& c) {
  V r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}
inline V vmax(const V& a, const V& b) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return r; }
inline V vselect_gt(const V& x, const V& t, const V& a, const V& b) {  // x > t ? a : b
  V r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = x.v[i] > t.v[i] ? a.v[i] : b.v[i];
  return r;
}
inline V vexp2(const V& y) {
  V r;
#pragma omp simd
  for (int i = 0; i < kLanes; ++i) r.v[i] = exp2_1(y.v[i]);
  return r;
}

#include "scan_kernels_impl.inc"

}  // namespace scalar

#if EMMA_X86_SIMD
// ---------------------------------------------------------------------------------------------------------
// AVX2 + FMA: two 8-lane halves
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

static inline __m256 exp2_8(__m256 y) {
  // NaN second: max/min return their second operand when either is NaN, so a NaN stays one (and p below too)
  y = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-127.f), y));
  const __m256i ki = _mm256_cvtps_epi32(y);  // round to nearest
  const __m256 f = _mm256_sub_ps(y, _mm256_cvtepi32_ps(ki));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kE6), f, _mm256_set1_ps(kE5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE0));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(ki, _mm256_set1_epi32(127)), 23);  // k = -127: 0
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// lane i = sum of v[i] (8 vectors)
static inline __m256 row_sums8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
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
  static V row_sums(const float* P) {
    __m256 a[8], b[8];
    for (int i = 0; i < 8; ++i) {
      a[i] = _mm256_add_ps(_mm256_loadu_ps(P + i * 16), _mm256_loadu_ps(P + i * 16 + 8));
      b[i] = _mm256_add_ps(_mm256_loadu_ps(P + (i + 8) * 16), _mm256_loadu_ps(P + (i + 8) * 16 + 8));
    }
    return {row_sums8(a), row_sums8(b)};
  }
};
inline V operator+(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V operator-(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V operator*(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V operator/(V a, V b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vmax(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V vselect_gt(V x, V t, V a, V b) {
  return {_mm256_blendv_ps(b.lo, a.lo, _mm256_cmp_ps(x.lo, t.lo, _CMP_GT_OQ)),
          _mm256_blendv_ps(b.hi, a.hi, _mm256_cmp_ps(x.hi, t.hi, _CMP_GT_OQ))};
}
inline V vexp2(V y) { return {exp2_8(y.lo), exp2_8(y.hi)}; }

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
  // Transpose-and-add tree: halves, quarters, then pairs and single lanes inside 128-bit quarters; the
  // result lane 4m + e holds row m + 4e, put back in order by one permute.
  static V row_sums(const float* P) {
    __m512 s1[8], s2[4], s3[2];
    for (int j = 0; j < 8; ++j) {
      const __m512 x = _mm512_loadu_ps(P + (2 * j) * 16), y = _mm512_loadu_ps(P + (2 * j + 1) * 16);
      s1[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int j = 0; j < 4; ++j)
      s2[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0x88),
                            _mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0xDD));
    for (int j = 0; j < 2; ++j)
      s3[j] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * j], s2[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_ps(s2[2 * j], s2[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return {_mm512_permutexvar_ps(idx, r)};
  }
};
inline V operator+(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V fmadd(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V vmax(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V vselect_gt(V x, V t, V a, V b) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, t.v, _CMP_GT_OQ), b.v, a.v)};
}
inline V vexp2(V yv) {
  const __m512 k = _mm512_roundscale_ps(yv.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(yv.v, k);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kE6), f, _mm512_set1_ps(kE5));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE0));
  return {_mm512_scalef_ps(p, k)};  // p * 2^k, 0 / inf out of range
}

#include "scan_kernels_impl.inc"

}  // namespace avx512
#pragma GCC pop_options
#endif  // EMMA_X86_SIMD

// ---------------------------------------------------------------------------------------------------------
// runtime choice

namespace {
#define EMMA_KERNELS(ns) \
  ScanKernels{#ns, &ns::fwd_chunk, &ns::bwd_chunk, &ns::softplus_inplace, &ns::sigmoid, &ns::exp2_scaled, \
              &ns::step_channel}
const ScanKernels kScalar = EMMA_KERNELS(scalar);
#if EMMA_X86_SIMD
const ScanKernels kAvx2 = EMMA_KERNELS(avx2);
const ScanKernels kAvx512 = EMMA_KERNELS(avx512);

bool has_avx512() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  return v;
}
bool has_avx2() {
  static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return v;
}
#endif
#undef EMMA_KERNELS
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
  TORCH_CHECK(false, "emma_mamba: EMMA_CPU_ISA=", want, " is not an instruction set of this build; use auto, "
              "scalar", EMMA_X86_SIMD ? ", avx2 or avx512" : "");
  return kScalar;  // not reached (TORCH_CHECK(false) throws); without it -O0 builds warn
}

}  // namespace scan
}  // namespace cpu
}  // namespace emma
