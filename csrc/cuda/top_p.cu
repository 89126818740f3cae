// Sort-free top-p on CUDA: one block per row, the selection rule of csrc/common/top_p.h.
//
//   1. max logit and validity, 2. total integer mass (block reductions),
//   3. four radix levels of 8 bits over the tokens above the mass cutoff, each a shared-memory
//      histogram of counts and integer masses (integer atomics: deterministic),
//   4. an ordered compaction (block scans) writes the selected tokens, or the mask.
// top_p_candidates then sorts the at most max_candidates selected tokens per row with a stable
// segmented sort of their logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <cmath>

#include "../common/checks.h"
#include "../common/top_p.h"
#include "graph_capture.h"

namespace mtp_ext {
namespace {

constexpr int kThreads = 512;
// Four levels of 256 buckets: two shared-memory histograms of 2 KiB.
constexpr int kRadixBits = 8;
constexpr int kRadixBuckets = 1 << kRadixBits;
constexpr int kRadixLevels = 32 / kRadixBits;

using BlockReduceFloat = cub::BlockReduce<float, kThreads>;
using BlockReduceU64 = cub::BlockReduce<unsigned long long, kThreads>;
using BlockScanInt = cub::BlockScan<int, kThreads>;
using BlockSortFloat = cub::BlockRadixSort<float, kThreads, 1>;

// cub::Max left CCCL 3; a functor of our own builds with CUDA 12 and 13 alike.
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct SharedState {
  union {
    typename BlockReduceFloat::TempStorage reduce_float;
    typename BlockReduceU64::TempStorage reduce_u64;
    typename BlockScanInt::TempStorage scan;
    typename BlockSortFloat::TempStorage sort;
  } temp;
  unsigned long long bucket_counts[kRadixBuckets];
  unsigned long long bucket_masses[kRadixBuckets];
  float max_logit;
  float count_cutoff;
  unsigned long long total_mass;
  int status;
  uint32_t prefix;
  int chosen_bucket;
  SelectState above;
};

struct RowSelection {
  int status;
  float max_logit;
  uint64_t total_mass;
  uint32_t threshold_key;
  int64_t ties_taken;
  uint64_t tie_mass;
  SelectState above;
};

template <typename scalar_t>
__device__ __forceinline__ float load_scaled(const scalar_t* row, int64_t i, float temperature) {
  return scaled_logit(static_cast<float>(row[i]), temperature);
}

// Steps 1-3 for the row; every thread returns the same selection.
template <typename scalar_t>
__device__ RowSelection select_row(const scalar_t* row, int64_t vocab, float temperature,
                                   float top_p, StopRule rule, bool prune, SharedState& shared) {
  const int tid = threadIdx.x;
  RowSelection selection{};

  float local_max = -INFINITY;
  int local_invalid = 0;
  for (int64_t i = tid; i < vocab; i += kThreads) {
    const float s = load_scaled(row, i, temperature);
    local_max = fmaxf(local_max, s);
    local_invalid |= (s != s) | (s == INFINITY);
  }
  const float row_max = BlockReduceFloat(shared.temp.reduce_float).Reduce(local_max, MaxOp());
  __syncthreads();
  const float any_invalid =
      BlockReduceFloat(shared.temp.reduce_float).Reduce(static_cast<float>(local_invalid), MaxOp());
  if (tid == 0) {
    shared.max_logit = row_max;
    shared.status = any_invalid > 0.0f ? kRowHasNanOrPosInf
                    : row_max == -INFINITY ? kRowAllNegInf
                                           : kRowOk;
  }
  __syncthreads();
  selection.status = shared.status;
  selection.max_logit = shared.max_logit;
  if (selection.status != kRowOk) return selection;

  unsigned long long local_mass = 0;
  for (int64_t i = tid; i < vocab; i += kThreads) {
    local_mass += quantize_mass(mtp_exp(load_scaled(row, i, temperature) - selection.max_logit));
  }
  const unsigned long long row_mass = BlockReduceU64(shared.temp.reduce_u64).Sum(local_mass);
  if (tid == 0) shared.total_mass = row_mass;
  __syncthreads();
  selection.total_mass = shared.total_mass;
  rule.target_mass = mass_target(top_p, selection.total_mass);
  float cutoff =
      prune ? mass_cutoff_logit(selection.max_logit,
                                static_cast<double>(selection.total_mass) / kMassScale, vocab, top_p)
            : -INFINITY;
  if (prune && rule.cap <= kThreads) {
    // The threads' own maxima are distinct tokens: at least `cap` tokens lie at or above the
    // cap-th largest of them. On flat rows this keeps the histograms' atomics few.
    float thread_max[1] = {local_max};
    BlockSortFloat(shared.temp.sort).SortDescending(thread_max);
    if (tid == rule.cap - 1) shared.count_cutoff = thread_max[0];
    __syncthreads();
    cutoff = fmaxf(cutoff, shared.count_cutoff);
  }

  if (tid == 0) {
    shared.prefix = 0;
    shared.above = SelectState{};
  }
  for (int level = 0; level < kRadixLevels; ++level) {
    for (int bucket = tid; bucket < kRadixBuckets; bucket += kThreads) {
      shared.bucket_counts[bucket] = 0;
      shared.bucket_masses[bucket] = 0;
    }
    __syncthreads();
    const RadixLevel radix{32 - kRadixBits * (level + 1), kRadixBits};
    const uint32_t mask = radix_prefix_mask(radix);
    const uint32_t prefix = shared.prefix;
    for (int64_t i = tid; i < vocab; i += kThreads) {
      const float s = load_scaled(row, i, temperature);
      if (s < cutoff) continue;
      const uint32_t key = order_key(s);
      if ((key & mask) != prefix) continue;
      const int bucket = radix_digit(key, radix);
      atomicAdd(&shared.bucket_counts[bucket], 1ull);
      atomicAdd(&shared.bucket_masses[bucket],
                static_cast<unsigned long long>(quantize_mass(mtp_exp(s - selection.max_logit))));
    }
    __syncthreads();
    if (tid == 0) {
      const int chosen = choose_bucket(reinterpret_cast<const int64_t*>(shared.bucket_counts),
                                       reinterpret_cast<const uint64_t*>(shared.bucket_masses),
                                       kRadixBuckets, rule, shared.above);
      shared.chosen_bucket = chosen;
      shared.prefix |= static_cast<uint32_t>(chosen) << radix.shift;
    }
    __syncthreads();
  }
  selection.threshold_key = shared.prefix;
  selection.above = shared.above;
  selection.tie_mass =
      quantize_mass(mtp_exp(key_to_float(selection.threshold_key) - selection.max_logit));
  const int64_t tie_count = static_cast<int64_t>(shared.bucket_counts[shared.chosen_bucket]);
  selection.ties_taken = ties_to_take(rule, selection.above, tie_count, selection.tie_mass);
  __syncthreads();  // the histogram is reused by the caller's scans
  return selection;
}

// Calls visit(i, s, taken, slot) for every token of the row, tile by tile in id order: `taken`
// says whether the token is selected and, when kSlots, `slot` is its rank among the selected
// tokens. Block scans run only in tiles that need them.
template <bool kSlots, typename scalar_t, typename Visit>
__device__ void for_each_in_order(const scalar_t* row, int64_t vocab, float temperature,
                                  const RowSelection& selection, SharedState& shared,
                                  Visit visit) {
  int ties_before = 0;
  int taken_before = 0;
  for (int64_t tile = 0; tile < vocab; tile += kThreads) {
    const int64_t i = tile + threadIdx.x;
    const float s = i < vocab ? load_scaled(row, i, temperature) : -INFINITY;
    const uint32_t key = order_key(s);
    const int is_tie = i < vocab && key == selection.threshold_key;
    int tie_rank = 0, tile_ties = 0;
    if (__syncthreads_or(is_tie)) {
      BlockScanInt(shared.temp.scan).ExclusiveSum(is_tie, tie_rank, tile_ties);
      __syncthreads();
    }
    const int taken = i < vocab && (key > selection.threshold_key ||
                                    (is_tie && ties_before + tie_rank < selection.ties_taken));
    int slot = 0, tile_taken = 0;
    if (kSlots && __syncthreads_or(taken)) {
      BlockScanInt(shared.temp.scan).ExclusiveSum(taken, slot, tile_taken);
      __syncthreads();
    }
    if (i < vocab) visit(i, s, taken != 0, taken_before + slot);
    ties_before += tile_ties;
    taken_before += tile_taken;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    candidates_kernel(const scalar_t* logits, int64_t row_stride, int64_t vocab,
                      const float* top_p, int64_t max_candidates, float temperature,
                      int64_t* ids, float* probs, float* sort_keys, int32_t* counts, float* mass,
                      int* statuses) {
  __shared__ SharedState shared;
  const int64_t row_index = blockIdx.x;
  const scalar_t* row = logits + row_index * row_stride;
  int64_t* row_ids = ids + row_index * max_candidates;
  float* row_probs = probs + row_index * max_candidates;
  float* row_keys = sort_keys + row_index * max_candidates;
  for (int64_t slot = threadIdx.x; slot < max_candidates; slot += kThreads) {
    row_ids[slot] = -1;
    row_probs[slot] = 0.0f;
    row_keys[slot] = -INFINITY;
  }
  const StopRule rule{0, max_candidates, 1};
  const RowSelection selection =
      select_row(row, vocab, temperature, top_p[row_index], rule, /*prune=*/true, shared);
  if (threadIdx.x == 0) {
    statuses[row_index] = selection.status;
    counts[row_index] = 0;
    mass[row_index] = 0.0f;
  }
  if (selection.status != kRowOk) return;
  const double total = static_cast<double>(selection.total_mass);
  for_each_in_order</*kSlots=*/true>(row, vocab, temperature, selection, shared,
                    [&](int64_t i, float s, bool taken, int slot) {
                      if (!taken) return;
                      row_ids[slot] = i;
                      row_probs[slot] = static_cast<float>(
                          static_cast<double>(mtp_exp(s - selection.max_logit)) * kMassScale / total);
                      row_keys[slot] = s;
                    });
  if (threadIdx.x == 0) {
    const int64_t count = selection.above.count + selection.ties_taken;
    const uint64_t selected_mass = selection.above.mass + selection.ties_taken * selection.tie_mass;
    counts[row_index] = static_cast<int32_t>(count);
    mass[row_index] = static_cast<float>(static_cast<double>(selected_mass) / total);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mask_kernel(const scalar_t* logits, int64_t row_stride, int64_t vocab, const float* top_p,
                int64_t min_tokens_to_keep, float filter_value, scalar_t* out, int* statuses) {
  __shared__ SharedState shared;
  const int64_t row_index = blockIdx.x;
  const scalar_t* row = logits + row_index * row_stride;
  scalar_t* row_out = out + row_index * vocab;
  const scalar_t filler = static_cast<scalar_t>(filter_value);
  const StopRule rule{0, vocab, min_tokens_to_keep < vocab ? min_tokens_to_keep : vocab};
  // The mass bound does not cover min_tokens_to_keep, so only min_keep = 1 prunes.
  const RowSelection selection = select_row(row, vocab, 1.0f, top_p[row_index], rule,
                                            /*prune=*/rule.min_keep == 1, shared);
  if (threadIdx.x == 0) statuses[row_index] = selection.status;
  if (selection.status != kRowOk) return;
  if (top_p[row_index] >= 1.0f) {
    // As Hugging Face's warper: top_p = 1 filters only tokens of probability zero.
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      row_out[i] = static_cast<float>(row[i]) == -INFINITY ? filler : row[i];
    }
    return;
  }
  for_each_in_order</*kSlots=*/false>(row, vocab, 1.0f, selection, shared,
                    [&](int64_t i, float, bool taken, int) { row_out[i] = taken ? row[i] : filler; });
}

// Reading statuses synchronises, so it is skipped while a CUDA graph is captured.
void raise_bad_rows(const at::Tensor& statuses, const char* op) {
  if (capturing_graph()) return;
  const at::Tensor host = statuses.cpu();
  const int* status = host.data_ptr<int>();
  for (int64_t row = 0; row < host.numel(); ++row) check_row_status(status[row], row, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_p_candidates_cuda(
    const at::Tensor& logits_in, const at::Tensor& top_p_in, int64_t max_candidates,
    double temperature) {
  constexpr const char* op = "mtp_ext::top_p_candidates";
  check_top_p_candidates_args(logits_in, top_p_in, max_candidates, temperature, !capturing_graph());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = with_unit_vocab_stride(logits_in);
  const at::Tensor top_p = top_p_in.contiguous();
  const int64_t batch = logits.size(0);
  auto ids = at::empty({batch, max_candidates}, logits.options().dtype(at::kLong));
  auto probs = at::empty({batch, max_candidates}, logits.options().dtype(at::kFloat));
  auto sort_keys = at::empty({batch, max_candidates}, logits.options().dtype(at::kFloat));
  auto counts = at::empty({batch}, logits.options().dtype(at::kInt));
  auto mass = at::empty({batch}, logits.options().dtype(at::kFloat));
  auto statuses = at::empty({batch}, logits.options().dtype(at::kInt));
  if (batch == 0) return {ids, probs, counts, mass};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), op, [&] {
    candidates_kernel<scalar_t><<<batch, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), logits.size(1), top_p.data_ptr<float>(),
        max_candidates, static_cast<float>(temperature), ids.data_ptr<int64_t>(),
        probs.data_ptr<float>(), sort_keys.data_ptr<float>(), counts.data_ptr<int32_t>(),
        mass.data_ptr<float>(), statuses.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_bad_rows(statuses, op);
  // The selected tokens were written in id order: a stable sort by logit keeps ties by id.
  const auto order = std::get<1>(sort_keys.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  return {ids.gather(1, order), probs.gather(1, order), counts, mass};
}

at::Tensor top_p_mask_cuda(const at::Tensor& logits_in, const at::Tensor& top_p_in,
                           int64_t min_tokens_to_keep, double filter_value) {
  constexpr const char* op = "mtp_ext::top_p_mask";
  check_top_p_mask_args(logits_in, top_p_in, min_tokens_to_keep, !capturing_graph());
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = with_unit_vocab_stride(logits_in);
  const at::Tensor top_p = top_p_in.contiguous();
  const int64_t batch = logits.size(0);
  auto out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  auto statuses = at::empty({batch}, logits.options().dtype(at::kInt));
  if (batch == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), op, [&] {
    mask_kernel<scalar_t><<<batch, kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), logits.size(1), top_p.data_ptr<float>(),
        min_tokens_to_keep, static_cast<float>(filter_value), out.data_ptr<scalar_t>(),
        statuses.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_bad_rows(statuses, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CUDA, m) {
  m.impl("top_p_candidates", &top_p_candidates_cuda);
  m.impl("top_p_mask", &top_p_mask_cuda);
}

}  // namespace mtp_ext
