// Temporary placeholders, replaced by the real CPU kernels (selective_scan.cpp, causal_conv1d.cpp).
#include "../ops.h"
#include <torch/extension.h>
namespace emma { namespace cpu {
std::vector<at::Tensor> selective_scan_fwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) { TORCH_CHECK(false, "not implemented"); }
std::vector<at::Tensor> selective_scan_bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool) { TORCH_CHECK(false, "not implemented"); }
at::Tensor causal_conv1d_fwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool) { TORCH_CHECK(false, "not implemented"); }
std::vector<at::Tensor> causal_conv1d_bwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, bool) { TORCH_CHECK(false, "not implemented"); }
at::Tensor selective_state_update(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool) { TORCH_CHECK(false, "not implemented"); }
at::Tensor causal_conv1d_update(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool) { TORCH_CHECK(false, "not implemented"); }
}}
