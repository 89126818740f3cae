// small_batch_linear: input [M, K] @ weight[N, K].T (+ bias [N]) for the few rows of a draft
// tree's verification pass, where a GEMM library's small-M path reads the weights far below
// memory speed (bench/README.md, small_batch_linear). Argument checks shared by the CPU and
// CUDA entry points.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

namespace mtp_ext {

inline void check_small_batch_linear_args(const at::Tensor& input, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "mtp_ext::small_batch_linear";
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D [rows, in_features], got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
              weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), op, ": input has ", input.size(1),
              " features but weight expects ", weight.size(1));
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, op,
              ": input and weight must be float32, got ", input.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(), op, ": input is on ", input.device(),
              " but weight is on ", weight.device());
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
              ": bias must have shape [out_features] = [", weight.size(0), "], got ", bias->sizes());
  TORCH_CHECK(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ",
              bias->scalar_type());
  TORCH_CHECK(bias->device() == weight.device(), op, ": bias is on ", bias->device(),
              " but weight is on ", weight.device());
}

}  // namespace mtp_ext
