// Marginal accumulation (marginal_accumulate), written once for the CPU and the CUDA kernel:
//
//   out[b, :] = sum_n weights[b, n] * softmax(logits[b, n, :])
//
// in two reads of the live rows (weight > 0) and none of the others: per row an online
// softmax pass gives (max, sum of exp(x - max)), then out accumulates
// weight / sum * exp(x - max) row after row. Both backends use mtp_exp (csrc/common/top_p.h),
// so they round the exponentials identically; they add up the sums in different orders.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <math.h>

#include "top_p.h"  // MTP_HD, mtp_exp, kRow* statuses

namespace mtp_ext {

// A softmax's running statistics over some of a row's values: their max, and the sum of
// exp(x - max). No member initialisers: it also lives in CUDA shared memory.
struct SoftmaxStats {
  float max;
  float sum;
};

MTP_HD SoftmaxStats empty_stats() { return SoftmaxStats{-INFINITY, 0.0f}; }

// The statistics of the union of two disjoint parts of a row.
MTP_HD SoftmaxStats merge_stats(SoftmaxStats a, SoftmaxStats b) {
  const float max = fmaxf(a.max, b.max);
  if (max == -INFINITY) return empty_stats();  // exp(-inf - -inf) would be NaN
  return SoftmaxStats{max, a.sum * mtp_exp(a.max - max) + b.sum * mtp_exp(b.max - max)};
}

// One more value: a single exponential unless the max moves.
MTP_HD void add_logit(SoftmaxStats& stats, float logit) {
  if (logit > stats.max) {
    stats.sum = stats.sum * mtp_exp(stats.max - logit) + 1.0f;
    stats.max = logit;
  } else if (logit != -INFINITY) {
    stats.sum += mtp_exp(logit - stats.max);
  }
}

// A row whose weight is negative, NaN or infinite (found by the statistics pass, which reads
// every weight anyway, so that the checks cost no extra pass or synchronisation).
constexpr int kRowBadWeight = 3;

MTP_HD bool is_valid_weight(float weight) { return weight >= 0.0f && weight < INFINITY; }

MTP_HD bool is_bad_logit(float logit) { return logit != logit || logit == INFINITY; }

MTP_HD int row_status(bool has_bad_logit, SoftmaxStats stats) {
  if (has_bad_logit) return kRowHasNanOrPosInf;
  return stats.max == -INFINITY ? kRowAllNegInf : kRowOk;
}

// What a live row adds to the output: scale * exp(x - max), scale = weight / sum.
struct RowTerm {
  float max;
  float scale;
};

MTP_HD RowTerm row_term(float weight, SoftmaxStats stats) {
  return RowTerm{stats.max, weight / stats.sum};
}

MTP_HD float add_term(float accumulated, RowTerm term, float logit) {
  return fmaf(term.scale, mtp_exp(logit - term.max), accumulated);
}

// The logits as the kernels read them: [batch, candidates, vocab] with unit stride along vocab.
struct LogitsView {
  int64_t batch;
  int64_t candidates;
  int64_t vocab;
  int64_t batch_stride;
  int64_t candidate_stride;
};

// The logits of row = b * candidates + n.
template <typename scalar_t>
MTP_HD const scalar_t* logits_row(const scalar_t* logits, const LogitsView& view, int64_t row) {
  const int64_t b = row / view.candidates;
  const int64_t n = row - b * view.candidates;
  return logits + b * view.batch_stride + n * view.candidate_stride;
}

// ----------------------------------------------------------------------------- host side

inline void check_marginal_args(const at::Tensor& weights, const at::Tensor& logits,
                                const char* op) {
  TORCH_CHECK(weights.dim() == 2, op, ": weights must be 2-D [batch, candidates], got shape ",
              weights.sizes());
  TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": weights must be float32, got ",
              weights.scalar_type());
  TORCH_CHECK(logits.dim() == 3, op,
              ": logits must be 3-D [batch, candidates, vocab], got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.size(0) == weights.size(0) && logits.size(1) == weights.size(1), op,
              ": logits must have shape [batch, candidates, vocab] = [", weights.size(0), ", ",
              weights.size(1), ", vocab] (from weights), got ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1, op, ": logits must have at least one vocabulary entry");
  TORCH_CHECK(weights.device() == logits.device(), op, ": weights are on ", weights.device(),
              " but logits are on ", logits.device());
}

// statuses: int [B * N] on the CPU, kRowOk for rows of weight 0 (never read). The weights
// are read only to report a bad one.
inline void check_marginal_rows(const int* statuses, const at::Tensor& weights, int64_t rows,
                                const char* op) {
  const int64_t candidates = weights.size(1);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / candidates;
    const int64_t n = row % candidates;
    TORCH_CHECK(statuses[row] != kRowBadWeight, op,
                ": weights must be finite and >= 0, got weights[", b, ", ", n, "] = ",
                weights[b][n].item<float>());
    TORCH_CHECK(statuses[row] != kRowHasNanOrPosInf, op, ": logits[", b, ", ", n,
                "] holds NaN or +inf, and its weight is > 0");
    TORCH_CHECK(statuses[row] != kRowAllNegInf, op, ": logits[", b, ", ", n,
                "] is all -inf (no probability distribution), and its weight is > 0");
  }
}

struct MarginalInputs {
  at::Tensor weights;  // contiguous
  at::Tensor logits;   // unit stride along the vocabulary; any other strides
  LogitsView view;
};

// The inputs in the kernels' layout, after the checks that need no values.
inline MarginalInputs marginal_inputs(const at::Tensor& weights, const at::Tensor& logits,
                                      const char* op) {
  check_marginal_args(weights, logits, op);
  const at::Tensor readable = logits.stride(2) == 1 ? logits : logits.contiguous();
  const LogitsView view{readable.size(0), readable.size(1), readable.size(2), readable.stride(0),
                        readable.stride(1)};
  return MarginalInputs{weights.contiguous(), readable, view};
}

}  // namespace mtp_ext
