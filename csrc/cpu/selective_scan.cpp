// CPU selective scan (Mamba's S6, Gu & Dao 2023, Algorithm 2): forward, backward and the one-step decode.
//
//   delta_t = softplus(delta_t + delta_bias)   h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
//   y_t = <C_t, h_t> + D u_t                   out_t = y_t silu(z_t)
// with h_{-1} = initial_state and h reset to 0 where seq_idx changes (packed sequences).
//
// The chunked algorithm of DESIGN.md, the one the CUDA kernel uses:
//  * forward: time in chunks of kChunk steps; only the state entering each chunk is kept (`saved`,
//    fp32 (b, d, n_chunks, n)), never the (b, d, l, n) states;
//  * backward: chunks in reverse; each chunk's states h_t and decays exp(delta_t A) are recomputed from the
//    saved boundary into a per-thread (kChunk x n) buffer, then a reverse sweep carries dL/dh back through
//    the chunk. y (needed for dz, and returned gated as `out` with recompute_out) comes from the same
//    recompute.
// Work is split into tasks (batch row, block of channels inside one B/C group; see Plan) run by
// at::parallel_for; the channels of a task share the chunk of B/C, transposed once to (time, state) so the
// inner loops (scan_kernels.h) run over 16 state lanes with SIMD (AVX-512, AVX2 or portable scalar, chosen
// at run time). Per thread the working memory is a few (kChunk x n) buffers, whatever the sequence length.
// Reductions over channels (variable dB/dC) and over batch/time (dA, dD, ddelta_bias, constant dB/dC) go to
// per-task / per-batch partial buffers summed in a fixed order afterwards, so gradients are bitwise
// reproducible whatever the thread count; the largest scratch is <= 16 (n, l) partials per batch row and
// B/C group, never (b, d, l, n)-sized.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <ATen/Parallel.h>

#include "../ops.h"
#include "common.h"
#include "scan_kernels.h"

namespace emma {
namespace cpu {

namespace {

constexpr int64_t kChunk = 256;         // time steps per chunk (one saved state per chunk)
constexpr int64_t kChannelBlock = 32;   // channels per task, at least (see Plan)
constexpr int64_t kMaxBwdTasksPerRow = 16;  // backward: at most this many channel blocks per batch row and group
constexpr int64_t kL = scan::kLanes;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// Layout of B or C: constant (d, n) fp32; variable (b, n, l), i.e. one group; grouped (b, g, n, l).
struct BCInfo {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  bool variable = false;
  int64_t groups = 1;
};

struct ScanShape {
  int64_t b, d, l, n;
  BCInfo Bi, Ci;
};

BCInfo check_bc(const char* op, const char* name, const at::Tensor& X, int64_t b, int64_t d, int64_t l,
                int64_t n, at::ScalarType in_dtype) {
  EMMA_CHECK(X.defined(), op, name, " is an undefined tensor");
  BCInfo info;
  if (X.dim() == 2) {
    check_arg(op, name, X, {d, n}, {at::kFloat});
  } else if (X.dim() == 3) {
    check_arg(op, name, X, {b, n, l}, {in_dtype, at::kFloat});
    info.variable = true;
  } else if (X.dim() == 4) {
    const int64_t g = X.size(1);
    EMMA_CHECK(g >= 1 && d % g == 0, op, name, " has ", g, " groups, which must divide dim=", d);
    check_arg(op, name, X, {b, g, n, l}, {in_dtype, at::kFloat});
    info.variable = true;
    info.groups = g;
  } else {
    EMMA_CHECK(false, op, name, " must be (dim, dstate), (batch, dstate, seqlen) or (batch, groups, dstate, "
               "seqlen), got ", shape_str(X.sizes()));
  }
  info.data = X.data_ptr();
  info.dtype = X.scalar_type();
  return info;
}

ScanShape check_scan_inputs(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                            const std::optional<at::Tensor>& initial_state,
                            const std::optional<at::Tensor>& seq_idx) {
  EMMA_CHECK(u.defined() && u.dim() == 3, op, "u must be a 3-D tensor (batch, dim, seqlen), got ",
             u.defined() ? shape_str(u.sizes()) : std::string("an undefined tensor"));
  EMMA_CHECK(is_float_dtype(u.scalar_type()), op, "u must be float32, float16 or bfloat16, got ",
             u.scalar_type());
  const int64_t b = u.size(0), d = u.size(1), l = u.size(2);
  EMMA_CHECK(l >= 1, op, "seqlen (u.shape[2]) must be at least 1");
  check_arg(op, "u", u, {b, d, l}, {u.scalar_type()});
  check_arg(op, "delta", delta, {b, d, l}, {u.scalar_type()});
  EMMA_CHECK(A.defined() && A.dim() == 2 && A.size(0) == d, op, "A must have shape (dim=", d, ", dstate), got ",
             A.defined() ? shape_str(A.sizes()) : std::string("an undefined tensor"));
  const int64_t n = A.size(1);
  EMMA_CHECK(n >= 1, op, "dstate (A.shape[1]) must be at least 1");
  check_arg(op, "A", A, {d, n}, {at::kFloat});
  ScanShape s{b, d, l, n, check_bc(op, "B", B, b, d, l, n, u.scalar_type()),
              check_bc(op, "C", C, b, d, l, n, u.scalar_type())};
  check_opt_arg(op, "D", D, {d}, {at::kFloat});
  check_opt_rows_arg(op, "z", z, {b, d, l}, {u.scalar_type()});  // its own batch/channel strides: see ScanInputs
  check_opt_arg(op, "delta_bias", delta_bias, {d}, {at::kFloat});
  check_opt_arg(op, "initial_state", initial_state, {b, d, n}, {at::kFloat});
  check_opt_arg(op, "seq_idx", seq_idx, {b, l}, {at::kInt});
  return s;
}

// How the (batch, channel) grid is cut into tasks. Channels are first split into `gtask` groups, the
// finest grouping of B and C (lcm of their group counts, which divides d), so a task reads one group of each;
// each group is then cut into `nsub` blocks of `cb` channels (the last one shorter). Blocks have at least
// kChannelBlock channels. In the backward they are made larger so a batch row has at most
// ~kMaxBwdTasksPerRow of them: each block keeps its own (n, l) partial of a variable dB/dC, so fewer blocks
// means less scratch and a cheaper final reduction. The plan depends on the shapes only, never on the
// thread count, so results are bitwise identical on any machine with the same instruction set.
struct Plan {
  int64_t b, d, l, n, nlb, np, nchunks;
  int64_t gtask, cpg, cb, nsub, ntasks;

  Plan(const ScanShape& s, int64_t max_tasks_per_row) : b(s.b), d(s.d), l(s.l), n(s.n) {
    nlb = (n + kL - 1) / kL;
    np = nlb * kL;
    nchunks = (l + kChunk - 1) / kChunk;
    gtask = std::lcm(s.Bi.groups, s.Ci.groups);
    cpg = d / gtask;
    const int64_t max_sub = std::max<int64_t>(1, (max_tasks_per_row + gtask - 1) / gtask);
    cb = std::max(kChannelBlock, (cpg + max_sub - 1) / max_sub);
    nsub = (cpg + cb - 1) / cb;
    ntasks = b * gtask * nsub;
  }
  struct Task {
    int64_t bi, gt, j, c0, c1;
  };
  Task task(int64_t t) const {
    Task k;
    k.bi = t / (gtask * nsub);
    const int64_t r = t % (gtask * nsub);
    k.gt = r / nsub;
    k.j = r % nsub;
    k.c0 = k.gt * cpg + k.j * cb;
    k.c1 = std::min(k.c0 + cb, (k.gt + 1) * cpg);
    return k;
  }
  // Tasks that write partial sums of one group of a variable B/C with `groups` groups, and this task's slot.
  int64_t slots(int64_t groups) const { return (gtask / groups) * nsub; }
  int64_t slot(const Task& k, int64_t groups) const { return (k.gt % (gtask / groups)) * nsub + k.j; }
  int64_t group_of(const Task& k, int64_t groups) const { return k.c0 / (d / groups); }
};

// Per-thread working memory of one task: the task's chunk of B/C in (lane block, time, lane) layout, and the
// per-channel fp32 rows of one chunk.
struct Work {
  std::vector<float> Bt, Ct;        // [nlb][kChunk][kL] (variable B/C)
  std::vector<float> Bc, Cc, Ap;    // [cb][np] (constant B/C, A), zero-padded lanes
  std::vector<float> h;             // [cb][np] running state (forward) / carry dL/dh (backward)
  std::vector<float> uf, xs, dt, dtu, y, zf, tmp;  // [kChunk]
  std::vector<float> decay;         // [kChunk] 2^(dt_t A log2 e) of a channel whose lanes share one A
  std::vector<uint8_t> reset;       // [kChunk]
  std::vector<uint8_t> uniform;     // [cb] the channel's A is the same in every state lane (Mamba-2's heads)

  Work(const Plan& p, const ScanShape& s)
      : Bt(s.Bi.variable ? p.nlb * kChunk * kL : 0, 0.f),
        Ct(s.Ci.variable ? p.nlb * kChunk * kL : 0, 0.f),
        Bc(s.Bi.variable ? 0 : p.cb * p.np, 0.f),
        Cc(s.Ci.variable ? 0 : p.cb * p.np, 0.f),
        Ap(p.cb * p.np, 0.f),
        h(p.cb * p.np, 0.f),
        uf(kChunk), xs(kChunk), dt(kChunk), dtu(kChunk), y(kChunk), zf(kChunk), tmp(kChunk), decay(kChunk),
        reset(kChunk, 0), uniform(p.cb, 0) {}
};

// Everything a task reads, as raw pointers.
struct ScanInputs {
  const void* u;
  const void* delta;
  at::ScalarType dtype;
  const float* A;
  const float* D;
  const void* z;
  int64_t z_sb, z_sd;  // z's batch and channel strides (a view of the mixer's in_proj output: not copied)
  const float* delta_bias;
  bool softplus;
  const float* initial_state;
  const int32_t* seq_idx;
};

// Task setup: padded A log2(e) (what the kernels take), whether each channel's A is one value repeated over its
// lanes, and constant B/C rows of the task's channels.
void load_task_constants(const Plan& p, const ScanShape& s, const ScanInputs& in, const Plan::Task& k,
                         Work& w) {
  for (int64_t c = k.c0; c < k.c1; ++c) {
    const int64_t ci = c - k.c0;
    bool uniform = true;
    for (int64_t kk = 0; kk < p.n; ++kk) {
      w.Ap[ci * p.np + kk] = in.A[c * p.n + kk] * kLog2e;
      uniform = uniform && in.A[c * p.n + kk] == in.A[c * p.n];
    }
    w.uniform[ci] = uniform ? 1 : 0;
    if (!s.Bi.variable) load_f32(s.Bi.data, s.Bi.dtype, c * p.n, p.n, &w.Bc[ci * p.np]);
    if (!s.Ci.variable) load_f32(s.Ci.data, s.Ci.dtype, c * p.n, p.n, &w.Cc[ci * p.np]);
  }
}

// The chunk [ts, ts+len) of the task's B/C group, transposed from (n, l) rows to (lane block, time, lane).
void load_bc_chunk(const Plan& p, const BCInfo& X, const Plan::Task& k, int64_t ts, int64_t len,
                   std::vector<float>& dst, std::vector<float>& tmp) {
  const int64_t g = p.group_of(k, X.groups);
  for (int64_t kk = 0; kk < p.n; ++kk) {
    load_f32(X.data, X.dtype, ((k.bi * X.groups + g) * p.n + kk) * p.l + ts, len, tmp.data());
    float* col = &dst[(kk / kL) * kChunk * kL + (kk % kL)];
    for (int64_t t = 0; t < len; ++t) col[t * kL] = tmp[t];
  }
}

void load_resets(const Plan& p, const ScanInputs& in, int64_t bi, int64_t ts, int64_t len, Work& w) {
  if (in.seq_idx == nullptr) return;
  const int32_t* sq = in.seq_idx + bi * p.l;
  for (int64_t t = 0; t < len; ++t) {
    const int64_t g = ts + t;
    w.reset[t] = (g > 0 && sq[g] != sq[g - 1]) ? 1 : 0;
  }
}

// u, delta + bias (xs), dt = softplus(xs) or xs, and dt*u of channel c over the chunk.
void load_channel_chunk(const Plan& p, const ScanInputs& in, const scan::ScanKernels& K, int64_t bi, int64_t c,
                        int64_t ts, int64_t len, Work& w) {
  const int64_t off = (bi * p.d + c) * p.l + ts;
  float* __restrict uf = w.uf.data();
  float* __restrict xs = w.xs.data();
  float* __restrict dt = w.dt.data();
  float* __restrict dtu = w.dtu.data();
  load_f32(in.u, in.dtype, off, len, uf);
  load_f32(in.delta, in.dtype, off, len, xs);
  const float bias = in.delta_bias ? in.delta_bias[c] : 0.f;
  for (int64_t t = 0; t < len; ++t) xs[t] += bias;
  std::memcpy(dt, xs, sizeof(float) * len);
  if (in.softplus) K.softplus_inplace(dt, static_cast<int>(len));
  for (int64_t t = 0; t < len; ++t) dtu[t] = dt[t] * uf[t];
}

// A channel whose lanes share one A (Mamba-2): its per-step decay, once for all its lanes (the kernels would
// otherwise compute the same exponential in each of the n lanes: 8 lane blocks at Mamba-2's n = 128).
void load_channel_decay(const Plan& p, const scan::ScanKernels& K, int64_t ci, int64_t len, Work& w) {
  if (w.uniform[ci]) K.exp2_scaled(w.dt.data(), w.Ap[ci * p.np], w.decay.data(), static_cast<int>(len));
}

// z's offset of (batch row bi, channel c, step t)
inline int64_t z_off(const ScanInputs& in, int64_t bi, int64_t c, int64_t t) { return bi * in.z_sb + c * in.z_sd + t; }

// Fetch the next channel's rows of this chunk while the kernels work on the current one.
void prefetch_next(const Plan& p, const ScanInputs& in, const Plan::Task& k, int64_t c, int64_t ts, int64_t len,
                   std::initializer_list<const void*> read_also, std::initializer_list<void*> written) {
  if (c + 1 >= k.c1) return;
  const int64_t off = (k.bi * p.d + c + 1) * p.l + ts;
  prefetch_f32(in.u, in.dtype, off, len, false);
  prefetch_f32(in.delta, in.dtype, off, len, false);
  if (in.z) prefetch_f32(in.z, in.dtype, z_off(in, k.bi, c + 1, ts), len, false);
  for (const void* r : read_also)
    if (r) prefetch_f32(r, in.dtype, off, len, false);
  for (void* wr : written)
    if (wr) prefetch_f32(wr, in.dtype, off, len, true);
}

// y_t = D u_t before the kernels add <C_t, h_t>
void init_y(const ScanInputs& in, int64_t c, int64_t len, Work& w) {
  const float Dc = in.D ? in.D[c] : 0.f;
  float* __restrict y = w.y.data();
  const float* __restrict uf = w.uf.data();
  for (int64_t t = 0; t < len; ++t) y[t] = Dc * uf[t];
}

// The kernels' arguments for lane block lb of channel ci (and, with nblocks > 1, the blocks after it: a channel
// with a shared decay runs all its blocks in one call).
scan::FwdArgs chunk_args(const Plan& p, const ScanShape& s, Work& w, int64_t ci, int64_t lb, int64_t len,
                         bool with_resets, int64_t nblocks = 1) {
  scan::FwdArgs a;
  a.len = static_cast<int>(len);
  a.dt = w.dt.data();
  a.dtu = w.dtu.data();
  a.A = &w.Ap[ci * p.np + lb * kL];
  if (s.Bi.variable) {
    a.B = &w.Bt[lb * kChunk * kL];
    a.bstride = kL;
  } else {
    a.B = &w.Bc[ci * p.np + lb * kL];
  }
  if (s.Ci.variable) {
    a.C = &w.Ct[lb * kChunk * kL];
    a.cstride = kL;
  } else {
    a.C = &w.Cc[ci * p.np + lb * kL];
  }
  a.reset = with_resets ? w.reset.data() : nullptr;
  a.decay = w.uniform[ci] ? w.decay.data() : nullptr;  // load_channel_decay filled it for this channel
  a.nblocks = static_cast<int>(nblocks);
  a.bblock = s.Bi.variable ? kChunk * kL : kL;  // the (lane block, time, lane) chunk, or the padded constant row
  a.cblock = s.Ci.variable ? kChunk * kL : kL;
  return a;
}

// Lane blocks per forward kernel call for channel ci: all of them where one decay is shared, else one. (The
// backward's recompute keeps one per call: scan_kernels_impl.inc's fwd_chunk_t.)
int64_t blocks_per_call(const Plan& p, const Work& w, int64_t ci) { return w.uniform[ci] ? p.nlb : 1; }

ScanInputs make_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                       const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                       const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& seq_idx) {
  return ScanInputs{u.data_ptr(), delta.data_ptr(), u.scalar_type(), A.data_ptr<float>(),
                    present(D) ? D->data_ptr<float>() : nullptr,
                    present(z) ? z->data_ptr() : nullptr,
                    present(z) ? z->stride(0) : 0, present(z) ? z->stride(1) : 0,
                    present(delta_bias) ? delta_bias->data_ptr<float>() : nullptr,
                    delta_softplus,
                    present(initial_state) ? initial_state->data_ptr<float>() : nullptr,
                    present(seq_idx) ? seq_idx->data_ptr<int32_t>() : nullptr};
}

// Fixed-order sum over the middle axis: src (outer, m, inner) -> dst (outer, inner).
void sum_middle(const float* src, float* dst, int64_t outer, int64_t m, int64_t inner) {
  at::parallel_for(0, outer, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      float* out = dst + o * inner;
      const float* in = src + o * m * inner;
      if (m == 0) {  // empty batch: the sum is zero
        std::fill(out, out + inner, 0.f);
        continue;
      }
      std::memcpy(out, in, sizeof(float) * inner);
      for (int64_t j = 1; j < m; ++j)
        for (int64_t i = 0; i < inner; ++i) out[i] += in[j * inner + i];
    }
  });
}

// Sum of a (b, d, np) per-batch partial over the batch, unpadded: -> (d, n).
at::Tensor reduce_batch(const at::Tensor& part, int64_t b, int64_t d, int64_t n, int64_t np) {
  auto outp = at::empty({d, np}, part.options());
  // (b, d*np) -> (d*np): outer 1, middle b
  sum_middle(part.data_ptr<float>(), outp.data_ptr<float>(), 1, b, d * np);
  return np == n ? outp : outp.narrow(1, 0, n).contiguous();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------

std::vector<at::Tensor> selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                           const std::optional<at::Tensor>& initial_state,
                                           const std::optional<at::Tensor>& seq_idx) {
  const char* op = "selective_scan_fwd";
  const ScanShape s = check_scan_inputs(op, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx);
  const Plan p(s, /*max_tasks_per_row=*/s.d);  // no reductions in the forward: blocks of kChannelBlock
  const ScanInputs in = make_inputs(u, delta, A, D, z, delta_bias, delta_softplus, initial_state, seq_idx);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(u);
  at::Tensor last_state = at::empty({p.b, p.d, p.n}, f32);
  at::Tensor saved = at::empty({p.b, p.d, p.nchunks, p.n}, f32);  // state entering each chunk
  void* outp = out.data_ptr();
  float* lastp = last_state.data_ptr<float>();
  float* savedp = saved.data_ptr<float>();
  const scan::ScanKernels& K = scan::select_scan_kernels();

  at::parallel_for(0, p.ntasks, 1, [&](int64_t t0, int64_t t1) {
    DenormalGuard denormals;
    Work w(p, s);
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Plan::Task k = p.task(ti);
      load_task_constants(p, s, in, k, w);
      for (int64_t c = k.c0; c < k.c1; ++c) {
        float* h = &w.h[(c - k.c0) * p.np];
        std::fill(h, h + p.np, 0.f);
        if (in.initial_state) std::memcpy(h, in.initial_state + (k.bi * p.d + c) * p.n, sizeof(float) * p.n);
      }
      for (int64_t ch = 0; ch < p.nchunks; ++ch) {
        const int64_t ts = ch * kChunk, len = std::min(kChunk, p.l - ts);
        if (s.Bi.variable) load_bc_chunk(p, s.Bi, k, ts, len, w.Bt, w.tmp);
        if (s.Ci.variable) load_bc_chunk(p, s.Ci, k, ts, len, w.Ct, w.tmp);
        load_resets(p, in, k.bi, ts, len, w);
        for (int64_t c = k.c0; c < k.c1; ++c) {
          const int64_t ci = c - k.c0, row = k.bi * p.d + c;
          float* h = &w.h[ci * p.np];
          std::memcpy(savedp + (row * p.nchunks + ch) * p.n, h, sizeof(float) * p.n);
          prefetch_next(p, in, k, c, ts, len, {}, {outp});
          load_channel_chunk(p, in, K, k.bi, c, ts, len, w);
          load_channel_decay(p, K, ci, len, w);
          init_y(in, c, len, w);
          const int64_t nb = blocks_per_call(p, w, ci);
          for (int64_t lb = 0; lb < p.nlb; lb += nb) {
            scan::FwdArgs a = chunk_args(p, s, w, ci, lb, len, in.seq_idx != nullptr, nb);
            a.h = h + lb * kL;
            a.y = w.y.data();
            K.fwd(a);
          }
          if (in.z) {
            load_f32(in.z, in.dtype, z_off(in, k.bi, c, ts), len, w.zf.data());
            K.sigmoid(w.zf.data(), w.tmp.data(), static_cast<int>(len));
            for (int64_t t = 0; t < len; ++t) w.y[t] *= w.zf[t] * w.tmp[t];
          }
          store_f32(outp, in.dtype, row * p.l + ts, len, w.y.data());
        }
      }
      for (int64_t c = k.c0; c < k.c1; ++c)
        std::memcpy(lastp + (k.bi * p.d + c) * p.n, &w.h[(c - k.c0) * p.np], sizeof(float) * p.n);
    }
  });
  return {out, last_state, saved};
}

// ---------------------------------------------------------------------------------------------------------

std::vector<at::Tensor> selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& delta_bias, bool delta_softplus,
                                           const std::optional<at::Tensor>& initial_state,
                                           const std::optional<at::Tensor>& seq_idx, const at::Tensor& saved,
                                           const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state,
                                           bool deterministic, bool recompute_out) {
  // Always deterministic: every reduction has a fixed order, so `deterministic` changes nothing here.
  (void)deterministic;
  const char* op = "selective_scan_bwd";
  const ScanShape s = check_scan_inputs(op, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx);
  const Plan p(s, kMaxBwdTasksPerRow);
  check_arg(op, "saved", saved, {p.b, p.d, p.nchunks, p.n}, {at::kFloat});
  check_arg(op, "dout", dout, {p.b, p.d, p.l}, {u.scalar_type()});
  check_opt_arg(op, "dlast_state", dlast_state, {p.b, p.d, p.n}, {at::kFloat});
  const ScanInputs in = make_inputs(u, delta, A, D, z, delta_bias, delta_softplus, initial_state, seq_idx);
  const auto f32 = u.options().dtype(at::kFloat);
  const float* savedp = saved.data_ptr<float>();
  const void* doutp = dout.data_ptr();
  const float* dlastp = present(dlast_state) ? dlast_state->data_ptr<float>() : nullptr;

  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(delta);
  at::Tensor dz = in.z ? at::empty(z->sizes(), z->options()) : at::Tensor();  // contiguous, whatever z's strides
  at::Tensor out = recompute_out ? at::empty_like(u) : at::Tensor();  // the forward's output, recomputed
  at::Tensor dinit = in.initial_state ? at::empty({p.b, p.d, p.n}, f32) : at::Tensor();
  // per-batch partial sums, reduced over the batch in order at the end
  at::Tensor dA_part = at::zeros({p.b, p.d, p.np}, f32);
  at::Tensor dD_part = in.D ? at::zeros({p.b, p.d}, f32) : at::Tensor();
  at::Tensor dbias_part = in.delta_bias ? at::zeros({p.b, p.d}, f32) : at::Tensor();
  // dB/dC: constant -> per-batch partial (b, d, np); variable -> per-task partial (b, g, slots, n, l)
  auto make_bc_part = [&](const BCInfo& X) {
    return X.variable ? at::empty({p.b, X.groups, p.slots(X.groups), p.n, p.l}, f32)
                      : at::zeros({p.b, p.d, p.np}, f32);
  };
  at::Tensor dB_part = make_bc_part(s.Bi), dC_part = make_bc_part(s.Ci);
  float* dApp = dA_part.data_ptr<float>();
  float* dDpp = in.D ? dD_part.data_ptr<float>() : nullptr;
  float* dbpp = in.delta_bias ? dbias_part.data_ptr<float>() : nullptr;
  float* dBpp = dB_part.data_ptr<float>();
  float* dCpp = dC_part.data_ptr<float>();
  void* dup = du.data_ptr();
  void* ddp = ddelta.data_ptr();
  void* dzp = in.z ? dz.data_ptr() : nullptr;
  void* outp = recompute_out ? out.data_ptr() : nullptr;
  const bool need_y = in.z || outp;  // y_t: for dz, and for out
  float* dinitp = in.initial_state ? dinit.data_ptr<float>() : nullptr;
  const scan::ScanKernels& K = scan::select_scan_kernels();

  at::parallel_for(0, p.ntasks, 1, [&](int64_t t0, int64_t t1) {
    DenormalGuard denormals;
    Work w(p, s);  // w.h holds the carry dL/dh per channel
    std::vector<float> hbuf(p.nlb * kChunk * kL), abuf(p.nlb * kChunk * kL), hs(p.np, 0.f), hrun(p.np);
    std::vector<float> dBt(s.Bi.variable ? p.nlb * kChunk * kL : 0), dCt(s.Ci.variable ? p.nlb * kChunk * kL : 0);
    std::vector<float> df(kChunk), dy(kChunk), sgb(kChunk), saq(kChunk), dub(kChunk), ddb(kChunk), dzb(kChunk);
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Plan::Task k = p.task(ti);
      load_task_constants(p, s, in, k, w);
      for (int64_t c = k.c0; c < k.c1; ++c) {
        float* carry = &w.h[(c - k.c0) * p.np];
        std::fill(carry, carry + p.np, 0.f);
        if (dlastp) std::memcpy(carry, dlastp + (k.bi * p.d + c) * p.n, sizeof(float) * p.n);
      }
      for (int64_t ch = p.nchunks - 1; ch >= 0; --ch) {
        const int64_t ts = ch * kChunk, len = std::min(kChunk, p.l - ts);
        if (s.Bi.variable) {
          load_bc_chunk(p, s.Bi, k, ts, len, w.Bt, w.tmp);
          std::fill(dBt.begin(), dBt.end(), 0.f);
        }
        if (s.Ci.variable) {
          load_bc_chunk(p, s.Ci, k, ts, len, w.Ct, w.tmp);
          std::fill(dCt.begin(), dCt.end(), 0.f);
        }
        load_resets(p, in, k.bi, ts, len, w);
        for (int64_t c = k.c0; c < k.c1; ++c) {
          const int64_t ci = c - k.c0, row = k.bi * p.d + c;
          load_channel_chunk(p, in, K, k.bi, c, ts, len, w);
          load_channel_decay(p, K, ci, len, w);
          load_f32(doutp, in.dtype, row * p.l + ts, len, df.data());
          prefetch_next(p, in, k, c, ts, len, {doutp}, {dup, ddp, dzp, outp});
          std::memcpy(hs.data(), savedp + (row * p.nchunks + ch) * p.n, sizeof(float) * p.n);
          // 1. recompute h_t, exp(dt_t A) (and y_t if dz or out needs it) from the saved chunk-entry state
          if (need_y) init_y(in, c, len, w);
          std::copy(hs.begin(), hs.end(), hrun.begin());
          for (int64_t lb = 0; lb < p.nlb; ++lb) {  // one block per call (blocks_per_call)
            scan::FwdArgs a = chunk_args(p, s, w, ci, lb, len, in.seq_idx != nullptr);
            a.h = &hrun[lb * kL];
            a.y = need_y ? w.y.data() : nullptr;
            a.hbuf = &hbuf[lb * kChunk * kL];
            a.abuf = &abuf[lb * kChunk * kL];
            K.fwd(a);
          }
          // 2. dL/dy, dz
          const float Dc = in.D ? in.D[c] : 0.f;
          if (in.z) {
            load_f32(in.z, in.dtype, z_off(in, k.bi, c, ts), len, w.zf.data());
            K.sigmoid(w.zf.data(), w.tmp.data(), static_cast<int>(len));
            for (int64_t t = 0; t < len; ++t) {
              const float zt = w.zf[t], sg = w.tmp[t], yt = w.y[t];
              dy[t] = df[t] * zt * sg;
              dzb[t] = df[t] * yt * sg * (1.f + zt * (1.f - sg));
              w.y[t] = yt * (zt * sg);  // the gated output (out), rounded as the forward rounds it
            }
            store_f32(dzp, in.dtype, row * p.l + ts, len, dzb.data());
          } else {
            std::copy(df.begin(), df.begin() + len, dy.begin());
          }
          if (outp) store_f32(outp, in.dtype, row * p.l + ts, len, w.y.data());
          // 3. reverse sweep through the chunk
          std::fill(sgb.begin(), sgb.begin() + len, 0.f);
          std::fill(saq.begin(), saq.begin() + len, 0.f);
          for (int64_t lb = 0; lb < p.nlb; ++lb) {
            const scan::FwdArgs f = chunk_args(p, s, w, ci, lb, len, in.seq_idx != nullptr);
            scan::BwdArgs a;
            a.len = f.len;
            a.dt = f.dt;
            a.dtu = f.dtu;
            a.dy = dy.data();
            a.A = f.A;
            a.B = f.B;
            a.bstride = f.bstride;
            a.C = f.C;
            a.cstride = f.cstride;
            a.reset = f.reset;
            a.hstart = &hs[lb * kL];
            a.hbuf = &hbuf[lb * kChunk * kL];
            a.abuf = &abuf[lb * kChunk * kL];
            a.carry = &w.h[ci * p.np + lb * kL];
            a.sgb = sgb.data();
            a.saq = saq.data();
            a.dA = dApp + row * p.np + lb * kL;
            a.var_b = s.Bi.variable;
            a.var_c = s.Ci.variable;
            a.dB = s.Bi.variable ? &dBt[lb * kChunk * kL] : dBpp + row * p.np + lb * kL;
            a.dC = s.Ci.variable ? &dCt[lb * kChunk * kL] : dCpp + row * p.np + lb * kL;
            K.bwd(a);
          }
          // 4. du, ddelta (through bias and softplus), dD, ddelta_bias
          if (in.softplus) K.sigmoid(w.xs.data(), w.tmp.data(), static_cast<int>(len));  // softplus'
          float dDacc = 0.f, dbacc = 0.f;
          for (int64_t t = 0; t < len; ++t) {
            dub[t] = w.dt[t] * sgb[t] + Dc * dy[t];
            dDacc += dy[t] * w.uf[t];
            float ddt = sgb[t] * w.uf[t] + saq[t] * kLn2;
            if (in.softplus) ddt *= w.tmp[t];
            ddb[t] = ddt;
            dbacc += ddt;
          }
          store_f32(dup, in.dtype, row * p.l + ts, len, dub.data());
          store_f32(ddp, in.dtype, row * p.l + ts, len, ddb.data());
          if (dDpp) dDpp[row] += dDacc;
          if (dbpp) dbpp[row] += dbacc;
        }
        // this task's share of the chunk's variable dB/dC, back to (n, l) rows
        auto flush = [&](const BCInfo& X, const std::vector<float>& src, float* part) {
          const int64_t g = p.group_of(k, X.groups), S = p.slots(X.groups), sl = p.slot(k, X.groups);
          for (int64_t kk = 0; kk < p.n; ++kk) {
            float* dst = part + (((k.bi * X.groups + g) * S + sl) * p.n + kk) * p.l + ts;
            const float* col = &src[(kk / kL) * kChunk * kL + (kk % kL)];
            for (int64_t t = 0; t < len; ++t) dst[t] = col[t * kL];
          }
        };
        if (s.Bi.variable) flush(s.Bi, dBt, dBpp);
        if (s.Ci.variable) flush(s.Ci, dCt, dCpp);
      }
      if (dinitp)
        for (int64_t c = k.c0; c < k.c1; ++c)
          std::memcpy(dinitp + (k.bi * p.d + c) * p.n, &w.h[(c - k.c0) * p.np], sizeof(float) * p.n);
    }
  });

  // fixed-order reductions of the partial sums, then the inputs' dtypes
  auto finish_bc = [&](const BCInfo& X, const at::Tensor& part, const at::Tensor& like) {
    at::Tensor r;
    if (!X.variable) {
      r = reduce_batch(part, p.b, p.d, p.n, p.np);
    } else {
      const int64_t S = p.slots(X.groups);
      if (S == 1) {
        r = part;
      } else {
        r = at::empty({p.b, X.groups, p.n, p.l}, f32);
        sum_middle(part.data_ptr<float>(), r.data_ptr<float>(), p.b * X.groups, S, p.n * p.l);
      }
    }
    return r.view(like.sizes()).to(like.scalar_type());
  };
  at::Tensor dA = reduce_batch(dA_part, p.b, p.d, p.n, p.np);
  at::Tensor dB = finish_bc(s.Bi, dB_part, B);
  at::Tensor dC = finish_bc(s.Ci, dC_part, C);
  at::Tensor dD, ddelta_bias;
  if (in.D) dD = reduce_batch(dD_part, p.b, p.d, 1, 1).view({p.d});
  if (in.delta_bias) ddelta_bias = reduce_batch(dbias_part, p.b, p.d, 1, 1).view({p.d});
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit, out};
}

// ---------------------------------------------------------------------------------------------------------

at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus) {
  const char* op = "selective_state_update";
  EMMA_CHECK(state.defined() && state.dim() == 3, op, "state must be a 3-D tensor (batch, dim, dstate), got ",
             state.defined() ? shape_str(state.sizes()) : std::string("an undefined tensor"));
  const int64_t b = state.size(0), d = state.size(1), n = state.size(2);
  EMMA_CHECK(is_float_dtype(state.scalar_type()), op, "state must be float32, float16 or bfloat16, got ",
             state.scalar_type());
  check_arg(op, "state", state, {b, d, n}, {state.scalar_type()});
  EMMA_CHECK(x.defined() && is_float_dtype(x.scalar_type()), op, "x must be a float32, float16 or bfloat16 tensor");
  const auto xdt = x.scalar_type();
  // x, z, B and C are read with their own batch (and group) strides: in the mixer they are views of the
  // in_proj and x_proj outputs
  check_rows_arg(op, "x", x, {b, d}, {xdt});
  check_arg(op, "dt", dt, {b, d}, {xdt});
  check_arg(op, "A", A, {d, n}, {at::kFloat});
  int64_t gB = 1, gC = 1;
  for (auto [name, X, g] : {std::tuple<const char*, const at::Tensor*, int64_t*>{"B", &B, &gB},
                            std::tuple<const char*, const at::Tensor*, int64_t*>{"C", &C, &gC}}) {
    EMMA_CHECK(X->defined(), op, name, " is an undefined tensor");
    if (X->dim() == 3) {
      *g = X->size(1);
      EMMA_CHECK(*g >= 1 && d % *g == 0, op, name, " has ", *g, " groups, which must divide dim=", d);
      check_rows_arg(op, name, *X, {b, *g, n}, {xdt, at::kFloat});
    } else {
      check_rows_arg(op, name, *X, {b, n}, {xdt, at::kFloat});
    }
  }
  check_opt_arg(op, "D", D, {d}, {at::kFloat});
  check_opt_rows_arg(op, "z", z, {b, d}, {xdt});
  check_opt_arg(op, "dt_bias", dt_bias, {d}, {at::kFloat});

  at::Tensor out = at::empty({b, d}, x.options());
  // the scan's own update on 16 state lanes at a time (vectorised exp2; padded lanes with A = B = C = 0 stay at
  // h = 0), where a scalar exp per (channel, state) element made this the slowest part of a CPU decode step.
  // fp32 state and B/C with n a multiple of 16 (the models' case) are read and updated in place.
  const scan::ScanKernels& K = scan::select_scan_kernels();
  const int64_t np = (n + kL - 1) / kL * kL;
  const float* Ap = A.data_ptr<float>();
  const float* Dp = present(D) ? D->data_ptr<float>() : nullptr;
  const float* biasp = present(dt_bias) ? dt_bias->data_ptr<float>() : nullptr;
  const void* zp = present(z) ? z->data_ptr() : nullptr;
  void* statep = state.data_ptr();
  const void *xp = x.data_ptr(), *dtp = dt.data_ptr(), *Bp = B.data_ptr(), *Cp = C.data_ptr();
  void* outp = out.data_ptr();
  const auto sdt = state.scalar_type(), bdt = B.scalar_type(), cdt = C.scalar_type();
  const bool direct_h = sdt == at::kFloat && np == n;
  const bool direct_b = bdt == at::kFloat && np == n, direct_c = cdt == at::kFloat && np == n;
  const int64_t xs = x.stride(0), zs = present(z) ? z->stride(0) : 0;
  const int64_t Bs0 = B.stride(0), Bs1 = B.dim() == 3 ? B.stride(1) : 0;
  const int64_t Cs0 = C.stride(0), Cs1 = C.dim() == 3 ? C.stride(1) : 0;
  at::parallel_for(0, b * d, 16, [&](int64_t r0, int64_t r1) {
    DenormalGuard denormals;
    std::vector<float> hb(np, 0.f), Al(np, 0.f), Bv(np, 0.f), Cv(np, 0.f);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / d, c = r % d;
      float delta = load_one(dtp, xdt, r) + (biasp ? biasp[c] : 0.f);
      if (dt_softplus) delta = softplus_f(delta);
      const float xv = load_one(xp, xdt, bi * xs + c);
      float* h = direct_h ? static_cast<float*>(statep) + r * n : hb.data();
      if (!direct_h) {  // the padding lanes zero again: a row's inf times their zero B is NaN, C . h each row's
        load_f32(statep, sdt, r * n, n, h);
        std::fill(hb.begin() + n, hb.end(), 0.f);
      }
      for (int64_t k = 0; k < n; ++k) Al[k] = Ap[c * n + k] * kLog2e;
      const int64_t boff = bi * Bs0 + c / (d / gB) * Bs1, coff = bi * Cs0 + c / (d / gC) * Cs1;
      const float* Bk = direct_b ? static_cast<const float*>(Bp) + boff : Bv.data();
      const float* Ck = direct_c ? static_cast<const float*>(Cp) + coff : Cv.data();
      if (!direct_b) load_f32(Bp, bdt, boff, n, Bv.data());
      if (!direct_c) load_f32(Cp, cdt, coff, n, Cv.data());
      float y = K.step(Al.data(), Bk, Ck, h, static_cast<int>(np), delta, delta * xv);
      if (!direct_h) store_f32(statep, sdt, r * n, n, h);
      if (Dp) y += Dp[c] * xv;
      if (zp) {
        const float zv = load_one(zp, xdt, bi * zs + c);
        y *= zv * sigmoid_f(zv);
      }
      store_f32(outp, xdt, r, 1, &y);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace emma
