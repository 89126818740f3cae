// Fused multi-head unembedding on the CPU (rules and host loops in csrc/common/multihead.h):
// the GEMM tiles run in MKL / oneDNN, and the per-row reductions below run in parallel over
// rows while a tile's logits are in cache.
//
//   top-k: per row, a tile's max and sum of exponentials (vectorised), then a scan that keeps
//     the candidates above the row's current k-th best key; when 2k have gathered, a selection
//     cuts them back to k and raises the threshold. Rows of a language model need few keeps
//     after the first tiles.
//   cross-entropy: per row, max, sum of exponentials, then (when a gradient is asked for) the
//     logits overwritten by coef * (softmax - onehot), all vectorised.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "../common/multihead.h"

namespace mtp_ext {
namespace {

// Candidates a row gathers before a selection cuts them back to k.
int64_t gather_capacity(int64_t k) { return std::max<int64_t>(2 * k, k + 256); }

template <typename acc_t>
acc_t row_max(const acc_t* row, int64_t width) {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : max)
  for (int64_t i = 0; i < width; ++i) max = std::max(max, row[i]);
  return max;
}

template <typename acc_t>
acc_t sum_exp_below(const acc_t* row, int64_t width, acc_t max) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < width; ++i) sum += exp_nonpositive(row[i] - max);
  return sum;
}

class TopkReducerCpu {
 public:
  TopkReducerCpu(int64_t rows, int64_t k)
      : k_(k), candidates_(rows), thresholds_(rows, kNoCandidate), stats_(rows, empty_stats()) {}

  void add_tile(const at::Tensor& logits, int64_t first_id) {
    const int64_t width = logits.size(1);
    const float* data = logits.data_ptr<float>();
    at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float* tile = data + row * width;
        const float max = row_max(tile, width);
        stats_[row] = merge_stats(stats_[row], SoftmaxStats{max, sum_exp_below(tile, width, max)});
        gather(row, tile, width, first_id);
      }
    });
  }

  void finish(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& lse) {
    float* value_data = values.data_ptr<float>();
    int64_t* id_data = ids.data_ptr<int64_t>();
    float* lse_data = lse.data_ptr<float>();
    at::parallel_for(0, values.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        std::vector<uint64_t>& keys = candidates_[row];
        std::partial_sort(keys.begin(), keys.begin() + k_, keys.end(), std::greater<uint64_t>());
        for (int64_t slot = 0; slot < k_; ++slot) {
          value_data[row * k_ + slot] = candidate_logit(keys[slot]);
          id_data[row * k_ + slot] = candidate_id(keys[slot]);
        }
        lse_data[row] = log_sum_exp(stats_[row]);
      }
    });
  }

 private:
  // Keeps the tile's candidates that beat the row's threshold.
  void gather(int64_t row, const float* tile, int64_t width, int64_t first_id) {
    std::vector<uint64_t>& keys = candidates_[row];
    uint64_t threshold = thresholds_[row];
    float floor = logit_floor(threshold);
    for (int64_t i = 0; i < width; ++i) {
      if (!(tile[i] >= floor)) continue;
      const uint64_t key = candidate_key(tile[i], first_id + i);
      if (key <= threshold) continue;
      keys.push_back(key);
      if (static_cast<int64_t>(keys.size()) >= gather_capacity(k_)) {
        threshold = cut_to_k(keys);
        floor = logit_floor(threshold);
      }
    }
    thresholds_[row] = threshold;
  }

  // Keeps the k largest keys and returns the smallest of them: later keys must beat it.
  uint64_t cut_to_k(std::vector<uint64_t>& keys) const {
    std::nth_element(keys.begin(), keys.begin() + (k_ - 1), keys.end(), std::greater<uint64_t>());
    keys.resize(k_);
    return keys[k_ - 1];
  }

  int64_t k_;
  std::vector<std::vector<uint64_t>> candidates_;
  std::vector<uint64_t> thresholds_;
  std::vector<SoftmaxStats> stats_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> multihead_unembed_topk_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, int64_t k) {
  check_unembed_topk_args(hidden, weight, k);
  TopkReducerCpu reducer(hidden.size(0) * hidden.size(1), k);
  const UnembedTopk out = unembed_topk(hidden, weight, k, reducer);
  return {out.values, out.ids, out.lse};
}

template <typename acc_t>
void reduce_cross_entropy_rows(acc_t* logits, int64_t count, int64_t vocab,
                               const int64_t* targets, const acc_t* coefs, acc_t* row_losses,
                               bool write_gradient, int64_t ignore_index) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t* logit = logits + row * vocab;
      const acc_t max = row_max(logit, vocab);
      const acc_t lse = max + std::log(sum_exp_below(logit, vocab, max));
      const int64_t target = targets[row];
      const bool scored = scored_target(target, vocab, ignore_index);
      row_losses[row] = scored ? lse - logit[target] : acc_t(0);
      if (!write_gradient) continue;
      const acc_t coef = coefs[row];
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) logit[v] = softmax_gradient(logit[v], lse, coef);
      if (scored) logit[target] -= coef;
    }
  });
}

using CrossEntropyTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

CrossEntropyTuple multihead_cross_entropy_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                              const at::Tensor& targets,
                                              const at::Tensor& head_weights, int64_t ignore_index,
                                              bool hidden_grad, bool weight_grad) {
  constexpr const char* op = "mtp_ext::multihead_cross_entropy";
  check_cross_entropy_args(hidden, weight, targets, head_weights, op);
  check_target_values(targets, weight.size(0), ignore_index, op);
  const auto reduce_rows = [&](at::Tensor& logits, const at::Tensor& chunk_targets,
                               const at::Tensor& coefs, const at::Tensor& row_losses,
                               bool write_gradient) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), op, [&] {
      reduce_cross_entropy_rows(logits.data_ptr<scalar_t>(), logits.size(0), logits.size(1),
                                chunk_targets.data_ptr<int64_t>(), coefs.data_ptr<scalar_t>(),
                                row_losses.data_ptr<scalar_t>(), write_gradient, ignore_index);
    });
  };
  CrossEntropyOutputs out = cross_entropy(hidden, weight, targets, head_weights, ignore_index,
                                          hidden_grad, weight_grad, reduce_rows);
  return {out.loss, out.head_losses, out.grad_hidden, out.grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("multihead_unembed_topk", &multihead_unembed_topk_cpu);
  m.impl("multihead_cross_entropy", &multihead_cross_entropy_cpu);
}

}  // namespace mtp_ext
