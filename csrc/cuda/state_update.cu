// One decode step of the selective scan on CUDA, updating the recurrent state in place:
//
//   dt = softplus(dt + dt_bias);  h = exp(dt * A) * h + dt * B * x;  y = <C, h> + D * x;  out = y * silu(z)
//
// A group of T lanes (T a power of two, T <= 32) owns one (batch, channel) row of the state and splits its n
// entries four at a time; the <C, h> reduction is a shuffle within the group. At b = 1, d = 5120, n = 16 this
// is 1280 warps, one pass over 320 KB of state: the step is bound by the launch, not by the GPU. No host
// synchronisation and no allocation besides the output, so a decode loop can be captured in a CUDA graph.
// The dtypes (state, x/dt/z, B/C may differ) are read at run time instead of multiplying template instances.
#include "common.cuh"

#include "../ops.h"

namespace emma {
namespace cuda {
namespace {

struct StepParams {
  int batch, dim, dstate, groups, lanes;  // lanes per (b, channel) row
  bool softplus, vec_state;  // vec_state: fp32 state, n % 4 == 0, 16-byte aligned -> float4 accesses
  void* state;
  int s_dt;
  const void *x, *dt, *z, *B, *C;
  int64_t x_bs, z_bs, B_bs, B_gs, C_bs, C_gs;  // batch (and group) strides: views of in_proj's / x_proj's outputs
  int x_dt, bc_dt;
  const float *A, *D, *dt_bias;
  void* out;
};

__global__ void __launch_bounds__(128) state_update_kernel(StepParams p) {
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = gtid / p.lanes;  // (b, channel) row
  const int j = gtid % p.lanes;
  const bool active = r < static_cast<int64_t>(p.batch) * p.dim;
  float y = 0.f, xv = 0.f;
  if (active) {
    const int b = r / p.dim, c = r % p.dim, N = p.dstate;
    float dt = load_dyn(p.dt, p.x_dt, r) + (p.dt_bias ? p.dt_bias[c] : 0.f);
    if (p.softplus) dt = softplus_f(dt);
    xv = load_dyn(p.x, p.x_dt, b * p.x_bs + c);
    const float dtx = dt * xv;
    const int g = c / (p.dim / p.groups);
    const int64_t b0 = b * p.B_bs + g * p.B_gs, c0 = b * p.C_bs + g * p.C_gs;
    const int64_t s0 = r * N;
    const float* A = p.A + static_cast<int64_t>(c) * N;
    for (int n0 = 4 * j; n0 < N; n0 += 4 * p.lanes) {
      float h[4], a[4], bv[4], cv[4];
      const int cnt = min(4, N - n0);
      const bool vec = cnt == 4 && p.vec_state;
      if (vec) {
        const float4 hv = *reinterpret_cast<const float4*>(static_cast<const float*>(p.state) + s0 + n0);
        h[0] = hv.x; h[1] = hv.y; h[2] = hv.z; h[3] = hv.w;
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (k < cnt) {
          if (!vec) h[k] = load_dyn(p.state, p.s_dt, s0 + n0 + k);
          a[k] = A[n0 + k];
          bv[k] = load_dyn(p.B, p.bc_dt, b0 + n0 + k);
          cv[k] = load_dyn(p.C, p.bc_dt, c0 + n0 + k);
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (k < cnt) {
          h[k] = __expf(dt * a[k]) * h[k] + dtx * bv[k];
          if (!vec) store_dyn(p.state, p.s_dt, s0 + n0 + k, h[k]);  // y uses the unrounded h, as the reference
          y += cv[k] * h[k];
        }
      }
      if (vec)
        *reinterpret_cast<float4*>(static_cast<float*>(p.state) + s0 + n0) = make_float4(h[0], h[1], h[2], h[3]);
    }
  }
  for (int off = p.lanes / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off);
  if (active && j == 0) {
    const int64_t b = r / p.dim, c = r % p.dim;
    if (p.D) y += p.D[c] * xv;
    if (p.z) y *= silu_f(load_dyn(p.z, p.x_dt, b * p.z_bs + c));
    store_dyn(p.out, p.x_dt, r, y);
  }
}

}  // namespace

at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                  const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                  const std::optional<at::Tensor>& dt_bias, bool dt_softplus) {
  const c10::cuda::CUDAGuard guard(state.device());
  const char* op = "selective_state_update";
  check_cuda(state, op, "state");
  check_cuda_rows(x, op, "x");  // x, z, B, C: any batch (and group) strides
  check_cuda(dt, op, "dt");
  check_cuda(A, op, "A");
  check_cuda_rows(B, op, "B");
  check_cuda_rows(C, op, "C");
  check_cuda(D, op, "D");
  check_cuda_rows(z, op, "z");
  check_cuda(dt_bias, op, "dt_bias");
  EMMA_CHECK(state.dim() == 3 && x.dim() == 2 && A.dim() == 2, op, ": expected state (b, d, n), x (b, d), A (d, n)");
  StepParams p{};
  p.batch = state.size(0);
  p.dim = state.size(1);
  p.dstate = state.size(2);
  p.groups = B.dim() == 3 ? B.size(1) : 1;
  EMMA_CHECK(p.groups >= 1 && p.dim % p.groups == 0, op, ": groups must divide dim");
  EMMA_CHECK(B.sizes() == C.sizes(), op, ": B and C must have the same shape");
  {
    const int64_t b = p.batch, d = p.dim, n = p.dstate;
    check_shape(x, {b, d}, op, "x");
    check_shape(dt, {b, d}, op, "dt");
    check_shape(A, {d, n}, op, "A");
    if (B.dim() == 3) check_shape(B, {b, static_cast<int64_t>(p.groups), n}, op, "B");
    else check_shape(B, {b, n}, op, "B");
    check_shape(D, {d}, op, "D");
    check_shape(z, {b, d}, op, "z");
    check_shape(dt_bias, {d}, op, "dt_bias");
  }
  EMMA_CHECK(A.scalar_type() == at::kFloat, op, ": A must be float32");
  at::Tensor Bt = B, Ct = C;
  if (Bt.scalar_type() != Ct.scalar_type()) { Bt = Bt.to(at::kFloat); Ct = Ct.to(at::kFloat); }
  int lanes = 1;
  while (lanes < 32 && 4 * lanes < p.dstate) lanes *= 2;
  p.lanes = lanes;
  p.softplus = dt_softplus;
  p.state = state.data_ptr();
  p.s_dt = dtype_code(state.scalar_type());
  p.x = x.data_ptr();
  p.x_bs = x.stride(0);
  p.dt = dt.data_ptr();
  p.z = z ? z->data_ptr() : nullptr;
  p.z_bs = z ? z->stride(0) : 0;
  p.x_dt = dtype_code(x.scalar_type());
  EMMA_CHECK(dt.scalar_type() == x.scalar_type() && (!z || z->scalar_type() == x.scalar_type()),
             op, ": dt and z must have x's dtype");
  p.B = Bt.data_ptr();
  p.C = Ct.data_ptr();
  p.B_bs = Bt.stride(0);
  p.B_gs = Bt.dim() == 3 ? Bt.stride(1) : 0;
  p.C_bs = Ct.stride(0);
  p.C_gs = Ct.dim() == 3 ? Ct.stride(1) : 0;
  p.bc_dt = dtype_code(Bt.scalar_type());
  p.A = A.data_ptr<float>();
  p.D = opt_ptr<float>(D);
  p.dt_bias = opt_ptr<float>(dt_bias);
  auto out = at::empty(x.sizes(), x.options());  // contiguous, whatever x's strides
  p.out = out.data_ptr();
  const int64_t threads_total = static_cast<int64_t>(p.batch) * p.dim * lanes;
  if (threads_total == 0) return out;
  p.vec_state = p.s_dt == kF32 && p.dstate % 4 == 0 && aligned16(p.state);
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>((threads_total + threads - 1) / threads);
  EMMA_LAUNCH(state_update_kernel, blocks, threads, 0, at::cuda::getCurrentCUDAStream(), p);
  EMMA_CUDA_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace emma
