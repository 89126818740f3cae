// Fused multi-head unembedding (multihead_unembed_topk, multihead_cross_entropy), written once
// for the CPU and the CUDA kernels: the rules of the per-row reductions, the input checks, and
// the host loops of GEMM tiles (at::mm: MKL / cuBLAS) around a backend's reduction.
//
// multihead_unembed_topk: all N * B rows in one GEMM per tile of kVocabTile weight rows, so the
// weight is read once; each tile's logits are folded into a running top-k and softmax
// statistics per row, then dropped.
//
// multihead_cross_entropy: chunks of rows against the whole vocabulary (about kLogitsBudget
// logits at a time), because a row's gradient softmax - onehot needs its log-sum-exp over all of
// V. The reduction turns each chunk's logits into the loss gradient in place, and two GEMMs
// fold it into grad_hidden and grad_weight during the forward pass (Liger-Kernel style): three
// GEMMs in all, as in the plain forward + backward, and no N x M x V tensor.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <math.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "marginal.h"  // SoftmaxStats, merge_stats
#include "top_p.h"     // MTP_HD, mtp_exp, order_key, key_to_float, kMaxVocab

namespace mtp_ext {

// Weight rows per top-k GEMM tile: a [N * B, 4096] fp32 tile is 4 MiB at N * B = 256; fewer
// rows (not under 256) when there are so many rows that a tile would pass kTileLogits.
constexpr int64_t kVocabTile = 4096;
constexpr int64_t kMinVocabTile = 256;
constexpr int64_t kTileLogits = int64_t(1) << 22;
// Logits per cross-entropy chunk (at least one row): 128 MiB in fp32.
constexpr int64_t kLogitsBudget = int64_t(1) << 25;

// ------------------------------------------------------------------ running top-k candidates

// A candidate (logit, id) as one integer that orders like "higher logit first, then lower id":
// the logit's order key above, the complement of the id below. Keys of one row are unique, so
// any selection of the k largest keys is the reference's (stable sort) top-k. A NaN of either
// sign ranks above every number, as in torch.sort and torch.topk, and decodes to a NaN.
MTP_HD uint64_t candidate_key(float logit, int64_t id) {
  const uint32_t logit_key = isnan(logit) ? 0xffffffffu : order_key(logit);
  return (static_cast<uint64_t>(logit_key) << 32) |
         static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(id));
}

MTP_HD float candidate_logit(uint64_t key) {
  return key_to_float(static_cast<uint32_t>(key >> 32));
}

MTP_HD int64_t candidate_id(uint64_t key) {
  return static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu));
}

// The same order as a signed integer (for int64 tensors): flipping the top bit.
MTP_HD int64_t signed_candidate_key(uint64_t key) {
  return static_cast<int64_t>(key ^ (uint64_t(1) << 63));
}

MTP_HD uint64_t unsigned_candidate_key(int64_t key) {
  return static_cast<uint64_t>(key) ^ (uint64_t(1) << 63);
}

// A key no real candidate has (every order_key of a non-NaN float is above 0): "none yet".
constexpr uint64_t kNoCandidate = 0;

// The lowest logit that can still beat `threshold`: a cheap float test before building a key.
// A logit passes it unless it is below the floor (may_beat), so NaN always passes, and once the
// floor is NaN (k NaN logits kept) every logit does and the key decides.
MTP_HD float logit_floor(uint64_t threshold) {
  return threshold == kNoCandidate ? -INFINITY : candidate_logit(threshold);
}

MTP_HD bool may_beat(float logit, float floor) { return !(logit < floor); }

MTP_HD float log_sum_exp(SoftmaxStats stats) { return stats.max + logf(stats.sum); }

// A row's log-sum-exp from its statistics and its best candidate key. The statistics skip NaN
// and cannot hold +inf, so those rows take it from the best logit, as torch.logsumexp gives:
// NaN for a row holding a NaN (which then ranks first), +inf for one holding +inf.
MTP_HD float row_log_sum_exp(SoftmaxStats stats, uint64_t best_key) {
  const float best = candidate_logit(best_key);
  return isnan(best) || best == INFINITY ? best : log_sum_exp(stats);
}

// ------------------------------------------------------------------ cross-entropy rows

// exp(x) for x <= 0 in the accumulation type: mtp_exp in fp32 (vectorises), exp in fp64.
MTP_HD float exp_nonpositive(float x) { return mtp_exp(x); }
MTP_HD double exp_nonpositive(double x) { return exp(x); }

// d loss / d logit of a row with coefficient `coef` (head weight / head's target count; 0 for
// an ignored row), before the one-hot part: coef * softmax.
template <typename acc_t>
MTP_HD acc_t softmax_gradient(acc_t logit, acc_t lse, acc_t coef) {
  return coef * exp_nonpositive(logit - lse);
}

// A target the row is scored on: not ignore_index, and inside the vocabulary (out-of-range
// targets are rejected before the kernels; this guards the read when the check is skipped).
MTP_HD bool scored_target(int64_t target, int64_t vocab, int64_t ignore_index) {
  return target != ignore_index && target >= 0 && target < vocab;
}

// ----------------------------------------------------------------------------- host side

inline bool is_half_or_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// hidden [N, rows, H] against weight [V, H]: ranks, dtypes, sizes and devices. `allow_double`
// admits float64 (the cross-entropy, for gradcheck).
inline void check_hidden_and_weight(const at::Tensor& hidden, const at::Tensor& weight,
                                    bool allow_double, const char* op) {
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must be 3-D [heads, rows, hidden_size], got shape ",
              hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [vocab, hidden_size], got shape ",
              weight.sizes());
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(is_half_or_float(dtype) || (allow_double && dtype == at::kDouble), op,
              ": hidden must be float32, bfloat16 or float16", allow_double ? " (or float64)" : "",
              ", got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, op, ": weight must have hidden's dtype ", dtype,
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(2), op, ": hidden size mismatch: hidden is ",
              hidden.sizes(), " but weight is ", weight.sizes(), " (both need the same last size)");
  TORCH_CHECK(weight.size(0) >= 1, op, ": weight must have at least one vocabulary row");
  TORCH_CHECK(weight.size(0) <= kMaxVocab, op, ": vocabulary of ", weight.size(0),
              " is above the supported maximum of ", kMaxVocab);
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
}

// The schema's outputs: values [N, B, k] float32, ids [N, B, k] int64, lse [N, B] float32.
using UnembedTopk = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline void check_unembed_topk_args(const at::Tensor& hidden, const at::Tensor& weight,
                                    int64_t k) {
  constexpr const char* op = "mtp_ext::multihead_unembed_topk";
  check_hidden_and_weight(hidden, weight, /*allow_double=*/false, op);
  TORCH_CHECK(k >= 1 && k <= weight.size(0), op, ": k must lie in [1, vocab = ", weight.size(0),
              "], got ", k);
}

// The vocabulary in tiles of `width` weight rows (the last one may be shorter).
struct VocabTiles {
  int64_t vocab;
  int64_t width;
  int64_t count;

  VocabTiles(int64_t rows, int64_t vocab_size)
      : vocab(vocab_size),
        width(std::clamp(kTileLogits / std::max<int64_t>(rows, 1), kMinVocabTile, kVocabTile)),
        count((vocab_size + width - 1) / width) {}

  int64_t first_id(int64_t tile) const { return tile * width; }

  // The weight rows of `tile`, [width, H] in the weight's dtype.
  at::Tensor weight_rows(const at::Tensor& weight, int64_t tile) const {
    const int64_t first = first_id(tile);
    return weight.narrow(0, first, std::min(width, vocab - first));
  }
};

// multihead_unembed_topk after check_unembed_topk_args. Reducer: `add_tiles(rows [R, H],
// weight, tiles)` (both in the input dtype) computes each tile's float32 logits (one GEMM of
// all R rows, in the layout its reduction reads best) and folds them into its running state,
// in any order;
// `finish(values [R, k], ids [R, k], lse [R])` writes the result.
template <typename Reducer>
UnembedTopk unembed_topk(const at::Tensor& hidden, const at::Tensor& weight, int64_t k,
                         Reducer& reducer) {
  const int64_t vocab = weight.size(0);
  const int64_t heads = hidden.size(0);
  const int64_t batch = hidden.size(1);
  const auto options = hidden.options().dtype(at::kFloat);
  at::Tensor values = at::empty({heads, batch, k}, options);
  at::Tensor ids = at::empty({heads, batch, k}, options.dtype(at::kLong));
  at::Tensor lse = at::empty({heads, batch}, options);
  if (heads * batch == 0) return {values, ids, lse};
  const at::Tensor rows = hidden.reshape({heads * batch, hidden.size(2)});
  reducer.add_tiles(rows, weight, VocabTiles(heads * batch, vocab));
  reducer.finish(values.view({heads * batch, k}), ids.view({heads * batch, k}),
                 lse.view({heads * batch}));
  return {values, ids, lse};
}

inline void check_cross_entropy_args(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& targets, const at::Tensor& head_weights,
                                     const char* op) {
  check_hidden_and_weight(hidden, weight, /*allow_double=*/true, op);
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == hidden.size(0) &&
                  targets.size(1) == hidden.size(1),
              op, ": targets must have shape [heads, rows] = [", hidden.size(0), ", ",
              hidden.size(1), "] (from hidden), got ", targets.sizes());
  TORCH_CHECK(at::isFloatingType(head_weights.scalar_type()), op,
              ": head_weights must be a floating-point tensor, got ", head_weights.scalar_type());
  TORCH_CHECK(head_weights.dim() == 1 && head_weights.size(0) == hidden.size(0), op,
              ": head_weights must have shape [heads] = [", hidden.size(0), "], got ",
              head_weights.sizes());
  TORCH_CHECK(targets.device() == hidden.device(), op, ": targets are on ", targets.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(head_weights.device() == hidden.device(), op, ": head_weights are on ",
              head_weights.device(), " but hidden is on ", hidden.device());
}

// Reads the targets, so on CUDA it synchronises: callers skip it while a graph is captured.
inline void check_target_values(const at::Tensor& targets, int64_t vocab, int64_t ignore_index,
                                const char* op) {
  const at::Tensor bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab));
  if (!bad.any().item<bool>()) return;
  const at::Tensor where = bad.nonzero()[0].cpu();
  const int64_t head = where[0].item<int64_t>();
  const int64_t row = where[1].item<int64_t>();
  TORCH_CHECK(false, op, ": targets must lie in [0, vocab = ", vocab, ") or equal ignore_index = ",
              ignore_index, ", got targets[", head, ", ", row, "] = ",
              targets[head][row].item<int64_t>());
}

// The schema's outputs: loss [] float32 (float64 for float64 inputs); head_losses [N], each
// head's mean cross-entropy (0 without scored targets); grad_hidden and grad_weight, d loss /
// d hidden and d loss / d weight in their dtypes and shapes, or [0] when not asked for.
using CrossEntropyOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The chunks of multihead_cross_entropy, after the argument checks. reduce_rows(logits [n, V],
// targets [n], coefs [n], row_losses [n], write_gradient) writes each row's lse -
// logit[target] (0 for an unscored row) and, if asked, replaces the logits by the loss gradient
// coef * (softmax - onehot(target)), where coef = head weight / the head's scored targets.
template <typename ReduceRows>
CrossEntropyOutputs cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                  const at::Tensor& targets, const at::Tensor& head_weights,
                                  int64_t ignore_index, bool hidden_grad, bool weight_grad,
                                  ReduceRows reduce_rows) {
  const int64_t heads = hidden.size(0);
  const int64_t rows = heads * hidden.size(1);
  const int64_t vocab = weight.size(0);
  const auto acc_type = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor inputs = hidden.reshape({rows, hidden.size(2)}).to(acc_type).contiguous();
  const at::Tensor unembedding = weight.to(acc_type).contiguous();
  const at::Tensor flat_targets = targets.reshape({rows}).contiguous();
  const at::Tensor scored = targets != ignore_index;
  const at::Tensor scored_per_head = scored.sum(1).clamp_min(1).to(acc_type);
  const at::Tensor weights = head_weights.to(acc_type);
  const at::Tensor coefs =
      at::where(scored, (weights / scored_per_head).unsqueeze(1), 0.0).reshape({rows}).contiguous();
  const at::Tensor row_losses = at::zeros({rows}, inputs.options());
  at::Tensor grad_inputs = hidden_grad ? at::empty({rows, hidden.size(2)}, inputs.options())
                                       : at::Tensor();
  at::Tensor grad_unembedding = weight_grad ? at::zeros_like(unembedding) : at::Tensor();
  const int64_t chunk = std::max<int64_t>(1, kLogitsBudget / vocab);
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t count = std::min(chunk, rows - first);
    const at::Tensor chunk_inputs = inputs.narrow(0, first, count);
    at::Tensor logits = at::mm(chunk_inputs, unembedding.t());
    reduce_rows(logits, flat_targets.narrow(0, first, count), coefs.narrow(0, first, count),
                row_losses.narrow(0, first, count), hidden_grad || weight_grad);
    if (hidden_grad) {
      at::Tensor grad_chunk = grad_inputs.narrow(0, first, count);
      at::mm_out(grad_chunk, logits, unembedding);
    }
    if (weight_grad) grad_unembedding.addmm_(logits.t(), chunk_inputs);
  }
  const at::Tensor head_losses = row_losses.view({heads, hidden.size(1)}).sum(1) / scored_per_head;
  return {(weights * head_losses).sum(), head_losses,
          hidden_grad ? grad_inputs.view(hidden.sizes()).to(hidden.scalar_type())
                      : at::empty({0}, hidden.options()),
          weight_grad ? grad_unembedding.to(weight.scalar_type())
                      : at::empty({0}, weight.options())};
}

}  // namespace mtp_ext
