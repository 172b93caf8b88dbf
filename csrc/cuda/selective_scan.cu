// Selective scan (Mamba's S6, Gu & Dao 2023, Alg. 2) forward and backward on CUDA.
//
//   h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,    y_t = <C_t, h_t> + D * u_t,    out_t = y_t * silu(z_t)
//
// Work decomposition. A block is one (batch, channel group); each warp of the block owns one channel and walks
// the sequence in chunks of 32 * K time steps (lane j holds K consecutive steps). Per state index n the
// recurrence is a first-order linear recurrence, i.e. a scan over pairs (a_t, b_t) = (exp(dt_t A_n),
// dt_t B_t u_t) under (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): each lane composes its K pairs sequentially,
// a 5-step warp shuffle scan combines the 32 lane aggregates, and the prefix carried from the previous chunk
// (the state at the chunk start) is applied. The kernel saves the state only at every kSave-th time step
// ("chunk-boundary states", (b, d, ceil(l / kSave), n) fp32), never a (b, d, l, n) tensor.
//
// Backward, per chunk from last to first: recompute the chunk's states from the saved boundary state (the
// same forward scan), then run the reverse scan of the adjoint g_t = dL/dh_t = a_{t+1} g_{t+1} + C_t dy_t
// (a suffix scan over maps g -> alpha g + q with shfl_down), carrying g and a across chunks. The gradients of
// B and C for variable/grouped B, C are summed over the channels of a group: first across the warps of the
// block in shared memory (fixed order), then across blocks either by float atomics (default) or, in the
// deterministic mode, by writing one partial per block and summing the partials with a fixed-order reduction,
// so gradients are bitwise reproducible. Every other reduction (dA, dD, d delta_bias, constant dB/dC) goes
// through per-(batch, channel) partials and a torch sum, deterministic in both modes.
//
// seq_idx (packed sequences) sets a_t = 0 where a new sequence starts: the state restarts from b_t, and no
// gradient flows back across the boundary. Every a * x + y where a may be such a 0 is decay_add's select, so that
// a NaN or inf of one sequence does not reach the next (0 * NaN); the kernels are instantiated with (kPacked) and
// without those selects, chosen by whether seq_idx is given. The initial state only reaches the first segment for the same
// reason. Positions past the end of the sequence are padded with the identity pair (dt = 0 -> a = 1, b = 0).
#include "common.cuh"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "../ops.h"

namespace emma {
namespace cuda {
namespace {

constexpr int kSave = 256;        // saved-state granularity (time steps); = backward chunk (32 lanes x 8)
constexpr int kFwdItems = 16;     // time steps per lane in the forward (chunk of 512)
constexpr int kBwdItems = 8;      // time steps per lane in the backward (chunk of 256)
constexpr int kFwdWarps = 4;      // channels per forward block
constexpr float kLog2e = 1.4426950408889634f;

// A log2(e), with A = -inf (a state that forgets at once) the most negative float: a padding step's dt = 0 must
// give the identity decay 2^(0 A2) = 1, and 0 * -inf is NaN (a NaN A stays NaN)
__device__ __forceinline__ float decay_rate2(float A) {
  const float a2 = A * kLog2e;
  return a2 == -INFINITY ? -3.402823466e38f : a2;
}
constexpr unsigned kFull = 0xffffffffu;
static_assert(32 * kBwdItems == kSave, "the backward chunk must be the saved-state granularity");
static_assert(kSave % kFwdItems == 0, "saved boundaries must fall on forward lane boundaries");

struct ScanParams {
  int batch, dim, seqlen, dstate, nsave;
  // B/C layout: groups == 0 means constant (d, n) fp32; otherwise (b, groups, n, l) (variable = 1 group)
  int groups_B, groups_C;
  bool softplus, vec_in, vec_bc, vec_z;
  const void *u, *delta, *z;
  int64_t z_bs, z_ds;  // z's batch and channel strides: a view of the mixer's in_proj output is read in place
  const void *B, *C;
  const float *A, *D, *delta_bias, *init;
  const int* seq_idx;
  // forward output (in the backward: the recomputed forward output, when asked for; else null)
  void* out;
  float *last_state, *saved;
  // backward
  const void* dout;
  const float *dlast, *saved_in;
  void *du, *ddelta, *dz;
  float *dA_part, *dD_part, *ddb_part, *dinit, *dBc_part, *dCc_part;  // per (b, d[, n]) partials
  float *dB_acc, *dC_acc;  // variable/grouped: atomic accumulators (b, g, n, l) or per-block partials
  bool deterministic;
};

// z's offset of (batch b, channel c)
__device__ __forceinline__ int64_t z_row(const ScanParams& p, int b, int c) {
  return static_cast<int64_t>(b) * p.z_bs + static_cast<int64_t>(c) * p.z_ds;
}

// Time steps [t0, t0 + K) of this lane: valid count, (dt, dt*u, u), and which positions start a new segment.
template <typename T, int K>
__device__ __forceinline__ void load_step_inputs(const ScanParams& p, int64_t row, int c, int b, int t0, int valid,
                                                 float (&u)[K], float (&dt)[K], float (&dt_raw)[K],
                                                 unsigned& reset) {
  load_k<T, K>(static_cast<const T*>(p.u) + row + t0, u, valid, p.vec_in);
  load_k<T, K>(static_cast<const T*>(p.delta) + row + t0, dt_raw, valid, p.vec_in);
  const float bias = p.delta_bias ? p.delta_bias[c] : 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    dt_raw[i] += bias;
    float v = p.softplus ? softplus_f(dt_raw[i]) : dt_raw[i];
    dt[i] = i < valid ? v : 0.f;  // padding: identity step (a = 1, b = 0)
    if (i >= valid) u[i] = 0.f;
  }
  reset = 0;
  if (p.seq_idx) {
    const int* s = p.seq_idx + static_cast<int64_t>(b) * p.seqlen;
    int prev = t0 > 0 && t0 - 1 < p.seqlen ? s[t0 - 1] : 0;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i < valid) {
        int cur = s[t0 + i];
        if (t0 + i > 0 && cur != prev) reset |= 1u << i;
        prev = cur;
      }
    }
  }
}

// B or C values for state n at steps [t0, t0+K): constant (d, n) fp32 (``rows`` null), or variable (b, g, n, l) in
// WT from ``rows``, the (n, l) rows of this batch and channel group (block_bc, found once per kernel: the state loops
// call this per state, and finding the rows there was two integer divisions and the index arithmetic per state and
// per input, most of the forward state loop's integer instructions on sm_90).
template <typename WT, int K>
__device__ __forceinline__ void load_bc(const void* X, const WT* rows, const ScanParams& p, int c, int n, int t0,
                                        int valid, float (&v)[K]) {
  if (rows == nullptr) {
    const float x = static_cast<const float*>(X)[static_cast<int64_t>(c) * p.dstate + n];
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = x;
  } else {
    load_k<WT, K>(rows + static_cast<int64_t>(n) * p.seqlen + t0, v, valid, p.vec_bc);
  }
}

// The (n, l) rows of variable B or C for batch b and the group holding channel c0 (the seq kernels' blocks lie
// in one group: the host checks).
template <typename WT>
__device__ __forceinline__ const WT* block_bc(const void* X, int groups, const ScanParams& p, int b, int c0) {
  return static_cast<const WT*>(X) +
         (static_cast<int64_t>(b) * groups + c0 / (p.dim / groups)) * p.dstate * static_cast<int64_t>(p.seqlen);
}
// block_bc for load_bc: null for a constant (d, n) B or C (groups 0)
template <typename WT>
__device__ __forceinline__ const WT* rows_bc(const void* X, int groups, const ScanParams& p, int b, int c) {
  return groups > 0 ? block_bc<WT>(X, groups, p, b, c) : nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// forward

// The end of both forwards: out[t0, t0 + K) = (y + D u) * silu(z), stored in T (D and z when given).
template <typename T, int K>
__device__ __forceinline__ void store_gated(const ScanParams& p, int64_t row, int64_t zrow, int t0, int valid,
                                            float Dv, const float (&u)[K], float (&y)[K]) {
  float zv[K];
  if (p.z) load_k<T, K>(static_cast<const T*>(p.z) + zrow + t0, zv, valid, p.vec_z);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (p.D) y[i] += Dv * u[i];
    if (p.z) y[i] *= silu_f(zv[i]);
  }
  store_k<T, K>(static_cast<T*>(p.out) + row + t0, y, valid, p.vec_in);
}

template <typename T, typename WT, bool kPacked>
__global__ void __launch_bounds__(kFwdWarps * 32, 4) scan_fwd_kernel(ScanParams p) {
  constexpr int K = kFwdItems;
  EMMA_DYNAMIC_SMEM(float, smem);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = blockIdx.x * kFwdWarps + warp, b = blockIdx.y;
  if (c >= p.dim) return;  // warps are independent in the forward
  const int N = p.dstate, L = p.seqlen;
  float* carry = smem + warp * N;  // state at the current chunk start, one value per n
  const int64_t row = (static_cast<int64_t>(b) * p.dim + c) * L;
  const int64_t bd = static_cast<int64_t>(b) * p.dim + c;
  for (int n = lane; n < N; n += 32) carry[n] = p.init ? p.init[bd * N + n] : 0.f;
  __syncwarp();
  const float Dv = p.D ? p.D[c] : 0.f;
  const WT* Brows = rows_bc<WT>(p.B, p.groups_B, p, b, c);
  const WT* Crows = rows_bc<WT>(p.C, p.groups_C, p, b, c);

  for (int chunk = 0; chunk < L; chunk += 32 * K) {
    const int t0 = chunk + lane * K;
    const int valid = max(0, min(K, L - t0));
    float dt[K], dtu[K], y[K];
    unsigned reset;
    {
      float u[K], dt_raw[K];
      load_step_inputs<T, K>(p, row, c, b, t0, valid, u, dt, dt_raw, reset);
#pragma unroll
      for (int i = 0; i < K; ++i) { dtu[i] = dt[i] * u[i]; y[i] = 0.f; }
    }
    const bool saves = (t0 % kSave) == 0 && t0 < L;
    // a lane whose steps hold no sequence start runs its steps with plain FMAs (their values are of one sequence);
    // the selects only where one starts, and in the combination across lanes
    const bool sel = kPacked && reset != 0;

    for (int n = 0; n < N; ++n) {
      const float A2 = decay_rate2(p.A[static_cast<int64_t>(c) * N + n]);
      float a[K], bb[K], Bv[K];
      load_bc<WT, K>(p.B, Brows, p, c, n, t0, valid, Bv);
      float pa = 1.f, pb = 0.f;  // this lane's composed pair
      auto compose = [&](auto packed) {
        constexpr bool kSel = decltype(packed)::value;
#pragma unroll
        for (int i = 0; i < K; ++i) {
          a[i] = (reset >> i) & 1 ? 0.f : exp2f(dt[i] * A2);
          bb[i] = dtu[i] * Bv[i];
          pb = decay_step<kSel>(a[i], pb, bb[i]);
          pa = decay_mul<kSel>(pa, a[i]);
        }
      };
      if (sel) compose(std::true_type{}); else compose(std::false_type{});
      // inclusive warp scan of the lane pairs (earlier lane o later lane)
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float oa = __shfl_up_sync(kFull, pa, off), ob = __shfl_up_sync(kFull, pb, off);
        if (lane >= off) { pb = decay_step<kPacked>(pa, ob, pb); pa = decay_mul<kPacked>(pa, oa); }
      }
      float ea = __shfl_up_sync(kFull, pa, 1), eb = __shfl_up_sync(kFull, pb, 1);
      if (lane == 0) { ea = 1.f; eb = 0.f; }
      const float h0 = carry[n];
      float h = decay_step<kPacked>(ea, h0, eb);  // state just before this lane's first step
      if (saves) p.saved[(bd * p.nsave + t0 / kSave) * N + n] = h;
      float Cv[K];
      load_bc<WT, K>(p.C, Crows, p, c, n, t0, valid, Cv);
      auto apply = [&](auto packed) {
        constexpr bool kSel = decltype(packed)::value;
#pragma unroll
        for (int i = 0; i < K; ++i) {
          h = decay_step<kSel>(a[i], h, bb[i]);
          y[i] += Cv[i] * h;
        }
      };
      if (sel) apply(std::true_type{}); else apply(std::false_type{});
      const float next = __shfl_sync(kFull, h, 31);
      __syncwarp();
      if (lane == 0) carry[n] = next;
      __syncwarp();
    }

    float u[K];  // reloaded (L1-resident) rather than kept live across the state loop
    if (p.D) load_k<T, K>(static_cast<const T*>(p.u) + row + t0, u, valid, p.vec_in);
    store_gated<T, K>(p, row, z_row(p, b, c), t0, valid, Dv, u, y);
  }
  for (int n = lane; n < N; n += 32) p.last_state[bd * N + n] = carry[n];
}

// ---------------------------------------------------------------------------------------------------------
// forward, state-sequential variant (EMMA_CUDA_SCAN_FWD=seq)
//
// One thread per (batch, channel) walks time one step at a time with the channel's 16 states in registers:
// per (t, n) element one exp2, one multiply and two FMAs, and no shuffles, against ~17 instructions in the warp
// scan above (which spends them composing lane pairs and scanning them across the warp). The variable B and C of
// a tile of kSeqT steps are staged once per block in shared memory as fp32 ([t][n], read back as float4 by
// every thread: a broadcast; fetched a tile ahead), so neither the bf16 conversions nor the L2 reads of B and C
// are repeated per channel. Parallelism is one thread per (b, d) row, so it needs many rows (training shapes) to fill a GPU;
// the warp kernel splits time across lanes and suits small batches. Same outputs and the same saved states
// (every kSave steps), hence the same backward. Variable B and C (one group, or groups of a multiple of
// kSeqThreads channels) and d_state <= kSeqN only; other inputs run the warp kernel.

constexpr int kSeqThreads = 128;  // channels per block
constexpr int kSeqT = 16;         // time steps per tile
constexpr int kSeqN = 16;         // states held in registers (more: the warp kernel)
constexpr int kSeqStride = 20;    // padded [t][n] row of the staged B/C tile (float4-aligned)
static_assert(kSave % kSeqT == 0, "saved boundaries must fall on tile boundaries");

template <typename T, typename WT>
__global__ void __launch_bounds__(kSeqThreads) scan_fwd_seq_kernel(ScanParams p) {
  alignas(16) __shared__ float Bs[kSeqT][kSeqStride];
  alignas(16) __shared__ float Cs[kSeqT][kSeqStride];
  const int N = p.dstate, L = p.seqlen;
  const int c0 = blockIdx.x * kSeqThreads, c = c0 + threadIdx.x, b = blockIdx.y;
  const bool active = c < p.dim;  // inactive threads still stage B/C and meet the barriers
  const int64_t bd = static_cast<int64_t>(b) * p.dim + (active ? c : c0);
  const int64_t row = bd * L;
  const WT* Bp = block_bc<WT>(p.B, p.groups_B, p, b, c0);
  const WT* Cp = block_bc<WT>(p.C, p.groups_C, p, b, c0);
  float A2[kSeqN], h[kSeqN];
#pragma unroll
  for (int n = 0; n < kSeqN; ++n) {
    A2[n] = active && n < N ? decay_rate2(p.A[static_cast<int64_t>(c) * N + n]) : 0.f;
    h[n] = active && n < N && p.init ? p.init[bd * N + n] : 0.f;
  }
  const float Dv = p.D && active ? p.D[c] : 0.f;

  // Each thread stages kStage (n, t) entries of a tile, fetched into registers one tile ahead so that the global
  // loads overlap the previous tile's compute instead of stalling the block at the barrier.
  constexpr int kStage = kSeqT * kSeqN / kSeqThreads;
  static_assert(kStage * kSeqThreads == kSeqT * kSeqN, "the threads must cover a tile exactly");
  float nb[kStage], nc[kStage];
  auto fetch = [&](int t0) {
#pragma unroll
    for (int k = 0; k < kStage; ++k) {
      const int i = threadIdx.x + k * kSeqThreads, n = i / kSeqT, t = i % kSeqT;  // threads run along t
      const bool in = n < N && t0 + t < L;
      nb[k] = in ? to_f<WT>(Bp[static_cast<int64_t>(n) * L + t0 + t]) : 0.f;
      nc[k] = in ? to_f<WT>(Cp[static_cast<int64_t>(n) * L + t0 + t]) : 0.f;
    }
  };
  fetch(0);

  for (int t0 = 0; t0 < L; t0 += kSeqT) {
    const int valid = min(kSeqT, L - t0);
    __syncthreads();  // every thread is done with the previous tile
#pragma unroll
    for (int k = 0; k < kStage; ++k) {
      const int i = threadIdx.x + k * kSeqThreads;
      Bs[i % kSeqT][i / kSeqT] = nb[k];
      Cs[i % kSeqT][i / kSeqT] = nc[k];
    }
    __syncthreads();
    if (t0 + kSeqT < L) fetch(t0 + kSeqT);
    if (!active) continue;
    float u[kSeqT], dt[kSeqT], y[kSeqT];
    unsigned reset;
    {
      float dt_raw[kSeqT];
      load_step_inputs<T, kSeqT>(p, row, c, b, t0, valid, u, dt, dt_raw, reset);
    }
    if (t0 % kSave == 0) {  // the state before step t0, as the warp kernel saves it
#pragma unroll
      for (int n = 0; n < kSeqN; ++n)  // constant bounds: h stays in registers
        if (n < N) p.saved[(bd * p.nsave + t0 / kSave) * N + n] = h[n];
    }
#pragma unroll
    for (int i = 0; i < kSeqT; ++i) {
      if ((reset >> i) & 1) {  // a new sequence starts at this step (uniform across the block: one batch row)
#pragma unroll
        for (int n = 0; n < kSeqN; ++n) h[n] = 0.f;
      }
      const float dtu = dt[i] * u[i];
      float acc = 0.f;
#pragma unroll
      for (int q = 0; q < kSeqN / 4; ++q) {
        const float4 bv = reinterpret_cast<const float4*>(Bs[i])[q];
        const float4 cv = reinterpret_cast<const float4*>(Cs[i])[q];
        const float bq[4] = {bv.x, bv.y, bv.z, bv.w}, cq[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = 4 * q + j;
          h[n] = exp2f(dt[i] * A2[n]) * h[n] + dtu * bq[j];
          acc += cq[j] * h[n];
        }
      }
      y[i] = acc;
    }
    store_gated<T, kSeqT>(p, row, z_row(p, b, active ? c : c0), t0, valid, Dv, u, y);
  }
  if (active) {
#pragma unroll
    for (int n = 0; n < kSeqN; ++n)
      if (n < N) p.last_state[bd * N + n] = h[n];
  }
}

// ---------------------------------------------------------------------------------------------------------
// backward

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

template <typename T, typename WT, bool kPacked>
__global__ void __launch_bounds__(256, 2) scan_bwd_kernel(ScanParams p) {
  constexpr int K = kBwdItems;
  constexpr int kStride = 32 * K + 32;  // padded per-warp row of the dB/dC reduction buffer (K+1 per lane)
  EMMA_DYNAMIC_SMEM(float, smem);
  const int nw = blockDim.x >> 5;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = blockIdx.x * nw + warp, b = blockIdx.y;  // host guarantees nw | dim: every warp is valid
  const int N = p.dstate, L = p.seqlen;
  float* carry_g = smem + warp * N;           // adjoint at the start of the later chunk
  float* carry_a = smem + (nw + warp) * N;    // a at the start of the later chunk
  float* dA_w = smem + (2 * nw + warp) * N;
  float* dBc_w = smem + (3 * nw + warp) * N;
  float* dCc_w = smem + (4 * nw + warp) * N;
  float* red = smem + 5 * nw * N;             // [2][nw][kStride]
  const bool varB = p.groups_B > 0, varC = p.groups_C > 0;

  const int64_t bd = static_cast<int64_t>(b) * p.dim + c;
  const int64_t row = bd * L;
  const WT* Brows = rows_bc<WT>(p.B, p.groups_B, p, b, c);
  const WT* Crows = rows_bc<WT>(p.C, p.groups_C, p, b, c);
  for (int n = lane; n < N; n += 32) {
    carry_g[n] = p.dlast ? p.dlast[bd * N + n] : 0.f;
    carry_a[n] = 1.f;
    dA_w[n] = dBc_w[n] = dCc_w[n] = 0.f;
  }
  __syncwarp();
  const float Dv = p.D ? p.D[c] : 0.f;
  float dD_l = 0.f, ddb_l = 0.f;

  const int nchunks = (L + kSave - 1) / kSave;
  for (int chunk = nchunks - 1; chunk >= 0; --chunk) {
    const int t0 = chunk * kSave + lane * K;
    const int valid = max(0, min(K, L - t0));
    float u[K], dt[K], dy[K], y[K], fz[K], gz[K], du[K], ddt[K];
    unsigned reset;
    {
      float dt_raw[K];
      load_step_inputs<T, K>(p, row, c, b, t0, valid, u, dt, dt_raw, reset);
    }
    const bool sel = kPacked && reset != 0;  // this lane's steps hold a sequence start (the forward's selects)
    load_k<T, K>(static_cast<const T*>(p.dout) + row + t0, dy, valid, p.vec_in);
    if (p.z) {
      float zv[K];
      load_k<T, K>(static_cast<const T*>(p.z) + z_row(p, b, c) + t0, zv, valid, p.vec_z);
#pragma unroll
      for (int i = 0; i < K; ++i) {
        const float s = sigmoid_f(zv[i]);
        fz[i] = dy[i] * s * (1.f + zv[i] * (1.f - s));  // dout * dsilu(z): dz = fz * y
        dy[i] *= zv[i] * s;                              // dy = dout * silu(z)
        gz[i] = silu_f(zv[i]);                           // the gate, for the recomputed output
      }
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i >= valid) dy[i] = 0.f;
      y[i] = 0.f; du[i] = 0.f; ddt[i] = 0.f;
    }

    for (int n = 0; n < N; ++n) {
      const float An = p.A[static_cast<int64_t>(c) * N + n], A2 = decay_rate2(An);
      float a[K], h[K], Bv[K], Cv[K];
      load_bc<WT, K>(p.B, Brows, p, c, n, t0, valid, Bv);
      load_bc<WT, K>(p.C, Crows, p, c, n, t0, valid, Cv);
      // forward recompute of the chunk's states from the saved boundary state (selects as in the forward)
      float pa = 1.f, pb = 0.f;
      auto compose = [&](auto packed) {
        constexpr bool kSel = decltype(packed)::value;
#pragma unroll
        for (int i = 0; i < K; ++i) {
          a[i] = (reset >> i) & 1 ? 0.f : exp2f(dt[i] * A2);
          h[i] = dt[i] * u[i] * Bv[i];  // b_i for now
          pb = decay_step<kSel>(a[i], pb, h[i]);
          pa = decay_mul<kSel>(pa, a[i]);
        }
      };
      if (sel) compose(std::true_type{}); else compose(std::false_type{});
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float oa = __shfl_up_sync(kFull, pa, off), ob = __shfl_up_sync(kFull, pb, off);
        if (lane >= off) { pb = decay_step<kPacked>(pa, ob, pb); pa = decay_mul<kPacked>(pa, oa); }
      }
      float ea = __shfl_up_sync(kFull, pa, 1), eb = __shfl_up_sync(kFull, pb, 1);
      if (lane == 0) { ea = 1.f; eb = 0.f; }
      const float h_in = decay_step<kPacked>(ea, p.saved_in[(bd * p.nsave + chunk) * N + n], eb);
      auto apply = [&](auto packed) {
        constexpr bool kSel = decltype(packed)::value;
        float hc = h_in;
#pragma unroll
        for (int i = 0; i < K; ++i) { hc = decay_step<kSel>(a[i], hc, h[i]); h[i] = hc; }
      };
      if (sel) apply(std::true_type{}); else apply(std::false_type{});
      if (p.z || p.out) {  // y: for dz and the recomputed output
#pragma unroll
        for (int i = 0; i < K; ++i) y[i] += Cv[i] * h[i];
      }
      // reverse scan of the adjoint: g_i = alpha_i g_{i+1} + q_i, alpha_i = a_{i+1}, q_i = C_i dy_i
      float a_next = __shfl_down_sync(kFull, a[0], 1);
      if (lane == 31) a_next = carry_a[n];
      // the adjoint's decays are a_{i+1}: this lane's, and the next lane's (or chunk's) first, 0 where it starts
      // a sequence
      const bool sel_r = kPacked && (reset != 0 || a_next == 0.f);
      float P = 1.f, Q = 0.f;  // this lane's map g_after -> g_first
      auto compose_r = [&](auto packed) {
        constexpr bool kSel = decltype(packed)::value;
#pragma unroll
        for (int i = K - 1; i >= 0; --i) {
          const float alpha = i == K - 1 ? a_next : a[i + 1];
          Q = decay_step<kSel>(alpha, Q, Cv[i] * dy[i]);
          P = decay_mul<kSel>(P, alpha);
        }
      };
      if (sel_r) compose_r(std::true_type{}); else compose_r(std::false_type{});
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float oP = __shfl_down_sync(kFull, P, off), oQ = __shfl_down_sync(kFull, Q, off);
        if (lane + off < 32) { Q = decay_step<kPacked>(P, oQ, Q); P = decay_mul<kPacked>(P, oP); }
      }
      float xP = __shfl_down_sync(kFull, P, 1), xQ = __shfl_down_sync(kFull, Q, 1);
      if (lane == 31) { xP = 1.f; xQ = 0.f; }
      float g = decay_step<kPacked>(xP, carry_g[n], xQ);  // adjoint at the step after this lane's last step
      float dA_l = 0.f, dB_l = 0.f, dC_l = 0.f;
      // variable B/C: this warp's per-step dB/dC go to its row of the block reduction buffer
      float* rB = red + warp * kStride + lane * (K + 1);
      float* rC = red + (nw + warp) * kStride + lane * (K + 1);
      auto walk = [&](auto packed) {
        constexpr bool kSel = decltype(packed)::value;
#pragma unroll
        for (int i = K - 1; i >= 0; --i) {
          const float alpha = i == K - 1 ? a_next : a[i + 1];
          g = decay_step<kSel>(alpha, g, Cv[i] * dy[i]);
          const float hp = i > 0 ? h[i - 1] : h_in;
          const float ga = kSel && a[i] == 0.f ? 0.f : g * hp * a[i];  // dL/da_i * a_i (none at a segment start)
          const float dBi = g * dt[i] * u[i], dCi = dy[i] * h[i];
          du[i] += g * dt[i] * Bv[i];
          ddt[i] += g * u[i] * Bv[i] + ga * An;
          dA_l += ga * dt[i];
          if (varB) rB[i] = dBi; else dB_l += dBi;
          if (varC) rC[i] = dCi; else dC_l += dCi;
        }
      };
      if (sel_r) walk(std::true_type{}); else walk(std::false_type{});
      const float g_start = __shfl_sync(kFull, g, 0), a_start = __shfl_sync(kFull, a[0], 0);
      dA_l = warp_sum(dA_l);
      if (!varB) dB_l = warp_sum(dB_l);
      if (!varC) dC_l = warp_sum(dC_l);
      __syncwarp();
      if (lane == 0) {
        carry_g[n] = g_start;
        carry_a[n] = a_start;
        dA_w[n] += dA_l;
        if (!varB) dBc_w[n] += dB_l;
        if (!varC) dCc_w[n] += dC_l;
      }
      __syncwarp();
      if (varB || varC) {
        // sum dB/dC over the block's channels in shared memory, then over blocks (atomics or partials)
        __syncthreads();
        for (int idx = threadIdx.x; idx < 2 * kSave; idx += blockDim.x) {
          const int which = idx / kSave, tl = idx % kSave, t = chunk * kSave + tl;
          if (t >= L || (which == 0 ? !varB : !varC)) continue;
          const int off = (tl / K) * (K + 1) + tl % K;
          float s = 0.f;
          for (int w = 0; w < nw; ++w) s += red[(which * nw + w) * kStride + off];
          const int groups = which == 0 ? p.groups_B : p.groups_C;
          float* dst = which == 0 ? p.dB_acc : p.dC_acc;
          if (p.deterministic) {  // partial per channel block: (b, dim / nw, n, l)
            dst[((static_cast<int64_t>(b) * gridDim.x + blockIdx.x) * N + n) * L + t] = s;
          } else {                // accumulator (b, g, n, l)
            const int g_idx = (blockIdx.x * nw) / (p.dim / groups);
            atomicAdd(dst + ((static_cast<int64_t>(b) * groups + g_idx) * N + n) * L + t, s);
          }
        }
        __syncthreads();
      }
    }

    float dz[K], dt_raw[K];
    if (p.softplus) load_k<T, K>(static_cast<const T*>(p.delta) + row + t0, dt_raw, valid, p.vec_in);
    const float bias = p.delta_bias ? p.delta_bias[c] : 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      du[i] += Dv * dy[i];
      if (i < valid) dD_l += dy[i] * u[i];
      if (p.z) dz[i] = fz[i] * (y[i] + Dv * u[i]);
      if (p.softplus) ddt[i] *= sigmoid_f(dt_raw[i] + bias);
      if (i < valid) ddb_l += ddt[i];
    }
    store_k<T, K>(static_cast<T*>(p.du) + row + t0, du, valid, p.vec_in);
    store_k<T, K>(static_cast<T*>(p.ddelta) + row + t0, ddt, valid, p.vec_in);
    if (p.z) store_k<T, K>(static_cast<T*>(p.dz) + row + t0, dz, valid, p.vec_in);
    if (p.out) {  // the forward's output, (y + D u) silu(z), as store_gated computes it
#pragma unroll
      for (int i = 0; i < K; ++i) {
        if (p.D) y[i] += Dv * u[i];
        if (p.z) y[i] *= gz[i];
      }
      store_k<T, K>(static_cast<T*>(p.out) + row + t0, y, valid, p.vec_in);
    }
  }

  dD_l = warp_sum(dD_l);
  ddb_l = warp_sum(ddb_l);
  if (lane == 0) {
    p.dD_part[bd] = dD_l;
    p.ddb_part[bd] = ddb_l;
  }
  __syncwarp();
  for (int n = lane; n < N; n += 32) {
    p.dA_part[bd * N + n] = dA_w[n];
    if (!varB) p.dBc_part[bd * N + n] = dBc_w[n];
    if (!varC) p.dCc_part[bd * N + n] = dCc_w[n];
    if (p.dinit) p.dinit[bd * N + n] = carry_a[n] * carry_g[n];  // adjoint of h_{-1}
  }
}

// ---------------------------------------------------------------------------------------------------------
// backward, state-sequential variant (EMMA_CUDA_SCAN_BWD=seq)
//
// A quad of threads owns one (batch, channel) row, each thread 4 of its 16 states (quarter q: states 4q..4q+3),
// and walks time one step at a time: no scans across lanes. The adjoint runs backwards, so each chunk of kSave
// steps is walked twice forwards from its saved state first: pass 1 writes the state at every tile of kBsT
// steps (checkpoints, thread-local), pass 2, tile by tile from the last, recomputes the tile's states and
// decay factors into registers and walks them backwards:
//   g_t = a_{t+1} g_{t+1} + C_t dy_t,   ga = g_t h_{t-1} a_t,   dA += ga dt,   du_t = dt sum_n g B + D dy,
//   ddelta_t = u sum_n g B + sum_n ga A,   dB_t = g dt u,   dC_t = dy h_t.
// Per (t, n) element that is two exp2 and ~20 other instructions, against ~44 in the warp backward (two
// shuffle scans, per-element shared-memory reduction). dB and dC are summed over the block's 32 channels:
// within a warp's 8 rows by a reduce-scatter over lanes (xor 16, 8, 4: one shuffle per element), across the
// 4 warps in shared memory once per tile (double-buffered: one barrier per tile), then across blocks as the
// warp kernel does (float atomics, or per-block partials in the deterministic mode). Variable B and C staged in
// shared memory per chunk as fp32 ([t][n]). Variable B/C (one group, or groups of a multiple of 32 channels)
// and d_state <= 16 only; other inputs run the warp kernel.

constexpr int kBsRows = 32;                     // channels per block
constexpr int kBsThreads = 4 * kBsRows;         // a quad per channel
constexpr int kBsT = 8;                         // time steps per tile
constexpr int kBsTiles = kSave / kBsT;          // tiles per chunk
static_assert(kSave % kBsT == 0, "tiles must divide the chunk");

template <typename T, typename WT, bool kPacked>
__global__ void __launch_bounds__(kBsThreads) scan_bwd_seq_kernel(ScanParams p) {
  __shared__ float4 Bs[kSave][4];  // the chunk's B and C as fp32, [t][n / 4]
  __shared__ float4 Cs[kSave][4];
  __shared__ float red[2][kBsThreads / 32][kBsT][2][16];  // per-warp dB/dC sums of a tile, double-buffered
  const int N = p.dstate, L = p.seqlen;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int q = threadIdx.x & 3, r = threadIdx.x >> 2;
  const int c0 = blockIdx.x * kBsRows, c = c0 + r, b = blockIdx.y;
  const bool active = c < p.dim;  // inactive rows contribute zeros but meet every shuffle and barrier
  const int64_t bd = static_cast<int64_t>(b) * p.dim + (active ? c : c0);
  const int64_t row = bd * L;
  const WT* Bp = block_bc<WT>(p.B, p.groups_B, p, b, c0);
  const WT* Cp = block_bc<WT>(p.C, p.groups_C, p, b, c0);
  float An[4], A2[4], g[4], a_next[4], dA[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = 4 * q + j;
    const bool ok = active && n < N;
    An[j] = ok ? p.A[static_cast<int64_t>(c) * N + n] : 0.f;
    A2[j] = decay_rate2(An[j]);
    g[j] = ok && p.dlast ? p.dlast[bd * N + n] : 0.f;  // the adjoint after the last step
    a_next[j] = 1.f;
    dA[j] = 0.f;
  }
  const float Dv = p.D && active ? p.D[c] : 0.f;
  float dD_l = 0.f, ddb_l = 0.f;
  float ck[kBsTiles][4];  // pass 1: the state before each tile of the chunk

  const int nchunks = (L + kSave - 1) / kSave;
  for (int chunk = nchunks - 1; chunk >= 0; --chunk) {
    const int cs = chunk * kSave, cl = min(kSave, L - cs), ntiles = (cl + kBsT - 1) / kBsT;
    __syncthreads();  // the previous chunk's readers are done with Bs/Cs
    for (int i = threadIdx.x; i < kSave * 16; i += kBsThreads) {
      const int n = i / kSave, t = i % kSave;  // threads run along t: coalesced reads
      const bool in = n < N && t < cl;
      reinterpret_cast<float*>(Bs[t])[n] = in ? to_f<WT>(Bp[static_cast<int64_t>(n) * L + cs + t]) : 0.f;
      reinterpret_cast<float*>(Cs[t])[n] = in ? to_f<WT>(Cp[static_cast<int64_t>(n) * L + cs + t]) : 0.f;
    }
    __syncthreads();

    // pass 1: checkpoints
    float h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 4 * q + j;
      h[j] = active && n < N ? p.saved_in[(bd * p.nsave + chunk) * N + n] : 0.f;
    }
    for (int tile = 0; tile < ntiles; ++tile) {
      const int t0 = cs + tile * kBsT, valid = min(kBsT, L - t0);
#pragma unroll
      for (int j = 0; j < 4; ++j) ck[tile][j] = h[j];
      float u[kBsT], dt[kBsT], dt_raw[kBsT];
      unsigned reset;
      load_step_inputs<T, kBsT>(p, row, active ? c : c0, b, t0, valid, u, dt, dt_raw, reset);
#pragma unroll
      for (int i = 0; i < kBsT; ++i) {
        const float4 bv = Bs[t0 - cs + i][q];
        const float bq[4] = {bv.x, bv.y, bv.z, bv.w};
        const float dtu = dt[i] * u[i];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float a = (reset >> i) & 1 ? 0.f : exp2f(dt[i] * A2[j]);
          h[j] = decay_step<kPacked>(a, h[j], dtu * bq[j]);
        }
      }
    }

    // pass 2: tiles from the last, each recomputed then walked backwards
    for (int tile = ntiles - 1; tile >= 0; --tile) {
      const int t0 = cs + tile * kBsT, tl0 = tile * kBsT, valid = min(kBsT, L - t0);
      float u[kBsT], dt[kBsT], dy[kBsT];
      unsigned reset;
      {
        float dt_raw[kBsT];  // not kept: softplus' derivative is recomputed from dt below
        load_step_inputs<T, kBsT>(p, row, active ? c : c0, b, t0, valid, u, dt, dt_raw, reset);
      }
      load_k<T, kBsT>(static_cast<const T*>(p.dout) + row + t0, dy, valid, p.vec_in);
      // recompute the tile: a and h per (step, state)
      float a[kBsT][4], hs[kBsT][4], h0[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) h0[j] = ck[tile][j];
#pragma unroll
      for (int i = 0; i < kBsT; ++i) {
        const float4 bv = Bs[tl0 + i][q];
        const float bq[4] = {bv.x, bv.y, bv.z, bv.w};
        const float dtu = dt[i] * u[i];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          a[i][j] = (reset >> i) & 1 ? 0.f : exp2f(dt[i] * A2[j]);
          hs[i][j] = decay_step<kPacked>(a[i][j], i > 0 ? hs[i - 1][j] : h0[j], dtu * bq[j]);
        }
      }
      if (p.z || p.out) {  // y from the recomputed states: the gate's dz = dout dsilu(z) (y + D u) stored now and
                           // dy gated; the recomputed output (y + D u) silu(z)
        float zv[kBsT], dz[kBsT], o[kBsT];
        if (p.z) {
          const T* zp = static_cast<const T*>(p.z) + z_row(p, b, active ? c : c0);
          load_k<T, kBsT>(zp + t0, zv, valid, p.vec_z);
        }
#pragma unroll
        for (int i = 0; i < kBsT; ++i) {
          const float4 cv = Cs[tl0 + i][q];
          float yt = cv.x * hs[i][0] + cv.y * hs[i][1] + cv.z * hs[i][2] + cv.w * hs[i][3];
          yt += __shfl_xor_sync(kFull, yt, 1);
          yt += __shfl_xor_sync(kFull, yt, 2);
          o[i] = p.D ? yt + Dv * u[i] : yt;
          if (p.z) {
            const float sg = sigmoid_f(zv[i]);
            dz[i] = dy[i] * sg * (1.f + zv[i] * (1.f - sg)) * (yt + Dv * u[i]);
            dy[i] *= zv[i] * sg;
            o[i] *= silu_f(zv[i]);
          }
        }
        if (active && q == 0) {
          if (p.z) store_k<T, kBsT>(static_cast<T*>(p.dz) + row + t0, dz, valid, p.vec_in);
          if (p.out) store_k<T, kBsT>(static_cast<T*>(p.out) + row + t0, o, valid, p.vec_in);
        }
      }
#pragma unroll
      for (int i = 0; i < kBsT; ++i)
        if (i >= valid || !active) dy[i] = 0.f;
      // backwards through the tile
      float du[kBsT], ddt[kBsT];
      float* rbuf = &red[tile & 1][warp][0][0][0];
#pragma unroll
      for (int i = kBsT - 1; i >= 0; --i) {
        const float4 bv = Bs[tl0 + i][q], cv = Cs[tl0 + i][q];
        const float bq[4] = {bv.x, bv.y, bv.z, bv.w}, cq[4] = {cv.x, cv.y, cv.z, cv.w};
        const float dtu = dt[i] * u[i];
        float sgB = 0.f, sgaA = 0.f, v[8];  // v: dB of the 4 states, then dC
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float alpha = i == kBsT - 1 ? a_next[j] : a[i + 1][j];
          g[j] = decay_step<kPacked>(alpha, g[j], cq[j] * dy[i]);
          const float hp = i > 0 ? hs[i - 1][j] : h0[j];
          const float ga = kPacked && a[i][j] == 0.f ? 0.f : g[j] * hp * a[i][j];  // none at a segment start (a = 0)
          dA[j] += ga * dt[i];
          sgaA += ga * An[j];
          sgB += g[j] * bq[j];
          v[j] = g[j] * dtu;
          v[4 + j] = dy[i] * hs[i][j];
        }
        // the quad's sums over the 16 states
        sgB += __shfl_xor_sync(kFull, sgB, 1);
        sgB += __shfl_xor_sync(kFull, sgB, 2);
        sgaA += __shfl_xor_sync(kFull, sgaA, 1);
        sgaA += __shfl_xor_sync(kFull, sgaA, 2);
        du[i] = dt[i] * sgB + Dv * dy[i];
        ddt[i] = u[i] * sgB + sgaA;
        // dB/dC over the warp's 8 rows (lanes of equal q, xor 4, 8, 16): reduce-scatter, 8 values -> 1
        const bool up16 = lane & 16, up8 = lane & 8;
        float w4[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // keep half: dB,dC states {0,1} (lower lanes) or {2,3} (upper)
          const float keep = up16 ? v[(k >> 1) * 4 + 2 + (k & 1)] : v[(k >> 1) * 4 + (k & 1)];
          const float send = up16 ? v[(k >> 1) * 4 + (k & 1)] : v[(k >> 1) * 4 + 2 + (k & 1)];
          w4[k] = keep + __shfl_xor_sync(kFull, send, 16);
        }
        float w2[2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {  // keep one state of the pair: dB (k = 0) and dC (k = 1)
          const float keep = up8 ? w4[2 * k + 1] : w4[2 * k];
          const float send = up8 ? w4[2 * k] : w4[2 * k + 1];
          w2[k] = keep + __shfl_xor_sync(kFull, send, 8);
        }
        w2[0] += __shfl_xor_sync(kFull, w2[0], 4);
        w2[1] += __shfl_xor_sync(kFull, w2[1], 4);
        if ((lane & 4) == 0) {  // lanes 0-3, 8-11, 16-19, 24-27 own state 4q + 2*up16 + up8
          const int n = 4 * q + (up16 ? 2 : 0) + (up8 ? 1 : 0);
          rbuf[(i * 2 + 0) * 16 + n] = w2[0];
          rbuf[(i * 2 + 1) * 16 + n] = w2[1];
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) a_next[j] = a[0][j];
      // per-step outputs of this row (lane q == 0 of the quad writes)
#pragma unroll
      for (int i = 0; i < kBsT; ++i) {
        if (i < valid) dD_l += dy[i] * u[i];
        // softplus' derivative sigmoid(x) = 1 - exp(-softplus(x)), from dt = softplus(delta + bias)
        if (p.softplus) ddt[i] *= -expm1f(-dt[i]);
        if (i < valid) ddb_l += ddt[i];
      }
      if (active && q == 0) {
        store_k<T, kBsT>(static_cast<T*>(p.du) + row + t0, du, valid, p.vec_in);
        store_k<T, kBsT>(static_cast<T*>(p.ddelta) + row + t0, ddt, valid, p.vec_in);
      }
      // the block's dB/dC of this tile: sum the 4 warps' rows, then to global memory
      __syncthreads();
      for (int e = threadIdx.x; e < kBsT * 2 * 16; e += kBsThreads) {
        const int i = e / 32, which = (e / 16) & 1, n = e % 16, t = t0 + i;
        if (i >= valid || n >= N) continue;
        float s = 0.f;
        for (int w = 0; w < kBsThreads / 32; ++w) s += red[tile & 1][w][i][which][n];
        const int groups = which == 0 ? p.groups_B : p.groups_C;
        float* dst = which == 0 ? p.dB_acc : p.dC_acc;
        if (p.deterministic) {
          dst[((static_cast<int64_t>(b) * gridDim.x + blockIdx.x) * N + n) * L + t] = s;
        } else {
          const int g_idx = c0 / (p.dim / groups);
          atomicAdd(dst + ((static_cast<int64_t>(b) * groups + g_idx) * N + n) * L + t, s);
        }
      }
    }
  }

  // per-row sums: dD, d delta_bias over the quad's copies (every quad thread summed the same steps)
  if (active && q == 0) {
    p.dD_part[bd] = dD_l;
    p.ddb_part[bd] = ddb_l;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = 4 * q + j;
    if (!active || n >= N) continue;
    p.dA_part[bd * N + n] = dA[j];
    if (p.dinit) p.dinit[bd * N + n] = a_next[j] * g[j];  // adjoint of h_{-1}
  }
}

// ---------------------------------------------------------------------------------------------------------
// host side

struct BC {
  at::Tensor t;  // possibly upcast to fp32 (when the other of B/C is fp32)
  int groups;    // 0: constant (d, n)
};

BC prep_bc(const at::Tensor& X, const char* name) {
  check_cuda(X, "selective_scan", name);
  if (X.dim() == 2) return {X, 0};
  if (X.dim() == 3) return {X, 1};
  EMMA_CHECK(X.dim() == 4, "selective_scan: ", name, " must be 2-, 3- or 4-D");
  return {X, static_cast<int>(X.size(1))};
}

// Variable B and C must share one storage dtype (the input dtype or fp32): upcast the other if they differ.
at::ScalarType unify_bc(BC& B, BC& C, at::ScalarType in_dtype) {
  const bool vb = B.groups > 0, vc = C.groups > 0;
  at::ScalarType wt = in_dtype;
  if ((vb && B.t.scalar_type() == at::kFloat) || (vc && C.t.scalar_type() == at::kFloat)) wt = at::kFloat;
  if (vb && B.t.scalar_type() != wt) B.t = B.t.to(wt);
  if (vc && C.t.scalar_type() != wt) C.t = C.t.to(wt);
  for (const BC* x : {&B, &C})
    if (x->groups > 0)
      EMMA_CHECK(x->t.scalar_type() == in_dtype || x->t.scalar_type() == at::kFloat,
                 "selective_scan: variable B/C must be in u's dtype or float32");
  return wt;
}

void fill_common(ScanParams& p, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const BC& B,
                 const BC& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                 const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                 const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& seq_idx,
                 at::ScalarType wt) {
  const char* op = "selective_scan";
  check_cuda(u, op, "u");
  check_cuda(delta, op, "delta");
  check_cuda(A, op, "A");
  check_cuda(D, op, "D");
  check_cuda_rows(z, op, "z");
  check_cuda(delta_bias, op, "delta_bias");
  check_cuda(initial_state, op, "initial_state");
  check_cuda(seq_idx, op, "seq_idx");
  EMMA_CHECK(A.scalar_type() == at::kFloat, "selective_scan: A must be float32");
  EMMA_CHECK(delta.scalar_type() == u.scalar_type(), "selective_scan: delta must have u's dtype");
  EMMA_CHECK(u.dim() == 3 && A.dim() == 2, "selective_scan: expected u (b, d, l) and A (d, n), got u ", u.sizes(),
             " and A ", A.sizes());
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.seqlen = u.size(2);
  p.dstate = A.size(1);
  {
    const int64_t b = p.batch, d = p.dim, l = p.seqlen, n = p.dstate;
    check_shape(delta, {b, d, l}, op, "delta");
    check_shape(A, {d, n}, op, "A");
    for (const auto& [x, name] : {std::pair<const BC*, const char*>{&B, "B"}, {&C, "C"}}) {
      if (x->t.dim() == 2) check_shape(x->t, {d, n}, op, name);
      else if (x->t.dim() == 3) check_shape(x->t, {b, n, l}, op, name);
      else check_shape(x->t, {b, x->groups, n, l}, op, name);
    }
    check_shape(D, {d}, op, "D");
    check_shape(z, {b, d, l}, op, "z");
    check_shape(delta_bias, {d}, op, "delta_bias");
    check_shape(initial_state, {b, d, n}, op, "initial_state");
    check_shape(seq_idx, {b, l}, op, "seq_idx");
  }
  p.nsave = (p.seqlen + kSave - 1) / kSave;
  p.groups_B = B.groups;
  p.groups_C = C.groups;
  for (const BC* x : {&B, &C})
    if (x->groups > 0) EMMA_CHECK(p.dim % x->groups == 0, "selective_scan: groups must divide dim");
  p.softplus = delta_softplus;
  const size_t es = u.element_size(), ws = at::elementSize(wt);
  p.vec_in = (p.seqlen * es) % 16 == 0 && aligned16(u.data_ptr()) && aligned16(delta.data_ptr());
  p.vec_z = z && rows_aligned16(*z);
  p.vec_bc = (p.seqlen * ws) % 16 == 0 && (B.groups == 0 || aligned16(B.t.data_ptr())) &&
             (C.groups == 0 || aligned16(C.t.data_ptr()));
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.z = z ? z->data_ptr() : nullptr;
  p.z_bs = z ? z->stride(0) : 0;
  p.z_ds = z ? z->stride(1) : 0;
  p.B = B.t.data_ptr();
  p.C = C.t.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = opt_ptr<float>(D);
  p.delta_bias = opt_ptr<float>(delta_bias);
  p.init = opt_ptr<float>(initial_state);
  p.seq_idx = opt_ptr<int>(seq_idx);
}

template <typename F>
void dispatch_scan(at::ScalarType in, at::ScalarType wt, F&& f) {
  EMMA_DISPATCH_FLOAT(in, "selective_scan", [&] {
    if (wt == at::kFloat) f(scalar_t{}, float{});
    else f(scalar_t{}, scalar_t{});
  });
}

// Which forward and backward run: EMMA_CUDA_SCAN_FWD / EMMA_CUDA_SCAN_BWD = warp (default) or seq, read per call
// (tests and the benchmark switch them in process). A seq variant applies to variable B/C in one group or in
// groups of a multiple of its block's channels, and d_state <= 16; elsewhere the warp kernel runs.
bool use_seq_variant(const ScanParams& p, const char* var, int block_channels) {
  const char* env = std::getenv(var);
  const std::string mode = env ? env : "warp";
  EMMA_CHECK(mode == "warp" || mode == "seq" || mode.empty(), var, " must be warp or seq, got '", mode, "'");
  if (mode != "seq") return false;
  auto fits = [&](int groups) {
    return groups == 1 || (groups > 1 && (p.dim / groups) % block_channels == 0);
  };
  return p.dstate <= kSeqN && fits(p.groups_B) && fits(p.groups_C);  // both variants hold 16 states
}
bool use_seq_forward(const ScanParams& p) { return use_seq_variant(p, "EMMA_CUDA_SCAN_FWD", kSeqThreads); }
bool use_seq_backward(const ScanParams& p) { return use_seq_variant(p, "EMMA_CUDA_SCAN_BWD", kBsRows); }

// Channels per backward block: the largest of 8, 4, 2, 1 that divides dim and the channels of one B/C group
// (so the in-block reduction of dB/dC never mixes groups).
int bwd_warps(int dim, int gB, int gC) {
  for (int nw : {8, 4, 2, 1}) {
    bool ok = dim % nw == 0;
    if (gB > 0) ok = ok && (dim / gB) % nw == 0;
    if (gC > 0) ok = ok && (dim / gC) % nw == 0;
    if (ok) return nw;
  }
  return 1;
}

}  // namespace

std::vector<at::Tensor> selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B_, const at::Tensor& C_,
                                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                           const std::optional<at::Tensor>& initial_state,
                                           const std::optional<at::Tensor>& seq_idx) {
  const c10::cuda::CUDAGuard guard(u.device());
  BC B = prep_bc(B_, "B"), C = prep_bc(C_, "C");
  const at::ScalarType wt = unify_bc(B, C, u.scalar_type());
  ScanParams p{};
  fill_common(p, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, wt);
  auto out = at::empty_like(u);
  auto fopts = u.options().dtype(at::kFloat);
  auto last_state = at::empty({p.batch, p.dim, p.dstate}, fopts);
  auto saved = at::empty({p.batch, p.dim, p.nsave, p.dstate}, fopts);
  p.vec_in = p.vec_in && aligned16(out.data_ptr());
  p.out = out.data_ptr();
  p.last_state = last_state.data_ptr<float>();
  p.saved = saved.data_ptr<float>();
  if (p.batch == 0 || p.dim == 0) return {out, last_state, saved};
  EMMA_CHECK(p.batch <= 65535, "selective_scan: batch must be at most 65535");
  auto stream = at::cuda::getCurrentCUDAStream();
  if (use_seq_forward(p)) {
    dim3 grid((p.dim + kSeqThreads - 1) / kSeqThreads, p.batch);
    dispatch_scan(u.scalar_type(), wt, [&](auto t_tag, auto w_tag) {
      using T = decltype(t_tag);
      using WT = decltype(w_tag);
      auto kernel = scan_fwd_seq_kernel<T, WT>;  // (a template-id's comma would split the macro argument)
      EMMA_LAUNCH(kernel, grid, kSeqThreads, 0, stream, p);
      EMMA_CUDA_LAUNCH_CHECK();
    });
    return {out, last_state, saved};
  }
  dim3 grid((p.dim + kFwdWarps - 1) / kFwdWarps, p.batch);
  const size_t smem = kFwdWarps * p.dstate * sizeof(float);
  dispatch_scan(u.scalar_type(), wt, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using WT = decltype(w_tag);
    auto kernel = p.seq_idx ? scan_fwd_kernel<T, WT, true> : scan_fwd_kernel<T, WT, false>;
    if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    EMMA_LAUNCH(kernel, grid, kFwdWarps * 32, smem, stream, p);
    EMMA_CUDA_LAUNCH_CHECK();
  });
  return {out, last_state, saved};
}

// Bytes the deterministic backward may hold in dB / dC partials at once (EMMA_DETERMINISTIC_PARTIAL_MB, default
// 4096 MB); above it the batch is processed in slices.
int64_t deterministic_partial_budget() {
  const char* env = std::getenv("EMMA_DETERMINISTIC_PARTIAL_MB");
  int64_t mb = 4096;
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    EMMA_CHECK(end != env && *end == '\0' && v >= 0, "EMMA_DETERMINISTIC_PARTIAL_MB must be a number of MB >= 0, "
               "got '", env, "'");
    mb = v;
  }
  return mb * 1024 * 1024;
}

EMMA_DECLARE_OPS  // this backend's entry points (csrc/ops.h): selective_scan_bwd is called below before its definition

// The deterministic backward over batch slices of ``rows``: per-row gradients concatenated, the gradients of the
// shared parameters (A, D, delta_bias, a constant B or C) summed over the slices in order (fp32 where the kernel
// returns fp32; a constant B / C in its own dtype, as the unsliced call returns it).
std::vector<at::Tensor> bwd_in_batch_slices(int rows, const at::Tensor& u, const at::Tensor& delta,
                                            const at::Tensor& A, const at::Tensor& B_, const at::Tensor& C_,
                                            const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                            const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                            const std::optional<at::Tensor>& initial_state,
                                            const std::optional<at::Tensor>& seq_idx, const at::Tensor& saved,
                                            const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state,
                                            bool recompute_out, bool const_B, bool const_C) {
  const int64_t Bn = u.size(0);
  auto cut = [](const std::optional<at::Tensor>& t, int64_t b0, int64_t n) -> std::optional<at::Tensor> {
    if (!t) return std::nullopt;
    return t->narrow(0, b0, n);
  };
  const at::Tensor saved_rows = saved.view({Bn, -1});  // (b, d * nsave * n): one row per sequence
  std::vector<std::vector<at::Tensor>> parts;
  for (int64_t b0 = 0; b0 < Bn; b0 += rows) {
    const int64_t n = std::min<int64_t>(rows, Bn - b0);
    parts.push_back(selective_scan_bwd(
        u.narrow(0, b0, n), delta.narrow(0, b0, n), A, const_B ? B_ : B_.narrow(0, b0, n),
        const_C ? C_ : C_.narrow(0, b0, n), D, cut(z, b0, n), delta_bias, delta_softplus, cut(initial_state, b0, n),
        cut(seq_idx, b0, n), saved_rows.narrow(0, b0, n).contiguous(), dout.narrow(0, b0, n),
        cut(dlast_state, b0, n), true, recompute_out));
  }
  // {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit, out}: which are per row, which are summed
  const bool per_row[10] = {true, true, false, !const_B, !const_C, false, true, false, true, true};
  std::vector<at::Tensor> out(10);
  for (int k = 0; k < 10; ++k) {
    if (!parts[0][k].defined()) continue;
    std::vector<at::Tensor> xs;
    for (auto& part : parts) xs.push_back(part[k]);
    if (per_row[k]) {
      out[k] = at::cat(xs, 0);
    } else {
      at::Tensor acc = xs[0].to(at::kFloat);
      for (size_t i = 1; i < xs.size(); ++i) acc = acc + xs[i].to(at::kFloat);
      out[k] = acc.to(xs[0].scalar_type());
    }
  }
  return out;
}

std::vector<at::Tensor> selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B_, const at::Tensor& C_,
                                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                           const std::optional<at::Tensor>& initial_state,
                                           const std::optional<at::Tensor>& seq_idx, const at::Tensor& saved,
                                           const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state,
                                           bool deterministic, bool recompute_out) {
  const c10::cuda::CUDAGuard guard(u.device());
  BC B = prep_bc(B_, "B"), C = prep_bc(C_, "C");
  const at::ScalarType wt = unify_bc(B, C, u.scalar_type());
  ScanParams p{};
  fill_common(p, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, wt);
  check_cuda(saved, "selective_scan_bwd", "saved");
  check_cuda(dout, "selective_scan_bwd", "dout");
  check_cuda(dlast_state, "selective_scan_bwd", "dlast_state");
  check_shape(dlast_state, {p.batch, p.dim, p.dstate}, "selective_scan_bwd", "dlast_state");
  EMMA_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(),
             "selective_scan_bwd: dout must match u's shape and dtype");
  EMMA_CHECK(saved.numel() == static_cast<int64_t>(p.batch) * p.dim * p.nsave * p.dstate &&
                 saved.scalar_type() == at::kFloat,
             "selective_scan_bwd: `saved` does not come from selective_scan_fwd on these inputs");
  const int Bn = p.batch, Dn = p.dim, N = p.dstate, L = p.seqlen;
  auto fopts = u.options().dtype(at::kFloat);
  auto du = at::empty_like(u), ddelta = at::empty_like(delta);
  at::Tensor dz, out;
  if (z) dz = at::empty(z->sizes(), z->options());  // contiguous, whatever z's strides
  if (recompute_out) out = at::empty_like(u);
  auto dA_part = at::empty({Bn, Dn, N}, fopts);
  auto dD_part = at::empty({Bn, Dn}, fopts), ddb_part = at::empty({Bn, Dn}, fopts);
  at::Tensor dinit;
  if (initial_state) dinit = at::empty({Bn, Dn, N}, fopts);
  const bool seq_bwd = use_seq_backward(p);
  const int nw = bwd_warps(Dn, B.groups, C.groups);
  const int nblk = seq_bwd ? (Dn + kBsRows - 1) / kBsRows : Dn / nw;  // blocks along dim (per-block partials)
  if (deterministic && Bn > 1 && (B.groups > 0 || C.groups > 0)) {
    // The per-block partials of variable dB / dC are (b, nblk, n, l) fp32 each: 43 GB at b 8, d 5120, n 128,
    // l 8192. Beyond the budget the batch goes through in slices (every slice deterministic, summed in order).
    const int64_t per_row = int64_t(nblk) * N * L * int64_t(sizeof(float)) * ((B.groups > 0) + (C.groups > 0));
    const int64_t budget = deterministic_partial_budget();
    if (per_row * Bn > budget) {
      const int rows = static_cast<int>(std::max<int64_t>(1, budget / per_row));
      return bwd_in_batch_slices(rows, u, delta, A, B_, C_, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                                 saved, dout, dlast_state, recompute_out, B.groups == 0, C.groups == 0);
    }
  }
  auto make_bc = [&](const BC& X, at::Tensor& const_part) -> at::Tensor {
    if (X.groups == 0) { const_part = at::empty({Bn, Dn, N}, fopts); return at::Tensor(); }
    if (deterministic) return at::empty({Bn, nblk, N, L}, fopts);
    return at::zeros({Bn, X.groups, N, L}, fopts);
  };
  at::Tensor dBc_part, dCc_part;
  at::Tensor dB_acc = make_bc(B, dBc_part), dC_acc = make_bc(C, dCc_part);

  p.dout = dout.data_ptr();
  p.dlast = opt_ptr<float>(dlast_state);
  p.saved_in = saved.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = z ? dz.data_ptr() : nullptr;
  p.out = recompute_out ? out.data_ptr() : nullptr;
  p.vec_in = p.vec_in && aligned16(dout.data_ptr()) && aligned16(du.data_ptr()) && aligned16(ddelta.data_ptr()) &&
             (!z || aligned16(dz.data_ptr())) && (!recompute_out || aligned16(out.data_ptr()));
  p.dA_part = dA_part.data_ptr<float>();
  p.dD_part = dD_part.data_ptr<float>();
  p.ddb_part = ddb_part.data_ptr<float>();
  p.dinit = initial_state ? dinit.data_ptr<float>() : nullptr;
  p.dBc_part = B.groups == 0 ? dBc_part.data_ptr<float>() : nullptr;
  p.dCc_part = C.groups == 0 ? dCc_part.data_ptr<float>() : nullptr;
  p.dB_acc = B.groups > 0 ? dB_acc.data_ptr<float>() : nullptr;
  p.dC_acc = C.groups > 0 ? dC_acc.data_ptr<float>() : nullptr;
  p.deterministic = deterministic;

  if (Bn > 0 && Dn > 0 && seq_bwd) {
    EMMA_CHECK(Bn <= 65535, "selective_scan: batch must be at most 65535");
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_scan(u.scalar_type(), wt, [&](auto t_tag, auto w_tag) {
      using T = decltype(t_tag);
      using WT = decltype(w_tag);
      auto kernel = p.seq_idx ? scan_bwd_seq_kernel<T, WT, true> : scan_bwd_seq_kernel<T, WT, false>;
      EMMA_LAUNCH(kernel, dim3(nblk, Bn), kBsThreads, 0, stream, p);
      EMMA_CUDA_LAUNCH_CHECK();
    });
  } else if (Bn > 0 && Dn > 0) {
    EMMA_CHECK(Bn <= 65535, "selective_scan: batch must be at most 65535");
    dim3 grid(nblk, Bn);
    const bool var = B.groups > 0 || C.groups > 0;
    const size_t smem = (5 * nw * N + (var ? 2 * nw * (32 * kBwdItems + 32) : 0)) * sizeof(float);
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_scan(u.scalar_type(), wt, [&](auto t_tag, auto w_tag) {
      using T = decltype(t_tag);
      using WT = decltype(w_tag);
      auto kernel = p.seq_idx ? scan_bwd_kernel<T, WT, true> : scan_bwd_kernel<T, WT, false>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      EMMA_LAUNCH(kernel, grid, nw * 32, smem, stream, p);
      EMMA_CUDA_LAUNCH_CHECK();
    });
  }

  // fixed-order reductions of the partials
  auto dA = dA_part.sum(0);
  at::Tensor dD, ddb;
  if (D) dD = dD_part.sum(0);
  if (delta_bias) ddb = ddb_part.sum(0);
  auto finish_bc = [&](const BC& X, const at::Tensor& orig, const at::Tensor& acc, const at::Tensor& const_part) {
    at::Tensor r;
    if (X.groups == 0) {
      r = const_part.sum(0);  // (d, n)
    } else {
      r = deterministic ? acc.view({Bn, X.groups, nblk / X.groups, N, L}).sum(2) : acc;  // (b, g, n, l)
      if (orig.dim() == 3) r = r.view({Bn, N, L});
    }
    return r.to(orig.scalar_type());
  };
  auto dB = finish_bc(B, B_, dB_acc, dBc_part);
  auto dC = finish_bc(C, C_, dC_acc, dCc_part);
  return {du, ddelta, dA, dB, dC, dD, dz, ddb, dinit, out};
}

}  // namespace cuda
}  // namespace emma
