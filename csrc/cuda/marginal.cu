// Marginal accumulation on CUDA (rules in csrc/common/marginal.h):
//
//   1. one block per row (b, n): rows of weight 0 exit at once; the others fold their logits
//      into softmax statistics, a 16-byte pack at a time (merge_stats across the block)
//   2. one block per (b, vocabulary tile): each thread owns one pack of vocabulary entries and
//      accumulates it over the live rows, loading several rows' packs before using them
// Both passes are memory-bound: 16-byte loads, several of them in flight per thread. Rows
// that are not 16-byte aligned (or a vocabulary not a multiple of the pack) take packs of one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include <cstdint>

#include "../common/marginal.h"
#include "graph_capture.h"

namespace mtp_ext {
namespace {

constexpr int kStatsThreads = 512;
constexpr int kAccumulateThreads = 128;
constexpr int kPackBytes = 16;
// Loads in flight per thread: packs of one row (statistics), rows of one pack (accumulation).
constexpr int kPacksInFlight = 4;
constexpr int kRowsInFlight = 4;

using BlockReduceStats = cub::BlockReduce<SoftmaxStats, kStatsThreads>;

struct MergeStats {
  __device__ SoftmaxStats operator()(const SoftmaxStats& a, const SoftmaxStats& b) const {
    return merge_stats(a, b);
  }
};

// kWidth consecutive logits, loaded in one access.
template <typename scalar_t, int kWidth>
struct alignas(sizeof(scalar_t) * kWidth) Pack {
  scalar_t values[kWidth];
};

template <typename scalar_t, int kWidth>
__device__ __forceinline__ Pack<scalar_t, kWidth> load_pack(const scalar_t* row, int64_t pack) {
  return reinterpret_cast<const Pack<scalar_t, kWidth>*>(row)[pack];
}

// Folds one pack into the running statistics; NaN and +inf only set has_bad_logit.
template <typename scalar_t, int kWidth>
__device__ __forceinline__ void add_pack(const Pack<scalar_t, kWidth>& pack, SoftmaxStats& stats,
                                         int& has_bad_logit) {
  float pack_max = -INFINITY;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    const float logit = static_cast<float>(pack.values[k]);
    has_bad_logit |= is_bad_logit(logit);
    pack_max = fmaxf(pack_max, logit);
  }
  if (pack_max == -INFINITY) return;
  float pack_sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    pack_sum += mtp_exp(static_cast<float>(pack.values[k]) - pack_max);
  }
  stats = merge_stats(stats, SoftmaxStats{pack_max, pack_sum});
}

template <typename scalar_t, int kWidth>
__global__ void __launch_bounds__(kStatsThreads)
    terms_kernel(const scalar_t* logits, LogitsView view, const float* weights, RowTerm* terms,
                 int* statuses) {
  __shared__ typename BlockReduceStats::TempStorage reduce;
  const int64_t row = blockIdx.x;
  const float weight = weights[row];
  if (weight == 0.0f || !is_valid_weight(weight)) {
    if (threadIdx.x == 0) {
      terms[row] = RowTerm{0.0f, 0.0f};
      statuses[row] = weight == 0.0f ? kRowOk : kRowBadWeight;
    }
    return;
  }
  const scalar_t* logit = logits_row(logits, view, row);
  const int64_t packs = view.vocab / kWidth;
  SoftmaxStats stats = empty_stats();
  int has_bad_logit = 0;
  for (int64_t first = threadIdx.x; first < packs; first += kStatsThreads * kPacksInFlight) {
    Pack<scalar_t, kWidth> loaded[kPacksInFlight];
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      const int64_t pack = first + u * kStatsThreads;
      if (pack < packs) loaded[u] = load_pack<scalar_t, kWidth>(logit, pack);
    }
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      if (first + u * kStatsThreads < packs) add_pack(loaded[u], stats, has_bad_logit);
    }
  }
  const bool row_has_bad_logit = __syncthreads_or(has_bad_logit) != 0;
  const SoftmaxStats row_stats = BlockReduceStats(reduce).Reduce(stats, MergeStats());
  if (threadIdx.x == 0) {
    statuses[row] = row_status(row_has_bad_logit, row_stats);
    terms[row] = statuses[row] == kRowOk ? row_term(weight, row_stats) : RowTerm{0.0f, 0.0f};
  }
}

template <typename scalar_t, int kWidth>
__global__ void __launch_bounds__(kAccumulateThreads)
    accumulate_kernel(const scalar_t* logits, LogitsView view, const float* weights,
                      const RowTerm* terms, int64_t tiles, float* out) {
  const int64_t b = blockIdx.x / tiles;
  const int64_t pack = (blockIdx.x - b * tiles) * kAccumulateThreads + threadIdx.x;
  if (pack >= view.vocab / kWidth) return;
  float accumulated[kWidth] = {};
  for (int64_t first = 0; first < view.candidates; first += kRowsInFlight) {
    Pack<scalar_t, kWidth> loaded[kRowsInFlight];
    bool live[kRowsInFlight];
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) {
      const int64_t row = b * view.candidates + first + r;
      live[r] = first + r < view.candidates && weights[row] != 0.0f;
      if (live[r]) loaded[r] = load_pack<scalar_t, kWidth>(logits_row(logits, view, row), pack);
    }
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) {
      if (!live[r]) continue;
      const RowTerm term = terms[b * view.candidates + first + r];
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        accumulated[k] = add_term(accumulated[k], term, static_cast<float>(loaded[r].values[k]));
      }
    }
  }
  float* out_pack = out + b * view.vocab + pack * kWidth;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) out_pack[k] = accumulated[k];
}

// Whether every row can be read in 16-byte packs: aligned starts, whole packs.
template <typename scalar_t>
bool rows_in_packs(const scalar_t* logits, const LogitsView& view) {
  constexpr int64_t width = kPackBytes / sizeof(scalar_t);
  return reinterpret_cast<std::uintptr_t>(logits) % kPackBytes == 0 && view.vocab % width == 0 &&
         view.batch_stride % width == 0 && view.candidate_stride % width == 0;
}

template <typename scalar_t, int kWidth>
void launch_kernels(const scalar_t* logits, const LogitsView& view, const float* weights,
                    RowTerm* terms, int* statuses, float* out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  terms_kernel<scalar_t, kWidth><<<view.batch * view.candidates, kStatsThreads, 0, stream>>>(
      logits, view, weights, terms, statuses);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t tile = kAccumulateThreads * kWidth;
  const int64_t tiles = (view.vocab + tile - 1) / tile;
  accumulate_kernel<scalar_t, kWidth><<<view.batch * tiles, kAccumulateThreads, 0, stream>>>(
      logits, view, weights, terms, tiles, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Reading the statuses synchronises, so it is skipped while a CUDA graph is captured.
void raise_bad_rows(const at::Tensor& statuses, const at::Tensor& weights, const char* op) {
  if (capturing_graph()) return;
  const at::Tensor host = statuses.cpu();
  check_marginal_rows(host.data_ptr<int>(), weights, host.numel(), op);
}

at::Tensor marginal_accumulate_cuda(const at::Tensor& weights_in, const at::Tensor& logits_in) {
  constexpr const char* op = "mtp_ext::marginal_accumulate";
  const MarginalInputs inputs = marginal_inputs(weights_in, logits_in, op);
  const c10::cuda::CUDAGuard guard(inputs.logits.device());
  const LogitsView& view = inputs.view;
  auto out = at::empty({view.batch, view.vocab}, inputs.logits.options().dtype(at::kFloat));
  const int64_t rows = view.batch * view.candidates;
  if (view.batch == 0) return out;
  if (rows == 0) return out.zero_();
  // RowTerm is two floats: the terms live in a float tensor [rows, 2].
  auto terms = at::empty({rows, 2}, out.options());
  auto statuses = at::empty({rows}, out.options().dtype(at::kInt));
  RowTerm* term_data = reinterpret_cast<RowTerm*>(terms.data_ptr<float>());
  const float* weights = inputs.weights.data_ptr<float>();
  int* status_data = statuses.data_ptr<int>();
  float* out_data = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, inputs.logits.scalar_type(), op, [&] {
    const scalar_t* logits = inputs.logits.data_ptr<scalar_t>();
    constexpr int kWidth = kPackBytes / sizeof(scalar_t);
    if (rows_in_packs(logits, view)) {
      launch_kernels<scalar_t, kWidth>(logits, view, weights, term_data, status_data, out_data);
    } else {
      launch_kernels<scalar_t, 1>(logits, view, weights, term_data, status_data, out_data);
    }
  });
  raise_bad_rows(statuses, inputs.weights, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("marginal_accumulate", &marginal_accumulate_cuda);
}

}  // namespace mtp_ext
