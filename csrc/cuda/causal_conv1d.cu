// Depthwise causal conv1d (Mamba's short convolution, width 2..4) forward, backward and decode step on CUDA.
//
//   out_t = act(bias + sum_k w[k] * x_{t-(W-1)+k})
//
// A thread computes K = 8 consecutive outputs of one (batch, channel) row with 16-byte loads of its own
// inputs plus a W-1 halo, which the neighbouring thread also loads (served by L1). initial_states stand in
// for the inputs before t = 0 and belong to the row's first segment; with seq_idx a tap that reaches into an
// earlier segment reads zero. The backward recomputes the pre-activation it needs (no saved activations) and
// reduces dweight/dbias per block into per-(batch, tile) partials that a fixed-order sum finishes, so it is
// deterministic.
#include "common.cuh"

#include "../ops.h"

namespace emma {
namespace cuda {
namespace {

constexpr int kItems = 8;
constexpr int kThreads = 128;
constexpr int kTile = kItems * kThreads;
constexpr int kHalo = 3;  // max width - 1

struct ConvParams {
  int batch, dim, seqlen, width;
  bool silu, vec, vec_x;  // vec: out/dout/dx rows 16-byte aligned; vec_x: x's rows
  const void *x, *weight, *bias, *init;
  int64_t x_bs, x_ds;  // x's batch and channel strides: a view of the mixer's in_proj output is read in place
  int w_dt, b_dt, i_dt;  // run-time dtypes of weight, bias, initial_states
  const int* seq_idx;
  void* out;
  // backward
  const void* dout;
  void *dx;
  float *dwb_part, *dinit;  // (b, ntiles, d, W+1) partials; dinit (b, d, W-1) fp32
};

// Inputs at positions t0 - kHalo + j, j in [0, kHalo + M), with their segment ids (positions < 0 read the
// initial state and belong to the first segment; positions >= L read 0).
template <typename T, int M>
__device__ __forceinline__ void load_window(const ConvParams& p, int b, int c, int t0, float (&xs)[kHalo + M],
                                            int (&sg)[kHalo + M]) {
  const int L = p.seqlen, W = p.width;
  const T* x = static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.x_bs + static_cast<int64_t>(c) * p.x_ds;
  const int* s = p.seq_idx ? p.seq_idx + static_cast<int64_t>(b) * L : nullptr;
  // own K items, vectorised
  float own[kItems];
  const int valid = max(0, min(kItems, L - t0));
  load_k<T, kItems>(x + t0, own, valid, p.vec_x);
#pragma unroll
  for (int j = 0; j < kHalo + M; ++j) {
    const int pos = t0 - kHalo + j;
    float v = 0.f;
    if (j >= kHalo && j < kHalo + kItems) {
      v = own[j - kHalo];
    } else if (pos >= 0 && pos < L) {
      v = to_f<T>(x[pos]);
    } else if (pos < 0 && pos >= -(W - 1) && p.init) {
      v = load_dyn(p.init, p.i_dt, (static_cast<int64_t>(b) * p.dim + c) * (W - 1) + pos + (W - 1));
    }
    xs[j] = v;
    sg[j] = s ? s[min(max(pos, 0), L - 1)] : 0;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(ConvParams p) {
  const int r = blockIdx.x, b = r / p.dim, c = r % p.dim;
  const int t0 = blockIdx.y * kTile + threadIdx.x * kItems;
  const int L = p.seqlen, W = p.width;
  if (t0 >= L) return;
  float xs[kHalo + kItems];
  int sg[kHalo + kItems];
  load_window<T, kItems>(p, b, c, t0, xs, sg);
  // wr[s] = w[W-1-s]: the weight of the input s steps back; zero for s >= W
  float wr[4];
#pragma unroll
  for (int sh = 0; sh < 4; ++sh)
    wr[sh] = sh < W ? load_dyn(p.weight, p.w_dt, static_cast<int64_t>(c) * W + (W - 1 - sh)) : 0.f;
  const float bias = p.bias ? load_dyn(p.bias, p.b_dt, c) : 0.f;
  float out[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    float acc = bias;
#pragma unroll
    for (int sh = 0; sh < 4; ++sh) {
      const int j = kHalo + i - sh;
      acc += (sh < W && sg[j] == sg[kHalo + i]) ? wr[sh] * xs[j] : 0.f;  // a select: 0 * inf is NaN
    }
    out[i] = p.silu ? silu_f(acc) : acc;
  }
  const int valid = min(kItems, L - t0);
  store_k<T, kItems>(static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.dim + c) * L + t0, out, valid, p.vec);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_bwd_kernel(ConvParams p) {
  constexpr int M = kItems + kHalo;  // dpre needed at t0 .. t0 + K - 1 + (W - 1)
  __shared__ float red[kThreads / 32][5];
  const int r = blockIdx.x, b = r / p.dim, c = r % p.dim;
  const int t0 = blockIdx.y * kTile + threadIdx.x * kItems;
  const int L = p.seqlen, W = p.width;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float wr[4], w[4];  // wr[s] = w[W-1-s] (s steps back); both zero past the width
#pragma unroll
  for (int sh = 0; sh < 4; ++sh) {
    wr[sh] = sh < W ? load_dyn(p.weight, p.w_dt, static_cast<int64_t>(c) * W + (W - 1 - sh)) : 0.f;
    w[sh] = sh < W ? load_dyn(p.weight, p.w_dt, static_cast<int64_t>(c) * W + sh) : 0.f;
  }
  float dwb[5] = {0.f, 0.f, 0.f, 0.f, 0.f};  // dwr[0..3] (by shift), dbias
  const int64_t row = (static_cast<int64_t>(b) * p.dim + c) * L;
  if (t0 < L) {
    float xs[kHalo + M];
    int sg[kHalo + M];
    load_window<T, M>(p, b, c, t0, xs, sg);
    const float bias = p.bias ? load_dyn(p.bias, p.b_dt, c) : 0.f;
    const T* dout = static_cast<const T*>(p.dout) + row;
    float dpre[M];
    {
      float own[kItems];
      const int valid = max(0, min(kItems, L - t0));
      load_k<T, kItems>(dout + t0, own, valid, p.vec);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const int t = t0 + m;
        float g = m < kItems ? own[m] : (t < L ? to_f<T>(dout[t]) : 0.f);
        if (t >= L) g = 0.f;
        if (p.silu) {
          float acc = bias;
#pragma unroll
          for (int sh = 0; sh < 4; ++sh) {
            const int j = kHalo + m - sh;
            acc += (sh < W && sg[j] == sg[kHalo + m]) ? wr[sh] * xs[j] : 0.f;
          }
          const float s = sigmoid_f(acc);
          g *= s * (1.f + acc * (1.f - s));
        }
        dpre[m] = g;
      }
    }
    float dx[kItems];
    const int valid = min(kItems, L - t0);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float acc = 0.f;
#pragma unroll
      for (int sh = 0; sh < 4; ++sh) {  // output i + sh reads input i, sh steps back
        acc += (sh < W && sg[kHalo + i + sh] == sg[kHalo + i]) ? wr[sh] * dpre[i + sh] : 0.f;
      }
      dx[i] = acc;
      if (i < valid) {
#pragma unroll
        for (int sh = 0; sh < 4; ++sh) {
          const int j = kHalo + i - sh;
          dwb[sh] += (sh < W && sg[j] == sg[kHalo + i]) ? dpre[i] * xs[j] : 0.f;
        }
        dwb[4] += dpre[i];
      }
    }
    store_k<T, kItems>(static_cast<T*>(p.dx) + row + t0, dx, valid, p.vec);
    if (p.dinit && t0 == 0) {
      // dinit[j] = sum_{t=0}^{min(j, L-1)} w[j - t] dpre[t] over outputs in position 0's segment
#pragma unroll
      for (int j = 0; j < kHalo; ++j) {
        if (j < W - 1) {
          float acc = 0.f;
#pragma unroll
          for (int t = 0; t <= j; ++t) acc += (t < L && sg[kHalo + t] == sg[kHalo]) ? w[j - t] * dpre[t] : 0.f;
          p.dinit[(static_cast<int64_t>(b) * p.dim + c) * (W - 1) + j] = acc;
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < 5; ++k) {
    float v = dwb[k];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) red[warp][k] = v;
  }
  __syncthreads();
  if (threadIdx.x < 5) {
    float s = 0.f;
    for (int w2 = 0; w2 < kThreads / 32; ++w2) s += red[w2][threadIdx.x];
    const int k = threadIdx.x;
    if (k < W || k == 4) {
      const int col = k == 4 ? W : W - 1 - k;  // shift k -> weight column W-1-k
      p.dwb_part[((static_cast<int64_t>(b) * gridDim.y + blockIdx.y) * p.dim + c) * (W + 1) + col] = s;
    }
  }
}

__global__ void conv_update_kernel(int batch, int dim, int W, bool silu, const void* x, int64_t x_bs, int x_dt,
                                   void* state, int s_dt, const void* weight, int w_dt, const void* bias, int b_dt,
                                   void* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= static_cast<int64_t>(batch) * dim) return;
  const int c = r % dim;
  float acc = bias ? load_dyn(bias, b_dt, c) : 0.f;
  const int64_t s0 = r * W;
  float v[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = k + 1 < W ? load_dyn(state, s_dt, s0 + k + 1) : 0.f;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (k + 1 < W) store_dyn(state, s_dt, s0 + k, v[k]);
  store_dyn(state, s_dt, s0 + W - 1, load_dyn(x, x_dt, r / dim * x_bs + c));
  const float xin = load_dyn(state, s_dt, s0 + W - 1);  // x rounded to the state's dtype, as stored
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (k < W) acc += load_dyn(weight, w_dt, static_cast<int64_t>(c) * W + k) * (k == W - 1 ? xin : v[k]);
  }
  if (silu) acc = silu_f(acc);
  store_dyn(out, x_dt, r, acc);
}

void fill(ConvParams& p, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
          const std::optional<at::Tensor>& initial_states, const std::optional<at::Tensor>& seq_idx, bool silu) {
  const char* op = "causal_conv1d";
  check_cuda_rows(x, op, "x");
  check_cuda(weight, op, "weight");
  check_cuda(bias, op, "bias");
  check_cuda(initial_states, op, "initial_states");
  check_cuda(seq_idx, op, "seq_idx");
  EMMA_CHECK(x.dim() == 3 && weight.dim() == 2 && weight.size(0) == x.size(1),
             "causal_conv1d: x must be (b, d, l) and weight (d, w)");
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.seqlen = x.size(2);
  p.width = weight.size(1);
  EMMA_CHECK(p.width >= 2 && p.width <= 4, "causal_conv1d: width must be 2, 3 or 4, got ", p.width);
  check_shape(bias, {x.size(1)}, op, "bias");
  check_shape(initial_states, {x.size(0), x.size(1), p.width - 1}, op, "initial_states");
  check_shape(seq_idx, {x.size(0), x.size(2)}, op, "seq_idx");
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_bs = x.stride(0);
  p.x_ds = x.stride(1);
  p.weight = weight.data_ptr();
  p.w_dt = dtype_code(weight.scalar_type());
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.b_dt = bias ? dtype_code(bias->scalar_type()) : 0;
  p.init = initial_states ? initial_states->data_ptr() : nullptr;
  p.i_dt = initial_states ? dtype_code(initial_states->scalar_type()) : 0;
  p.seq_idx = seq_idx ? seq_idx->data_ptr<int>() : nullptr;
  p.vec = (p.seqlen * x.element_size()) % 16 == 0;  // the contiguous outputs' rows; their pointers: by the caller
  p.vec_x = rows_aligned16(x);
}

}  // namespace

at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& initial_states,
                             const std::optional<at::Tensor>& seq_idx, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvParams p{};
  fill(p, x, weight, bias, initial_states, seq_idx, silu);
  auto out = at::empty(x.sizes(), x.options());  // contiguous, whatever x's strides
  p.out = out.data_ptr();
  p.vec = p.vec && aligned16(p.out);
  if (x.numel() == 0) return out;
  const int ntiles = (p.seqlen + kTile - 1) / kTile;
  EMMA_CHECK(ntiles <= 65535, "causal_conv1d: sequence too long");
  dim3 grid(static_cast<unsigned>(p.batch) * p.dim, ntiles);
  auto stream = at::cuda::getCurrentCUDAStream();
  EMMA_DISPATCH_FLOAT(x.scalar_type(), "causal_conv1d", [&] {
    EMMA_LAUNCH(conv_fwd_kernel<scalar_t>, grid, kThreads, 0, stream, p);
    EMMA_CUDA_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> causal_conv1d_bwd(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& initial_states,
                                          const std::optional<at::Tensor>& seq_idx, const at::Tensor& dout,
                                          bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  ConvParams p{};
  fill(p, x, weight, bias, initial_states, seq_idx, silu);
  check_cuda(dout, "causal_conv1d_bwd", "dout");
  EMMA_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(),
             "causal_conv1d_bwd: dout must match x's shape and dtype");
  const int ntiles = std::max(1, (p.seqlen + kTile - 1) / kTile);
  EMMA_CHECK(ntiles <= 65535, "causal_conv1d: sequence too long");
  auto fopts = x.options().dtype(at::kFloat);
  auto dx = at::empty(x.sizes(), x.options());
  auto dwb_part = at::empty({p.batch, ntiles, p.dim, p.width + 1}, fopts);
  at::Tensor dinit;
  if (initial_states) dinit = at::empty({p.batch, p.dim, p.width - 1}, fopts);
  p.dout = dout.data_ptr();
  p.dx = dx.data_ptr();
  p.dwb_part = dwb_part.data_ptr<float>();
  p.dinit = initial_states ? dinit.data_ptr<float>() : nullptr;
  p.vec = p.vec && aligned16(p.dout) && aligned16(p.dx);
  if (x.numel() > 0) {
    dim3 grid(static_cast<unsigned>(p.batch) * p.dim, ntiles);
    auto stream = at::cuda::getCurrentCUDAStream();
    EMMA_DISPATCH_FLOAT(x.scalar_type(), "causal_conv1d", [&] {
      EMMA_LAUNCH(conv_bwd_kernel<scalar_t>, grid, kThreads, 0, stream, p);
      EMMA_CUDA_LAUNCH_CHECK();
    });
  }
  auto dwb = dwb_part.sum(0).sum(0);  // (d, W+1), fixed order (no braced dim list: ambiguous in torch 2.11)
  auto dweight = dwb.narrow(1, 0, p.width).to(weight.scalar_type());
  at::Tensor dbias;
  if (bias) dbias = dwb.select(1, p.width).to(bias->scalar_type());
  if (initial_states) dinit = dinit.to(initial_states->scalar_type());
  return {dx, dweight, dbias, dinit};
}

at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const char* op = "causal_conv1d_update";
  check_cuda_rows(x, op, "x");  // any batch stride: a view of in_proj's output
  check_cuda(conv_state, op, "conv_state");
  check_cuda(weight, op, "weight");
  check_cuda(bias, op, "bias");
  EMMA_CHECK(conv_state.dim() == 3 && x.dim() == 2 && x.size(0) == conv_state.size(0) &&
                 x.size(1) == conv_state.size(1) && weight.size(0) == x.size(1) &&
                 weight.size(1) == conv_state.size(2),
             "causal_conv1d_update: expected x (b, d), conv_state (b, d, w), weight (d, w)");
  check_shape(bias, {x.size(1)}, op, "bias");
  const int batch = x.size(0), dim = x.size(1), W = conv_state.size(2);
  EMMA_CHECK(W >= 2 && W <= 4, "causal_conv1d_update: width must be 2, 3 or 4, got ", W);
  auto out = at::empty(x.sizes(), x.options());
  const int64_t rows = static_cast<int64_t>(batch) * dim;
  if (rows == 0) return out;
  const int threads = 128;
  EMMA_LAUNCH(conv_update_kernel, (rows + threads - 1) / threads, threads, 0, at::cuda::getCurrentCUDAStream(),
      batch, dim, W, silu, x.data_ptr(), x.stride(0), dtype_code(x.scalar_type()), conv_state.data_ptr(),
      dtype_code(conv_state.scalar_type()), weight.data_ptr(), dtype_code(weight.scalar_type()),
      bias ? bias->data_ptr() : nullptr, bias ? dtype_code(bias->scalar_type()) : 0, out.data_ptr());
  EMMA_CUDA_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace emma
