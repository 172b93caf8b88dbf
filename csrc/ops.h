// Declarations of the kernel entry points shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) backends.
// Both backends implement exactly this signature set in their own namespace; bindings.cpp exposes them as
// emma_mamba._C.<name>_cpu and emma_mamba._C.<name>_cuda. The Python-side contract (what each returns,
// which entries may be None) is documented in emma_mamba/ops/_autograd.py.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

#define EMMA_DECLARE_OPS                                                                                      \
  /* -> {out (b,d,l) input dtype, gated by silu(z) if z; last_state (b,d,n) fp32; saved (backend-private) } */ \
  std::vector<at::Tensor> selective_scan_fwd(                                                                  \
      const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,                  \
      const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,             \
      const std::optional<at::Tensor>& delta_bias, bool delta_softplus,                                        \
      const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& seq_idx);               \
  /* -> {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state, out}; undefined (None) where absent; */ \
  /* out: with recompute_out, the forward's output recomputed (mamba-ssm's out_z: out_proj's weight grad) */  \
  std::vector<at::Tensor> selective_scan_bwd(                                                                  \
      const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,                  \
      const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,             \
      const std::optional<at::Tensor>& delta_bias, bool delta_softplus,                                        \
      const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& seq_idx,                \
      const at::Tensor& saved, const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state,           \
      bool deterministic, bool recompute_out);                                                                 \
  at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight,                                  \
                               const std::optional<at::Tensor>& bias,                                          \
                               const std::optional<at::Tensor>& initial_states,                                \
                               const std::optional<at::Tensor>& seq_idx, bool silu);                           \
  /* -> {dx, dweight, dbias, dinitial_states} */                                                               \
  std::vector<at::Tensor> causal_conv1d_bwd(const at::Tensor& x, const at::Tensor& weight,                     \
                                            const std::optional<at::Tensor>& bias,                             \
                                            const std::optional<at::Tensor>& initial_states,                   \
                                            const std::optional<at::Tensor>& seq_idx, const at::Tensor& dout,  \
                                            bool silu);                                                        \
  /* one decode step; state (b,d,n) updated in place -> out (b,d) */                                           \
  at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,         \
                                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,             \
                                    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,    \
                                    const std::optional<at::Tensor>& dt_bias, bool dt_softplus);               \
  /* one decode step; conv_state (b,d,w) shifted left, x appended, in place -> out (b,d) */                    \
  at::Tensor causal_conv1d_update(const at::Tensor& x, const at::Tensor& conv_state, const at::Tensor& weight,  \
                                  const std::optional<at::Tensor>& bias, bool silu);

namespace emma {
namespace cpu {
EMMA_DECLARE_OPS
}  // namespace cpu
#ifdef EMMA_WITH_CUDA
namespace cuda {
EMMA_DECLARE_OPS
}  // namespace cuda
#endif
}  // namespace emma
