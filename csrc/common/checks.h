// Input checks shared by the CPU and CUDA entry points: every message names the op, the
// argument and what was expected.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include "top_p.h"

namespace mtp_ext {

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [batch, vocab], got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one vocabulary entry");
  TORCH_CHECK(logits.size(1) <= kMaxVocab, op, ": vocabulary of ", logits.size(1),
              " is above the supported maximum of ", kMaxVocab);
}

// Shape, dtype and device of top_p; its values are checked by check_top_p_values.
inline void check_top_p_tensor(const at::Tensor& top_p, const at::Tensor& logits,
                               const char* op) {
  TORCH_CHECK(top_p.scalar_type() == at::kFloat, op, ": top_p must be a float32 tensor, got ",
              top_p.scalar_type());
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == logits.size(0), op,
              ": top_p must have shape [batch] = [", logits.size(0), "], got ", top_p.sizes());
  TORCH_CHECK(top_p.device() == logits.device(), op, ": top_p is on ", top_p.device(),
              " but logits are on ", logits.device());
}

// Reads the values, so on CUDA it synchronises: callers skip it while a graph is captured.
inline void check_top_p_values(const at::Tensor& top_p, const char* op) {
  if (top_p.numel() == 0) return;
  const bool in_range = ((top_p > 0) & (top_p <= 1)).all().item<bool>();
  TORCH_CHECK(in_range, op, ": every top_p must lie in (0, 1], got min ",
              top_p.min().item<float>(), ", max ", top_p.max().item<float>(),
              " (NaN also fails)");
}

inline void check_row_status(int status, int64_t row, const char* op) {
  TORCH_CHECK(status != kRowHasNanOrPosInf, op, ": row ", row,
              " of logits holds NaN or +inf");
  TORCH_CHECK(status != kRowAllNegInf, op, ": row ", row,
              " of logits is all -inf, so it has no probability distribution");
}

}  // namespace mtp_ext
