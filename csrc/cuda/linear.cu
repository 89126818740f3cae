// small_batch_linear on CUDA: cuBLAS already reads the weights at memory speed for a few rows,
// so the op is at::linear there (same checks, same results up to rounding).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/linear.h"

namespace mtp_ext {
namespace {

at::Tensor small_batch_linear_cuda(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  check_small_batch_linear_args(input, weight, bias);
  return at::linear(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("small_batch_linear", &small_batch_linear_cuda);
}

}  // namespace mtp_ext
