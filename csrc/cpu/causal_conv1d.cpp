// CPU depthwise causal conv1d (Mamba's short convolution before the scan): forward, backward, decode step.
//
//   pre_t = bias + sum_{k<W} w[k] x_{t-(W-1)+k},   out_t = silu(pre_t) (optional),   W in 2..4
// Inputs before t = 0 come from initial_states (b, d, W-1) (zero without it). With seq_idx a tap counts only
// if its position belongs to the same packed sequence as t (the initial states belong to the row's first
// sequence), so the window never reaches into a previous sample.
//
// Rows (batch, channel) are independent in the forward. The backward runs one channel per work item and
// loops over the batch inside, so dweight/dbias are summed in a fixed order (deterministic) without scratch.
// Everything is computed in fp32 from fp32 copies of one row (length l + W - 1). x is read with its own batch and
// channel strides (unit stride in time): the mixer passes a view of its in_proj output.
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "../ops.h"
#include "common.h"
#include "scan_kernels.h"

namespace emma {
namespace cpu {

namespace {

struct ConvShape {
  int64_t b, d, l, w;
};

ConvShape check_conv_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& initial_states,
                            const std::optional<at::Tensor>& seq_idx) {
  EMMA_CHECK(x.defined() && x.dim() == 3, op, "x must be a 3-D tensor (batch, dim, seqlen), got ",
             x.defined() ? shape_str(x.sizes()) : std::string("an undefined tensor"));
  EMMA_CHECK(is_float_dtype(x.scalar_type()), op, "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t b = x.size(0), d = x.size(1), l = x.size(2);
  EMMA_CHECK(l >= 1, op, "seqlen (x.shape[2]) must be at least 1");
  check_rows_arg(op, "x", x, {b, d, l}, {x.scalar_type()});
  EMMA_CHECK(weight.defined() && weight.dim() == 2 && weight.size(0) == d, op, "weight must have shape (dim=", d,
             ", width), got ", weight.defined() ? shape_str(weight.sizes()) : std::string("an undefined tensor"));
  const int64_t w = weight.size(1);
  EMMA_CHECK(w >= 2 && w <= 4, op, "conv width (weight.shape[1], d_conv) must be 2, 3 or 4, got ", w);
  check_arg(op, "weight", weight, {d, w}, {x.scalar_type(), at::kFloat});
  check_opt_arg(op, "bias", bias, {d}, {x.scalar_type(), at::kFloat});
  check_opt_arg(op, "initial_states", initial_states, {b, d, w - 1}, {x.scalar_type(), at::kFloat});
  check_opt_arg(op, "seq_idx", seq_idx, {b, l}, {at::kInt});
  return {b, d, l, w};
}

// Row (bi, c) of x with its W-1 inputs of history in front: xp[j] is input position j - (W-1).
void load_padded_row(const at::Tensor& x, const std::optional<at::Tensor>& init, const ConvShape& s, int64_t bi,
                     int64_t c, float* xp) {
  const int64_t row = bi * s.d + c;
  if (present(init)) {
    load_f32(init->data_ptr(), init->scalar_type(), row * (s.w - 1), s.w - 1, xp);
  } else {
    for (int64_t j = 0; j < s.w - 1; ++j) xp[j] = 0.f;
  }
  load_f32(x.data_ptr(), x.scalar_type(), bi * x.stride(0) + c * x.stride(1), s.l, xp + s.w - 1);
}

// Whether the tap at input position `src` (negative: initial state) is in the same sequence as output t.
inline bool same_seq(const int32_t* sq, int64_t t, int64_t src) {
  return sq == nullptr || sq[t] == sq[src < 0 ? 0 : src];
}

// With seq_idx: valid[(bi * (W-1) + k) * l + t] = all ones if tap k < W-1 of output t in batch row bi reads the
// same sequence as t, else 0 (the last tap, k = W-1, is position t itself and always valid). Computed once per
// call, before the row loops, so that those loops are branch-free over contiguous time and vectorise: a tap's
// term is AND-ed with its mask (exactly 0 when invalid, even for a non-finite input of another sequence).
using Mask = uint32_t;
std::vector<Mask> tap_masks(const int32_t* sqp, const ConvShape& s) {
  std::vector<Mask> valid(sqp ? s.b * (s.w - 1) * s.l : 0);
  if (sqp == nullptr) return valid;
  for (int64_t bi = 0; bi < s.b; ++bi) {
    const int32_t* sq = sqp + bi * s.l;
    for (int64_t k = 0; k + 1 < s.w; ++k) {
      Mask* v = valid.data() + (bi * (s.w - 1) + k) * s.l;
      for (int64_t t = 0; t < s.l; ++t) v[t] = same_seq(sq, t, t - (s.w - 1) + k) ? ~Mask(0) : Mask(0);
    }
  }
  return valid;
}

// Row bi's mask of tap k (nullptr: every position valid, i.e. no seq_idx or the last tap).
inline const Mask* tap_mask(const std::vector<Mask>& valid, const ConvShape& s, int64_t bi, int64_t k) {
  return (valid.empty() || k == s.w - 1) ? nullptr : valid.data() + (bi * (s.w - 1) + k) * s.l;
}

inline float masked(float v, Mask m) { return std::bit_cast<float>(std::bit_cast<Mask>(v) & m); }

// pre-activation of row xp (batch row bi) into pre[0..l): tap-outer loops over contiguous time
void conv_row(const float* __restrict__ xp, const float* wt, float bias, const std::vector<Mask>& valid,
              int64_t bi, const ConvShape& s, float* __restrict__ pre) {
  for (int64_t t = 0; t < s.l; ++t) pre[t] = bias;
  for (int64_t k = 0; k < s.w; ++k) {
    const float wk = wt[k];
    const float* __restrict__ src = xp + k;
    const Mask* __restrict__ v = tap_mask(valid, s, bi, k);
    if (v == nullptr) {
      for (int64_t t = 0; t < s.l; ++t) pre[t] += wk * src[t];
    } else {
      for (int64_t t = 0; t < s.l; ++t) pre[t] += masked(wk * src[t], v[t]);
    }
  }
}

}  // namespace

at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& initial_states, const std::optional<at::Tensor>& seq_idx,
                             bool silu) {
  const char* op = "causal_conv1d_fwd";
  const ConvShape s = check_conv_inputs(op, x, weight, bias, initial_states, seq_idx);
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous, whatever x's strides
  const int32_t* sqp = present(seq_idx) ? seq_idx->data_ptr<int32_t>() : nullptr;
  const scan::ScanKernels& vk = scan::select_scan_kernels();  // vectorised sigmoid for the SiLU
  const int64_t lpad = (s.l + scan::kLanes - 1) / scan::kLanes * scan::kLanes;
  const std::vector<Mask> valid = tap_masks(sqp, s);
  at::parallel_for(0, s.b * s.d, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> xp(s.l + s.w - 1), pre(lpad, 0.f), sig(lpad), wt(s.w);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / s.d, c = r % s.d;
      load_f32(weight.data_ptr(), weight.scalar_type(), c * s.w, s.w, wt.data());
      const float bv = present(bias) ? load_one(bias->data_ptr(), bias->scalar_type(), c) : 0.f;
      load_padded_row(x, initial_states, s, bi, c, xp.data());
      conv_row(xp.data(), wt.data(), bv, valid, bi, s, pre.data());
      if (silu) {
        vk.sigmoid(pre.data(), sig.data(), static_cast<int>(s.l));
        for (int64_t t = 0; t < s.l; ++t) pre[t] *= sig[t];
      }
      store_f32(out.data_ptr(), x.scalar_type(), r * s.l, s.l, pre.data());
    }
  });
  return out;
}

std::vector<at::Tensor> causal_conv1d_bwd(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& initial_states,
                                          const std::optional<at::Tensor>& seq_idx, const at::Tensor& dout,
                                          bool silu) {
  const char* op = "causal_conv1d_bwd";
  const ConvShape s = check_conv_inputs(op, x, weight, bias, initial_states, seq_idx);
  check_arg(op, "dout", dout, {s.b, s.d, s.l}, {x.scalar_type()});
  const int32_t* sqp = present(seq_idx) ? seq_idx->data_ptr<int32_t>() : nullptr;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::empty({s.d, s.w}, f32);
  at::Tensor db = present(bias) ? at::empty({s.d}, f32) : at::Tensor();
  at::Tensor dinit = present(initial_states) ? at::empty({s.b, s.d, s.w - 1}, f32) : at::Tensor();
  float* dwp = dw.data_ptr<float>();
  float* dbp = present(bias) ? db.data_ptr<float>() : nullptr;
  float* dip = present(initial_states) ? dinit.data_ptr<float>() : nullptr;

  const scan::ScanKernels& vk = scan::select_scan_kernels();
  const int64_t lpad = (s.l + scan::kLanes - 1) / scan::kLanes * scan::kLanes;
  const std::vector<Mask> valid = tap_masks(sqp, s);
  at::parallel_for(0, s.d, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> xp(s.l + s.w - 1), pre(lpad, 0.f), sig(lpad), dpre(s.l), dxp(s.l + s.w - 1), wt(s.w);
    for (int64_t c = c0; c < c1; ++c) {
      load_f32(weight.data_ptr(), weight.scalar_type(), c * s.w, s.w, wt.data());
      const float bv = present(bias) ? load_one(bias->data_ptr(), bias->scalar_type(), c) : 0.f;
      float dwacc[4] = {0.f, 0.f, 0.f, 0.f}, dbacc = 0.f;
      for (int64_t bi = 0; bi < s.b; ++bi) {
        const int64_t row = bi * s.d + c;
        load_padded_row(x, initial_states, s, bi, c, xp.data());
        load_f32(dout.data_ptr(), dout.scalar_type(), row * s.l, s.l, dpre.data());
        if (silu) {
          conv_row(xp.data(), wt.data(), bv, valid, bi, s, pre.data());
          vk.sigmoid(pre.data(), sig.data(), static_cast<int>(s.l));
          for (int64_t t = 0; t < s.l; ++t) dpre[t] *= sig[t] * (1.f + pre[t] * (1.f - sig[t]));
        }
        const float* __restrict__ g = dpre.data();
        float db_row = 0.f;
#pragma omp simd reduction(+ : db_row)
        for (int64_t t = 0; t < s.l; ++t) db_row += g[t];
        dbacc += db_row;
        // tap k of output t: its gradient goes to w[k] (a dot product over time) and to the input at padded
        // position t + k; tap-outer loops over contiguous time (fixed-width simd partial sums: deterministic)
        std::fill(dxp.begin(), dxp.end(), 0.f);
        for (int64_t k = 0; k < s.w; ++k) {
          const float wk = wt[k];
          const float* __restrict__ xk = xp.data() + k;
          float* __restrict__ dk = dxp.data() + k;
          const Mask* __restrict__ v = tap_mask(valid, s, bi, k);
          float acc = 0.f;
          if (v == nullptr) {
#pragma omp simd reduction(+ : acc)
            for (int64_t t = 0; t < s.l; ++t) {
              acc += g[t] * xk[t];
              dk[t] += g[t] * wk;
            }
          } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t t = 0; t < s.l; ++t) {
              acc += masked(g[t] * xk[t], v[t]);
              dk[t] += masked(g[t] * wk, v[t]);
            }
          }
          dwacc[k] += acc;
        }
        store_f32(dx.data_ptr(), x.scalar_type(), row * s.l, s.l, dxp.data() + s.w - 1);
        if (dip)
          for (int64_t j = 0; j < s.w - 1; ++j) dip[row * (s.w - 1) + j] = dxp[j];
      }
      for (int64_t k = 0; k < s.w; ++k) dwp[c * s.w + k] = dwacc[k];
      if (dbp) dbp[c] = dbacc;
    }
  });
  return {dx, dw.to(weight.scalar_type()), present(bias) ? db.to(bias->scalar_type()) : at::Tensor(),
          present(initial_states) ? dinit.to(initial_states->scalar_type()) : at::Tensor()};
}

at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool silu) {
  const char* op = "causal_conv1d_update";
  EMMA_CHECK(conv_state.defined() && conv_state.dim() == 3, op,
             "conv_state must be a 3-D tensor (batch, dim, width), got ",
             conv_state.defined() ? shape_str(conv_state.sizes()) : std::string("an undefined tensor"));
  const int64_t b = conv_state.size(0), d = conv_state.size(1), w = conv_state.size(2);
  EMMA_CHECK(w >= 2 && w <= 4, op, "conv width (conv_state.shape[2], d_conv) must be 2, 3 or 4, got ", w);
  EMMA_CHECK(is_float_dtype(conv_state.scalar_type()), op, "conv_state must be float32, float16 or bfloat16, got ",
             conv_state.scalar_type());
  check_arg(op, "conv_state", conv_state, {b, d, w}, {conv_state.scalar_type()});
  EMMA_CHECK(x.defined() && is_float_dtype(x.scalar_type()), op, "x must be a float32, float16 or bfloat16 tensor");
  check_rows_arg(op, "x", x, {b, d}, {x.scalar_type()});  // any batch stride (a view of in_proj's output)
  check_arg(op, "weight", weight, {d, w}, {x.scalar_type(), at::kFloat});
  check_opt_arg(op, "bias", bias, {d}, {x.scalar_type(), at::kFloat});

  at::Tensor out = at::empty({b, d}, x.options());
  const int64_t xs = x.stride(0);
  const auto sdt = conv_state.scalar_type(), xdt = x.scalar_type(), wdt = weight.scalar_type();
  void* statep = conv_state.data_ptr();
  const void *xp = x.data_ptr(), *wp = weight.data_ptr();
  const void* bp = present(bias) ? bias->data_ptr() : nullptr;
  const auto bdt = present(bias) ? bias->scalar_type() : at::kFloat;
  void* outp = out.data_ptr();
  if (sdt == at::kFloat && xdt == at::kFloat && wdt == at::kFloat && (!bp || bdt == at::kFloat)) {
    // all fp32 (the CPU default): plain loads, no per-element dtype dispatch
    float* S = static_cast<float*>(statep);
    const float *X = static_cast<const float*>(xp), *Wt = static_cast<const float*>(wp);
    const float* Bi = static_cast<const float*>(bp);
    float* O = static_cast<float*>(outp);
    at::parallel_for(0, b * d, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % d;
        float* st = S + r * w;
        for (int64_t k = 0; k + 1 < w; ++k) st[k] = st[k + 1];
        st[w - 1] = X[r / d * xs + c];
        float acc = Bi ? Bi[c] : 0.f;
        for (int64_t k = 0; k < w; ++k) acc += st[k] * Wt[c * w + k];
        O[r] = silu ? acc * sigmoid_f(acc) : acc;
      }
    });
    return out;
  }
  at::parallel_for(0, b * d, 64, [&](int64_t r0, int64_t r1) {
    float st[4], wt[4];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % d;
      load_f32(statep, sdt, r * w, w, st);
      for (int64_t k = 0; k + 1 < w; ++k) st[k] = st[k + 1];
      st[w - 1] = load_one(xp, xdt, r / d * xs + c);
      store_f32(statep, sdt, r * w, w, st);
      load_f32(statep, sdt, r * w, w, st);  // the output sees the state's rounding of x
      load_f32(wp, wdt, c * w, w, wt);
      float acc = bp ? load_one(bp, bdt, c) : 0.f;
      for (int64_t k = 0; k < w; ++k) acc += st[k] * wt[k];
      if (silu) acc *= sigmoid_f(acc);
      store_f32(outp, xdt, r, 1, &acc);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace emma
