// Input checks shared by the CPU and CUDA entry points: every message names the op, the
// argument and what was expected.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>

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

// Everything about the top-p ops' arguments; `check_values` reads top_p (see above).
inline void check_top_p_candidates_args(const at::Tensor& logits, const at::Tensor& top_p,
                                        int64_t max_candidates, double temperature,
                                        bool check_values) {
  constexpr const char* op = "mtp_ext::top_p_candidates";
  check_logits(logits, op);
  check_top_p_tensor(top_p, logits, op);
  TORCH_CHECK(max_candidates >= 1, op, ": max_candidates must be >= 1, got ", max_candidates);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op,
              ": temperature must be a finite number > 0, got ", temperature);
  if (check_values) check_top_p_values(top_p, op);
}

inline void check_top_p_mask_args(const at::Tensor& logits, const at::Tensor& top_p,
                                  int64_t min_tokens_to_keep, bool check_values) {
  constexpr const char* op = "mtp_ext::top_p_mask";
  check_logits(logits, op);
  check_top_p_tensor(top_p, logits, op);
  TORCH_CHECK(min_tokens_to_keep >= 1, op, ": min_tokens_to_keep must be >= 1, got ",
              min_tokens_to_keep);
  if (check_values) check_top_p_values(top_p, op);
}

// The kernels read rows with unit stride along the vocabulary; any row stride is fine.
inline at::Tensor with_unit_vocab_stride(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

inline void check_row_status(int status, int64_t row, const char* op) {
  TORCH_CHECK(status != kRowHasNanOrPosInf, op, ": row ", row,
              " of logits holds NaN or +inf");
  TORCH_CHECK(status != kRowAllNegInf, op, ": row ", row,
              " of logits is all -inf, so it has no probability distribution");
}

}  // namespace mtp_ext
