// Fused multi-head unembedding on the CPU (rules and host loops in csrc/common/multihead.h):
// the GEMM tiles run in MKL / oneDNN, and the per-row reductions below run in parallel over
// rows while a tile's logits are in cache.
//
//   top-k: tiles in parallel (one GEMM and reduction per tile and thread); per row, a tile's
//     max and sum of exponentials (vectorised across rows), then a scan that keeps the
//     candidates above the row's current k-th best key; when 2k have gathered, a selection
//     cuts them back to k and raises the threshold. Few candidates pass after the first tiles.
//   cross-entropy: per row, max, sum of exponentials, then (when a gradient is asked for) the
//     logits overwritten by coef * (softmax - onehot), all vectorised.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <vector>

#include "../common/multihead.h"
#include "dot_rows.h"

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

// Running top-k candidates of every row, over a thread's run of tile groups.
struct TopkState {
  std::vector<std::vector<uint64_t>> candidates;  // keys above threshold, per row
  std::vector<uint64_t> thresholds;                // each row's k-th best key so far

  explicit TopkState(int64_t rows) : candidates(rows), thresholds(rows, kNoCandidate) {}
};

// The tiles run in parallel, in groups of consecutive tiles, each thread's run of groups with its
// own candidates and single-threaded GEMMs (one parallel region per call: a shared machine
// delays every region's slowest thread). A tile's logits are vocabulary-major, [width, rows]
// (MKL computes weight_tile @ rows.T faster than its transpose here), so one vector holds
// kRowBlock rows' logits of one token: the reductions walk a block of rows kStatsChunk tokens
// at a time, maxima and sums in registers. finish merges the runs' candidates and the groups'
// statistics in group order. The groups do not depend on the thread count, so neither does
// any bit of the result: the candidate keys are exact, and the floating-point statistics are
// summed in one order.
class TopkReducerCpu {
 public:
  TopkReducerCpu(int64_t rows, int64_t k)
      : rows_(rows), stride_((rows + kRowBlock - 1) / kRowBlock * kRowBlock), k_(k) {}

  void add_tiles(const at::Tensor& rows, const at::Tensor& weight, const VocabTiles& tiles) {
    // Zero rows pad the GEMM to whole blocks: the lane loops are one full vector.
    at::Tensor padded_rows = at::zeros({stride_, rows.size(1)}, rows.options().dtype(at::kFloat));
    padded_rows.narrow(0, 0, rows_).copy_(rows);
    const int64_t groups = std::min(tiles.count, kTileGroups);
    const int64_t tiles_per_group = (tiles.count + groups - 1) / groups;
    states_.resize(groups);
    group_stats_.assign(groups, std::vector<SoftmaxStats>(rows_, empty_stats()));
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      // Keyed by the run's first group: right however the runs are spread over threads.
      states_[begin] = std::make_unique<TopkState>(rows_);
      TopkState& state = *states_[begin];
      for (int64_t group = begin; group < end; ++group) {
        const int64_t last_tile = std::min(tiles.count, (group + 1) * tiles_per_group);
        for (int64_t tile = group * tiles_per_group; tile < last_tile; ++tile) {
          const at::Tensor weight_rows = tiles.weight_rows(weight, tile).to(at::kFloat).contiguous();
          const at::Tensor logits = tile_logits(weight_rows, padded_rows);
          add_tile(logits.data_ptr<float>(), logits.size(0), tiles.first_id(tile), state,
                   group_stats_[group]);
        }
      }
    });
  }

  void finish(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& lse) {
    float* value_data = values.data_ptr<float>();
    int64_t* id_data = ids.data_ptr<int64_t>();
    float* lse_data = lse.data_ptr<float>();
    at::parallel_for(0, rows_, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> keys;
      for (int64_t row = begin; row < end; ++row) {
        keys.clear();
        SoftmaxStats stats = empty_stats();
        for (const std::unique_ptr<TopkState>& state : states_) {
          if (!state) continue;
          keys.insert(keys.end(), state->candidates[row].begin(), state->candidates[row].end());
        }
        for (const std::vector<SoftmaxStats>& group : group_stats_) stats = merge_stats(stats, group[row]);
        // Every logit, NaN and -inf included, is a candidate until k are kept, and k <= V.
        TORCH_INTERNAL_ASSERT(static_cast<int64_t>(keys.size()) >= k_, "row ", row, " kept ",
                              keys.size(), " candidates for k = ", k_);
        std::partial_sort(keys.begin(), keys.begin() + k_, keys.end(), std::greater<uint64_t>());
        for (int64_t slot = 0; slot < k_; ++slot) {
          value_data[row * k_ + slot] = candidate_logit(keys[slot]);
          id_data[row * k_ + slot] = candidate_id(keys[slot]);
        }
        lse_data[row] = row_log_sum_exp(stats, keys[0]);
      }
    });
  }

 private:
  // One AVX-512 vector of rows; tokens per statistics chunk (32 KiB of logits, in L1).
  static constexpr int64_t kRowBlock = 16;
  static constexpr int64_t kStatsChunk = 512;
  // Up to this many rows (a drafter's few heads at one position) the product runs in dot_rows
  // (bench/README.md, multihead_unembed_topk).
  static constexpr int64_t kFewRows = 8;
  // Tile groups: the unit of parallel work, enough to keep many cores busy.
  static constexpr int64_t kTileGroups = 64;

  // logits [width, stride_] of a weight tile [width, H]: for few rows the tile's rows are streamed
  // once (dot_rows.h), as MKL's GEMM over so thin a matrix reads them far below memory speed;
  // else a GEMM.
  at::Tensor tile_logits(const at::Tensor& weight_rows, const at::Tensor& padded_rows) const {
    if (rows_ > kFewRows) return at::mm(weight_rows, padded_rows.t());
    at::Tensor logits = at::zeros({weight_rows.size(0), stride_}, padded_rows.options());
    dot_rows(padded_rows.data_ptr<float>(), rows_, weight_rows.data_ptr<float>(), weight_rows.size(1), 0,
             weight_rows.size(0), logits.data_ptr<float>(), 1, stride_);
    return logits;
  }

  // logits [width, stride_] of tokens first_id.. into `state` and the group's `stats`.
  void add_tile(const float* logits, int64_t width, int64_t first_id, TopkState& state,
                std::vector<SoftmaxStats>& stats) const {
    for (int64_t first_row = 0; first_row < rows_; first_row += kRowBlock) {
      const int64_t count = std::min(kRowBlock, rows_ - first_row);
      for (int64_t v = 0; v < width; v += kStatsChunk) {
        const int64_t tokens = std::min(kStatsChunk, width - v);
        const float* chunk = logits + v * stride_ + first_row;
        add_stats(chunk, tokens, first_row, count, stats);
        gather(chunk, tokens, first_row, count, first_id + v, state);
      }
    }
  }

  // chunk[t * stride_ + r]: token t of the chunk, row first_row + r (rows from `count` on are
  // padding: computed, never kept).
  void add_stats(const float* chunk, int64_t tokens, int64_t first_row, int64_t count,
                 std::vector<SoftmaxStats>& row_stats) const {
    float max[kRowBlock];
    float sum[kRowBlock] = {};
    std::fill(max, max + kRowBlock, -std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < tokens; ++t) {
#pragma omp simd
      for (int64_t r = 0; r < kRowBlock; ++r) max[r] = std::max(max[r], chunk[t * stride_ + r]);
    }
    for (int64_t t = 0; t < tokens; ++t) {
#pragma omp simd
      for (int64_t r = 0; r < kRowBlock; ++r) sum[r] += mtp_exp(chunk[t * stride_ + r] - max[r]);
    }
    for (int64_t r = 0; r < count; ++r) {
      SoftmaxStats& stats = row_stats[first_row + r];
      stats = merge_stats(stats, SoftmaxStats{max[r], sum[r]});
    }
  }

  // Keeps the candidates that beat their row's threshold.
  void gather(const float* chunk, int64_t tokens, int64_t first_row, int64_t count,
              int64_t first_id, TopkState& state) const {
    float floor[kRowBlock];
    std::fill(floor, floor + kRowBlock, std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < count; ++r) floor[r] = logit_floor(state.thresholds[first_row + r]);
    for (int64_t t = 0; t < tokens; ++t) {
      const float* token = chunk + t * stride_;
      int any_passes = 0;
#pragma omp simd reduction(| : any_passes)
      for (int64_t r = 0; r < kRowBlock; ++r) any_passes |= static_cast<int>(may_beat(token[r], floor[r]));
      if (!any_passes) continue;
      for (int64_t r = 0; r < count; ++r) {
        if (!may_beat(token[r], floor[r])) continue;
        const int64_t row = first_row + r;
        const uint64_t key = candidate_key(token[r], first_id + t);
        if (key <= state.thresholds[row]) continue;
        state.candidates[row].push_back(key);
        if (static_cast<int64_t>(state.candidates[row].size()) >= gather_capacity(k_)) {
          state.thresholds[row] = cut_to_k(state.candidates[row]);
          floor[r] = logit_floor(state.thresholds[row]);
        }
      }
    }
  }

  // Keeps the k largest keys and returns the smallest of them: later keys must beat it.
  uint64_t cut_to_k(std::vector<uint64_t>& keys) const {
    std::nth_element(keys.begin(), keys.begin() + (k_ - 1), keys.end(), std::greater<uint64_t>());
    keys.resize(k_);
    return keys[k_ - 1];
  }

  int64_t rows_;
  int64_t stride_;  // rows padded to whole blocks: the logits' row stride
  int64_t k_;
  std::vector<std::unique_ptr<TopkState>> states_;  // one per run of groups, at its first group
  std::vector<std::vector<SoftmaxStats>> group_stats_;  // [group][row]
};

UnembedTopk multihead_unembed_topk_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, int64_t k) {
  check_unembed_topk_args(hidden, weight, k);
  TopkReducerCpu reducer(hidden.size(0) * hidden.size(1), k);
  return unembed_topk(hidden, weight, k, reducer);
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

CrossEntropyOutputs multihead_cross_entropy_cpu(const at::Tensor& hidden, const at::Tensor& weight,
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
  return cross_entropy(hidden, weight, targets, head_weights, ignore_index, hidden_grad,
                       weight_grad, reduce_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("multihead_unembed_topk", &multihead_unembed_topk_cpu);
  m.impl("multihead_cross_entropy", &multihead_cross_entropy_cpu);
}

}  // namespace mtp_ext
