// Inner loops of the CPU selective scan: one channel, one chunk of time steps, 16 state lanes at a time.
//
// The host code (selective_scan.cpp) splits the state dimension n into blocks of kLanes = 16 lanes (padded
// with A = B = C = 0, so a padded lane keeps h = 0 and contributes nothing) and calls these once per
// (channel, chunk, lane block). All arrays are fp32. The recurrence per lane is
//     h_t = exp(dt_t * A) * hp_t + dtu_t * B_t,     hp_t = reset_t ? 0 : h_{t-1},     dtu_t = dt_t * u_t
// and y_t = <C_t, h_t> (D, z and the dtype conversions are the host's job). The kernels take A already
// multiplied by log2(e) (they compute exp(dt A) as 2^(dt A log2 e)).
//
// The functions exist once per instruction set (AVX-512, AVX2+FMA, portable scalar), compiled from the same
// source (scan_kernels_impl.inc) with different target attributes; select_scan_kernels() picks the best one
// the running CPU supports, or the one named by EMMA_CPU_ISA=avx512|avx2|scalar (tests use this to check
// every path against the reference).
#pragma once

#include <cstdint>

namespace emma {
namespace cpu {
namespace scan {

constexpr int kLanes = 16;

struct FwdArgs {
  int len = 0;                    // time steps in this chunk
  const float* dt = nullptr;      // [len] delta after bias and softplus
  const float* dtu = nullptr;     // [len] dt * u
  const float* A = nullptr;       // [kLanes] A * log2(e)
  const float* B = nullptr;       // B_t = B + t * bstride, kLanes floats (bstride 0: constant B)
  int64_t bstride = 0;
  const float* C = nullptr;       // C_t = C + t * cstride
  int64_t cstride = 0;
  const uint8_t* reset = nullptr; // [len] 1 where the state restarts from zero (seq_idx), or nullptr
  float* h = nullptr;             // [kLanes] state before the chunk in, state after the chunk out
  float* y = nullptr;             // [len] y_t += <C_t, h_t>, or nullptr
  float* hbuf = nullptr;          // [len * kLanes] h_t out (backward recompute), or nullptr
  float* abuf = nullptr;          // [len * kLanes] exp(dt_t A) out, with hbuf
  // [len] 2^(dt_t A log2 e) when all lanes of the channel share one A (Mamba-2: one scalar A per head,
  // repeated over the state): the per-lane exponential is then a broadcast of it. nullptr: computed per lane.
  const float* decay = nullptr;
  // With decay and without hbuf (the forward): the lane blocks of the channel to run in one time loop
  // (independent recurrences side by side, one sum of h_t C_t per step for all of them), and where block j's
  // data lie: h at + j * kLanes, B at + j * bblock, C at + j * cblock.
  int nblocks = 1;
  int64_t bblock = 0, cblock = 0;
};

struct BwdArgs {
  int len = 0;
  const float* dt = nullptr;      // [len]
  const float* dtu = nullptr;     // [len]
  const float* dy = nullptr;      // [len] dL/dy_t
  const float* A = nullptr;       // [kLanes]
  const float* B = nullptr;
  int64_t bstride = 0;
  const float* C = nullptr;
  int64_t cstride = 0;
  const uint8_t* reset = nullptr;
  const float* hstart = nullptr;  // [kLanes] state before the chunk (h_{-1} of the chunk)
  const float* hbuf = nullptr;    // [len * kLanes] h_t (from the recompute)
  const float* abuf = nullptr;    // [len * kLanes] exp(dt_t A)
  float* carry = nullptr;         // [kLanes] in: dL/dh_{len-1} from later steps; out: dL/dh_{-1}
  float* sgb = nullptr;           // [len] += sum_lanes g_t * B_t          (g_t = dL/dh_t, total)
  float* saq = nullptr;           // [len] += sum_lanes (A log2 e) * g_t * a_t * hp_t (times ln 2: dL/ddt part)
  float* dA = nullptr;            // [kLanes] += sum_t dt_t * g_t * a_t * hp_t
  bool var_b = false;             // B varies over time: dB_t = dB + t * kLanes += g_t * dtu_t
  bool var_c = false;             // likewise dC_t += dy_t * h_t; if constant, dB/dC [kLanes] += the sum over t
  float* dB = nullptr;
  float* dC = nullptr;
};

struct ScanKernels {
  const char* isa;
  void (*fwd)(const FwdArgs&);   // forward over one chunk (also the backward's recompute, with hbuf/abuf)
  void (*bwd)(const BwdArgs&);   // reverse sweep over one chunk
  // elementwise over x[0, round_up(len, 16)): the buffers must be that long
  void (*softplus_inplace)(float* x, int len);
  void (*sigmoid)(const float* x, float* out, int len);
  void (*exp2_scaled)(const float* x, float s, float* out, int len);  // out = 2^(s x), as fwd computes it
  // one decode step of one channel over np (a multiple of kLanes) state lanes: h <- 2^(A dt) h + B dtu (A
  // times log2 e, as fwd), returns <C, h>
  float (*step)(const float* A, const float* B, const float* C, float* h, int np, float dt, float dtu);
};

// The kernels for this CPU, or for EMMA_CPU_ISA when set (an error if the CPU lacks that instruction set).
const ScanKernels& select_scan_kernels();

}  // namespace scan
}  // namespace cpu
}  // namespace emma
