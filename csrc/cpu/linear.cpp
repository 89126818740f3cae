// small_batch_linear on the CPU. With a handful of rows the product is bound by reading the
// weights, yet MKL's small-M GEMM (and even its GEMV) streams them at well under memory speed,
// so dot_rows.h streams the weights instead (bench/README.md, small_batch_linear); output
// features are split over threads.
#include <ATen/Parallel.h>

#include "../common/linear.h"
#include "dot_rows.h"

namespace mtp_ext {
namespace {

constexpr int64_t kFeaturesPerTask = 64;

at::Tensor small_batch_linear_cpu(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  check_small_batch_linear_args(input, weight, bias);
  const int64_t count = input.size(0);
  const int64_t in_features = input.size(1);
  const int64_t out_features = weight.size(0);
  const at::Tensor rows = input.contiguous();
  const at::Tensor weight_rows = weight.contiguous();
  at::Tensor out = at::empty({count, out_features}, input.options());
  const float* row_data = rows.data_ptr<float>();
  const float* weight_data = weight_rows.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, out_features, kFeaturesPerTask, [&](int64_t begin, int64_t end) {
    dot_rows(row_data, count, weight_data, in_features, begin, end, out_data, out_features, 1);
  });
  if (bias.has_value()) out.add_(*bias);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("small_batch_linear", &small_batch_linear_cpu);
}

}  // namespace mtp_ext
