// Marginal accumulation on the CPU (rules in csrc/common/marginal.h):
//
//   1. per live row (b, n), in parallel over rows: the softmax statistics, one chunk at a time
//      (the chunk's max, then its sum of exponentials while the chunk is in L1)
//   2. in parallel over (b, vocabulary chunk): out[b, chunk] accumulates every live row's
//      term; the chunk of out stays in L1 while the rows stream past
// Both passes are vectorised loops around mtp_exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/marginal.h"

namespace mtp_ext {
namespace {

// Values per statistics chunk: 2 KiB of fp32, read twice from L1.
constexpr int64_t kStatsChunk = 512;
// Output floats per accumulation task: 8 KiB of out, well inside L1.
constexpr int64_t kOutChunk = 2048;

// Softmax statistics of one row, and whether it holds NaN or +inf (then it stops early).
template <typename scalar_t>
SoftmaxStats row_stats(const scalar_t* row, int64_t vocab, bool& has_bad_logit) {
  SoftmaxStats stats = empty_stats();
  for (int64_t begin = 0; begin < vocab; begin += kStatsChunk) {
    const int64_t end = std::min(begin + kStatsChunk, vocab);
    float chunk_max = -std::numeric_limits<float>::infinity();
    int bad = 0;
#pragma omp simd reduction(max : chunk_max) reduction(| : bad)
    for (int64_t i = begin; i < end; ++i) {
      const float logit = static_cast<float>(row[i]);
      chunk_max = std::max(chunk_max, logit);
      bad |= static_cast<int>(is_bad_logit(logit));
    }
    if (bad) {
      has_bad_logit = true;
      return stats;
    }
    if (chunk_max == -std::numeric_limits<float>::infinity()) continue;
    float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
    for (int64_t i = begin; i < end; ++i) {
      chunk_sum += mtp_exp(static_cast<float>(row[i]) - chunk_max);
    }
    stats = merge_stats(stats, SoftmaxStats{chunk_max, chunk_sum});
  }
  return stats;
}

// Pass 1: the term and status of every live row (rows of weight 0 are not read).
template <typename scalar_t>
void compute_terms(const scalar_t* logits, const LogitsView& view, const float* weights,
                   RowTerm* terms, int* statuses) {
  at::parallel_for(0, view.batch * view.candidates, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      terms[row] = RowTerm{0.0f, 0.0f};
      statuses[row] = is_valid_weight(weights[row]) ? kRowOk : kRowBadWeight;
      if (weights[row] == 0.0f || statuses[row] != kRowOk) continue;
      bool has_bad_logit = false;
      const SoftmaxStats stats =
          row_stats(logits_row(logits, view, row), view.vocab, has_bad_logit);
      statuses[row] = row_status(has_bad_logit, stats);
      if (statuses[row] == kRowOk) terms[row] = row_term(weights[row], stats);
    }
  });
}

// Pass 2: out[b, v] = sum over live rows n of term(n) at v.
template <typename scalar_t>
void accumulate_terms(const scalar_t* logits, const LogitsView& view, const float* weights,
                      const RowTerm* terms, float* out) {
  const int64_t chunks = (view.vocab + kOutChunk - 1) / kOutChunk;
  at::parallel_for(0, view.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t v_begin = (task - b * chunks) * kOutChunk;
      const int64_t width = std::min(kOutChunk, view.vocab - v_begin);
      float* acc = out + b * view.vocab + v_begin;
      std::fill(acc, acc + width, 0.0f);
      for (int64_t n = 0; n < view.candidates; ++n) {
        const int64_t row = b * view.candidates + n;
        if (weights[row] == 0.0f) continue;
        const RowTerm term = terms[row];
        const scalar_t* logit = logits_row(logits, view, row) + v_begin;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          acc[i] = add_term(acc[i], term, static_cast<float>(logit[i]));
        }
      }
    }
  });
}

at::Tensor marginal_accumulate_cpu(const at::Tensor& weights_in, const at::Tensor& logits_in) {
  constexpr const char* op = "mtp_ext::marginal_accumulate";
  const MarginalInputs inputs = marginal_inputs(weights_in, logits_in, op);
  const LogitsView& view = inputs.view;
  auto out = at::empty({view.batch, view.vocab}, inputs.logits.options().dtype(at::kFloat));
  const int64_t rows = view.batch * view.candidates;
  std::vector<RowTerm> terms(rows);
  std::vector<int> statuses(rows);
  const float* weights = inputs.weights.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, inputs.logits.scalar_type(), op, [&] {
    const scalar_t* logits = inputs.logits.data_ptr<scalar_t>();
    compute_terms(logits, view, weights, terms.data(), statuses.data());
    check_marginal_rows(statuses.data(), inputs.weights, rows, op);
    accumulate_terms(logits, view, weights, terms.data(), out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("marginal_accumulate", &marginal_accumulate_cpu);
}

}  // namespace mtp_ext
