// Fused multi-head unembedding on CUDA (rules and host loops in csrc/common/multihead.h): the
// GEMM tiles run in cuBLAS (at::mm), the per-row reductions in the kernels below.
//
//   top-k: per tile, one block per row folds the tile's logits into the row's softmax
//     statistics and writes each logit as a candidate key (logit, then lower id: unique per
//     row) after the row's running k best keys; at::topk on those distinct integers then keeps
//     the k best, so no tie is ever left to the selection. A last kernel decodes the keys.
//   cross-entropy: one block per row: max, sum of exponentials, then (when a gradient is asked
//     for) the logits overwritten by coef * (softmax - onehot).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>
#include <torch/version.h>

#include <limits>

#include "../common/multihead.h"
#include "graph_capture.h"

namespace mtp_ext {
namespace {

constexpr int kRowThreads = 256;
constexpr int kDecodeThreads = 256;

struct MergeStats {
  __device__ SoftmaxStats operator()(const SoftmaxStats& a, const SoftmaxStats& b) const {
    return merge_stats(a, b);
  }
};

struct Max {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a > b ? a : b;
  }
};

// Row `blockIdx.x` of a tile: its statistics merged into stats[row], its candidate keys written
// to keys[row, k + i] (keys[row, :k] hold the running best).
__global__ void __launch_bounds__(kRowThreads)
    topk_tile_kernel(const float* logits, int64_t width, int64_t first_id, int64_t k,
                     SoftmaxStats* stats, int64_t* keys) {
  using BlockReduceStats = cub::BlockReduce<SoftmaxStats, kRowThreads>;
  __shared__ typename BlockReduceStats::TempStorage reduce;
  const int64_t row = blockIdx.x;
  const float* logit = logits + row * width;
  int64_t* row_keys = keys + row * (k + width) + k;
  SoftmaxStats local = empty_stats();
  for (int64_t i = threadIdx.x; i < width; i += kRowThreads) {
    const float value = logit[i];
    add_logit(local, value);
    row_keys[i] = signed_candidate_key(candidate_key(value, first_id + i));
  }
  const SoftmaxStats tile = BlockReduceStats(reduce).Reduce(local, MergeStats());
  if (threadIdx.x == 0) stats[row] = merge_stats(stats[row], tile);
}

__global__ void decode_kernel(const int64_t* keys, const SoftmaxStats* stats, int64_t rows,
                              int64_t k, float* values, int64_t* ids, float* lse) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kDecodeThreads + threadIdx.x;
  if (slot >= rows * k) return;
  const uint64_t key = unsigned_candidate_key(keys[slot]);
  values[slot] = candidate_logit(key);
  ids[slot] = candidate_id(key);
  if (slot % k == 0) lse[slot / k] = row_log_sum_exp(stats[slot / k], key);
}

// float32 logits [rows, width] (a block reads a row). bf16 / fp16 inputs go straight into
// float32 through cuBLAS (mm.dtype, torch >= 2.8): their products are exact in float32 and the
// sums are float32, so this is the float32 computation without converting the weight.
at::Tensor tile_logits(const at::Tensor& rows, const at::Tensor& weight_rows) {
  if (rows.scalar_type() == at::kFloat) return at::mm(rows, weight_rows.t());
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  return at::mm(rows, weight_rows.t(), at::kFloat);
#else
  return at::mm(rows.to(at::kFloat), weight_rows.to(at::kFloat).t());
#endif
}

class TopkReducerCuda {
 public:
  TopkReducerCuda(int64_t rows, int64_t k, const at::TensorOptions& options)
      : rows_(rows),
        k_(k),
        best_(at::full({rows, k}, std::numeric_limits<int64_t>::min(), options.dtype(at::kLong))),
        // SoftmaxStats is two floats: the statistics live in a float tensor [rows, 2].
        stats_(at::empty({rows, 2}, options.dtype(at::kFloat))) {
    stats_.select(1, 0).fill_(-std::numeric_limits<float>::infinity());
    stats_.select(1, 1).zero_();
  }

  void add_tiles(const at::Tensor& rows, const at::Tensor& weight, const VocabTiles& tiles) {
    for (int64_t tile = 0; tile < tiles.count; ++tile) {
      add_tile(tile_logits(rows, tiles.weight_rows(weight, tile)), tiles.first_id(tile));
    }
  }

  void add_tile(const at::Tensor& logits, int64_t first_id) {
    const int64_t width = logits.size(1);
    at::Tensor keys = at::empty({rows_, k_ + width}, best_.options());
    keys.narrow(1, 0, k_).copy_(best_);
    topk_tile_kernel<<<rows_, kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<float>(), width, first_id, k_, stats(), keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Distinct keys: the k largest are one set whatever the selection's order.
    best_ = std::get<0>(at::topk(keys, k_, 1, /*largest=*/true, /*sorted=*/true)).contiguous();
  }

  void finish(const at::Tensor& values, const at::Tensor& ids, const at::Tensor& lse) {
    const int64_t slots = rows_ * k_;
    const int64_t blocks = (slots + kDecodeThreads - 1) / kDecodeThreads;
    decode_kernel<<<blocks, kDecodeThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        best_.data_ptr<int64_t>(), stats(), rows_, k_, values.data_ptr<float>(),
        ids.data_ptr<int64_t>(), lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  SoftmaxStats* stats() { return reinterpret_cast<SoftmaxStats*>(stats_.data_ptr<float>()); }

  int64_t rows_;
  int64_t k_;
  at::Tensor best_;  // [rows, k] int64 signed candidate keys, descending
  at::Tensor stats_;
};

UnembedTopk multihead_unembed_topk_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, int64_t k) {
  check_unembed_topk_args(hidden, weight, k);
  const c10::cuda::CUDAGuard guard(hidden.device());
  TopkReducerCuda reducer(hidden.size(0) * hidden.size(1), k, hidden.options());
  return unembed_topk(hidden, weight, k, reducer);
}

// Row `blockIdx.x` of a chunk (see reduce_rows in csrc/common/multihead.h).
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    cross_entropy_rows_kernel(acc_t* logits, int64_t vocab, const int64_t* targets,
                              const acc_t* coefs, acc_t* row_losses, bool write_gradient,
                              int64_t ignore_index) {
  using BlockReduce = cub::BlockReduce<acc_t, kRowThreads>;
  __shared__ typename BlockReduce::TempStorage reduce;
  __shared__ acc_t shared_max;
  const int64_t row = blockIdx.x;
  acc_t* logit = logits + row * vocab;
  acc_t local_max = -INFINITY;
  for (int64_t v = threadIdx.x; v < vocab; v += kRowThreads) local_max = fmax(local_max, logit[v]);
  const acc_t max = BlockReduce(reduce).Reduce(local_max, Max());
  if (threadIdx.x == 0) shared_max = max;
  __syncthreads();
  acc_t local_sum = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += kRowThreads) {
    local_sum += exp_nonpositive(logit[v] - shared_max);
  }
  const acc_t sum = BlockReduce(reduce).Sum(local_sum);
  __shared__ acc_t shared_lse;
  const int64_t target = targets[row];
  const bool scored = scored_target(target, vocab, ignore_index);
  if (threadIdx.x == 0) {
    shared_lse = shared_max + log(sum);
    row_losses[row] = scored ? shared_lse - logit[target] : acc_t(0);
  }
  __syncthreads();  // logit[target] is read before it is overwritten
  if (!write_gradient) return;
  const acc_t coef = coefs[row];
  for (int64_t v = threadIdx.x; v < vocab; v += kRowThreads) {
    const acc_t one_hot = scored && v == target ? coef : acc_t(0);
    logit[v] = softmax_gradient(logit[v], shared_lse, coef) - one_hot;
  }
}

CrossEntropyOutputs multihead_cross_entropy_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& targets,
                                               const at::Tensor& head_weights,
                                               int64_t ignore_index, bool hidden_grad,
                                               bool weight_grad) {
  constexpr const char* op = "mtp_ext::multihead_cross_entropy";
  check_cross_entropy_args(hidden, weight, targets, head_weights, op);
  const c10::cuda::CUDAGuard guard(hidden.device());
  // Reading the targets synchronises: skipped while a CUDA graph is captured (the kernel then
  // scores an out-of-range target as ignored).
  if (!capturing_graph()) check_target_values(targets, weight.size(0), ignore_index, op);
  const auto reduce_rows = [&](at::Tensor& logits, const at::Tensor& chunk_targets,
                               const at::Tensor& coefs, const at::Tensor& row_losses,
                               bool write_gradient) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), op, [&] {
      cross_entropy_rows_kernel<scalar_t>
          <<<logits.size(0), kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              logits.data_ptr<scalar_t>(), logits.size(1), chunk_targets.data_ptr<int64_t>(),
              coefs.data_ptr<scalar_t>(), row_losses.data_ptr<scalar_t>(), write_gradient,
              ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  return cross_entropy(hidden, weight, targets, head_weights, ignore_index, hidden_grad,
                       weight_grad, reduce_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("multihead_unembed_topk", &multihead_unembed_topk_cuda);
  m.impl("multihead_cross_entropy", &multihead_cross_entropy_cuda);
}

}  // namespace mtp_ext
