// Sort-free top-p on the CPU: rows in parallel, each row in a few passes.
//
//   1. max logit, per-chunk maxima and validity            (one read of the row)
//   2. total integer mass                                   (one read, vectorised exp)
//   3. a cutoff logit below which no selected token can lie (mass bound, and for a capped
//      selection the cap-th largest chunk maximum), then the survivors above it, visiting only
//      chunks whose maximum clears the cutoff
//   4. radix select of the threshold key over the survivors (csrc/common/top_p.h)
//   5. the selected survivors, sorted: at most max_candidates of them
// For peaked rows (language models) step 3 keeps a handful of tokens, so the cost is about two
// reads of the row.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "../common/top_p.h"

namespace mtp_ext {
namespace {

constexpr int64_t kChunk = 32;

struct RowScratch {
  std::vector<float> scaled;  // s for the row when the input cannot be read as it is
  std::vector<float> chunk_max;
  std::vector<float> chunk_max_sorted;
  std::vector<int64_t> survivor_ids;
  std::vector<float> survivor_logits;
  std::vector<uint32_t> survivor_keys;
  std::vector<uint64_t> survivor_masses;
  std::vector<int32_t> members;  // positions in the survivor arrays still in the radix bucket
  std::vector<int32_t> selected;
  std::vector<int64_t> bucket_counts;
  std::vector<uint64_t> bucket_masses;
};

struct RowStats {
  int status = kRowOk;
  float max_logit = 0.0f;
  uint64_t total_mass = 0;
};

struct Threshold {
  uint32_t key = 0;
  int64_t ties_taken = 0;
  uint64_t tie_mass = 0;
  SelectState above{};
};

// The row as float scaled logits; fp32 rows at temperature 1 are read in place.
template <typename scalar_t>
const float* scaled_row(const scalar_t* row, int64_t vocab, float temperature,
                        RowScratch& scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (temperature == 1.0f) return row;
  }
  scratch.scaled.resize(vocab);
  float* out = scratch.scaled.data();
  for (int64_t i = 0; i < vocab; ++i) out[i] = scaled_logit(static_cast<float>(row[i]), temperature);
  return out;
}

RowStats scan_row(const float* scaled, int64_t vocab, RowScratch& scratch) {
  RowStats stats;
  const int64_t num_chunks = (vocab + kChunk - 1) / kChunk;
  scratch.chunk_max.resize(num_chunks);
  float row_max = -std::numeric_limits<float>::infinity();
  int invalid = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int64_t begin = chunk * kChunk;
    const int64_t end = std::min(begin + kChunk, vocab);
    float chunk_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : chunk_max) reduction(| : invalid)
    for (int64_t i = begin; i < end; ++i) {
      const float s = scaled[i];
      chunk_max = std::max(chunk_max, s);
      invalid |= static_cast<int>(s != s) | static_cast<int>(s == std::numeric_limits<float>::infinity());
    }
    scratch.chunk_max[chunk] = chunk_max;
    row_max = std::max(row_max, chunk_max);
  }
  if (invalid) {
    stats.status = kRowHasNanOrPosInf;
    return stats;
  }
  if (row_max == -std::numeric_limits<float>::infinity()) {
    stats.status = kRowAllNegInf;
    return stats;
  }
  uint64_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < vocab; ++i) total += quantize_mass(mtp_exp(scaled[i] - row_max));
  stats.max_logit = row_max;
  stats.total_mass = total;
  return stats;
}

// The largest logit such that the survivors (tokens at or above it) contain the selection.
float survivor_cutoff(const RowStats& stats, int64_t vocab, float top_p, int64_t cap,
                      RowScratch& scratch) {
  const double total = static_cast<double>(stats.total_mass) / kMassScale;
  float cutoff = mass_cutoff_logit(stats.max_logit, total, vocab, top_p);
  // Each of the `cap` chunks with the largest maxima holds a token at or above the cap-th
  // largest maximum, so at least `cap` tokens survive that cutoff too.
  const auto& chunk_max = scratch.chunk_max;
  const int64_t chunks_above =
      std::count_if(chunk_max.begin(), chunk_max.end(), [&](float m) { return m >= cutoff; });
  if (chunks_above > cap) {
    auto& sorted = scratch.chunk_max_sorted;
    sorted.assign(chunk_max.begin(), chunk_max.end());
    std::nth_element(sorted.begin(), sorted.begin() + (cap - 1), sorted.end(),
                     std::greater<float>());
    cutoff = std::max(cutoff, sorted[cap - 1]);
  }
  return cutoff;
}

void collect_survivors(const float* scaled, int64_t vocab, float cutoff, float max_logit,
                       RowScratch& scratch) {
  // Branch-free compaction: dense rows keep most tokens, where a branch would mispredict.
  scratch.survivor_ids.resize(vocab);
  scratch.survivor_logits.resize(vocab);
  int64_t* ids = scratch.survivor_ids.data();
  float* logits = scratch.survivor_logits.data();
  int64_t count = 0;
  const int64_t num_chunks = static_cast<int64_t>(scratch.chunk_max.size());
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    if (scratch.chunk_max[chunk] < cutoff) continue;
    const int64_t end = std::min((chunk + 1) * kChunk, vocab);
    for (int64_t i = chunk * kChunk; i < end; ++i) {
      ids[count] = i;
      logits[count] = scaled[i];
      count += scaled[i] >= cutoff;
    }
  }
  scratch.survivor_ids.resize(count);
  scratch.survivor_keys.resize(count);
  scratch.survivor_masses.resize(count);
  uint32_t* keys = scratch.survivor_keys.data();
  uint64_t* masses = scratch.survivor_masses.data();
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    keys[k] = order_key(logits[k]);
    masses[k] = quantize_mass(mtp_exp(logits[k] - max_logit));
  }
}

// 4096 buckets resolve sign, exponent and three mantissa bits in the first pass, so that
// the later levels see only the survivors of one narrow bucket.
constexpr RadixLevel kCpuRadixLevels[] = {{20, 12}, {8, 12}, {0, 8}};
constexpr int kCpuMaxBuckets = 1 << 12;

// Radix select over the survivors: the key of the last selected token and how many of the
// tokens with that key (in id order) are selected.
Threshold select_threshold(const StopRule& rule, RowScratch& scratch) {
  const uint32_t* keys = scratch.survivor_keys.data();
  const uint64_t* masses = scratch.survivor_masses.data();
  const int64_t survivor_count = static_cast<int64_t>(scratch.survivor_keys.size());
  scratch.bucket_counts.resize(kCpuMaxBuckets);
  scratch.bucket_masses.resize(kCpuMaxBuckets);
  int64_t* bucket_counts = scratch.bucket_counts.data();
  uint64_t* bucket_masses = scratch.bucket_masses.data();
  auto& members = scratch.members;  // survivors in the chosen bucket, after the first level
  members.resize(survivor_count);

  Threshold threshold;
  bool first_level = true;
  int64_t member_count = survivor_count;
  for (const RadixLevel level : kCpuRadixLevels) {
    const int num_buckets = 1 << level.bits;
    std::fill(bucket_counts, bucket_counts + num_buckets, 0);
    std::fill(bucket_masses, bucket_masses + num_buckets, 0);
    for (int64_t k = 0; k < member_count; ++k) {
      const int64_t survivor = first_level ? k : members[k];
      const int bucket = radix_digit(keys[survivor], level);
      bucket_counts[bucket] += 1;
      bucket_masses[bucket] += masses[survivor];
    }
    const int chosen =
        choose_bucket(bucket_counts, bucket_masses, num_buckets, rule, threshold.above);
    int64_t kept = 0;
    for (int64_t k = 0; k < member_count; ++k) {
      const int32_t survivor = first_level ? static_cast<int32_t>(k) : members[k];
      members[kept] = survivor;
      kept += radix_digit(keys[survivor], level) == chosen;
    }
    member_count = kept;
    first_level = false;
  }
  threshold.key = keys[members[0]];
  threshold.tie_mass = masses[members[0]];
  threshold.ties_taken = ties_to_take(rule, threshold.above, member_count, threshold.tie_mass);
  return threshold;
}

// Positions (in the survivor arrays) of the selected tokens, in id order.
void gather_selected(const Threshold& threshold, RowScratch& scratch) {
  scratch.selected.clear();
  int64_t ties_seen = 0;
  for (size_t i = 0; i < scratch.survivor_keys.size(); ++i) {
    const uint32_t key = scratch.survivor_keys[i];
    if (key > threshold.key || (key == threshold.key && ties_seen++ < threshold.ties_taken)) {
      scratch.selected.push_back(static_cast<int32_t>(i));
    }
  }
}

// Steps 1-4 for one row; returns the row status.
int select_row(const float* scaled, int64_t vocab, float top_p, const StopRule& base_rule,
               RowScratch& scratch, RowStats& stats, Threshold& threshold) {
  stats = scan_row(scaled, vocab, scratch);
  if (stats.status != kRowOk) return stats.status;
  StopRule rule = base_rule;
  rule.target_mass = mass_target(top_p, stats.total_mass);
  float cutoff = survivor_cutoff(stats, vocab, top_p, rule.cap, scratch);
  collect_survivors(scaled, vocab, cutoff, stats.max_logit, scratch);
  if (static_cast<int64_t>(scratch.survivor_ids.size()) < rule.min_keep) {
    // The mass bound does not cover min_keep: every token is a survivor.
    collect_survivors(scaled, vocab, -std::numeric_limits<float>::infinity(), stats.max_logit,
                      scratch);
  }
  threshold = select_threshold(rule, scratch);
  return kRowOk;
}

template <typename scalar_t>
void candidates_rows(const at::Tensor& logits, const float* top_p, int64_t max_candidates,
                     float temperature, int64_t* ids, float* probs, int32_t* counts,
                     float* mass, int* statuses) {
  const int64_t batch = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t row_stride = logits.stride(0);
  const scalar_t* data = logits.data_ptr<scalar_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    for (int64_t row = begin; row < end; ++row) {
      int64_t* row_ids = ids + row * max_candidates;
      float* row_probs = probs + row * max_candidates;
      std::fill(row_ids, row_ids + max_candidates, -1);
      std::fill(row_probs, row_probs + max_candidates, 0.0f);
      counts[row] = 0;
      mass[row] = 0.0f;
      const float* scaled = scaled_row(data + row * row_stride, vocab, temperature, scratch);
      RowStats stats;
      Threshold threshold;
      const StopRule rule{0, max_candidates, 1};
      statuses[row] = select_row(scaled, vocab, top_p[row], rule, scratch, stats, threshold);
      if (statuses[row] != kRowOk) continue;

      gather_selected(threshold, scratch);
      auto& selected = scratch.selected;
      const auto& keys = scratch.survivor_keys;
      std::stable_sort(selected.begin(), selected.end(),
                       [&](int32_t a, int32_t b) { return keys[a] > keys[b]; });
      const double total = static_cast<double>(stats.total_mass);
      uint64_t selected_mass = 0;
      for (size_t slot = 0; slot < selected.size(); ++slot) {
        const int32_t survivor = selected[slot];
        const int64_t token = scratch.survivor_ids[survivor];
        row_ids[slot] = token;
        row_probs[slot] = static_cast<float>(
            static_cast<double>(mtp_exp(scaled[token] - stats.max_logit)) * kMassScale / total);
        selected_mass += scratch.survivor_masses[survivor];
      }
      counts[row] = static_cast<int32_t>(selected.size());
      mass[row] = static_cast<float>(static_cast<double>(selected_mass) / total);
    }
  });
}

// Keeps the tokens above the threshold in one vectorised pass, then the first ties_taken tokens
// at the threshold, looking only in chunks whose maximum reaches it.
template <typename scalar_t>
void write_mask(const scalar_t* row_in, const float* scaled, int64_t vocab,
                const Threshold& threshold, scalar_t filler, scalar_t* row_out,
                const RowScratch& scratch) {
  const float threshold_logit = key_to_float(threshold.key);
  for (int64_t i = 0; i < vocab; ++i) row_out[i] = scaled[i] > threshold_logit ? row_in[i] : filler;
  int64_t ties_left = threshold.ties_taken;
  const int64_t num_chunks = static_cast<int64_t>(scratch.chunk_max.size());
  for (int64_t chunk = 0; chunk < num_chunks && ties_left > 0; ++chunk) {
    if (scratch.chunk_max[chunk] < threshold_logit) continue;
    const int64_t end = std::min((chunk + 1) * kChunk, vocab);
    for (int64_t i = chunk * kChunk; i < end && ties_left > 0; ++i) {
      if (scaled[i] == threshold_logit) {
        row_out[i] = row_in[i];
        --ties_left;
      }
    }
  }
}

template <typename scalar_t>
void mask_rows(const at::Tensor& logits, const float* top_p, int64_t min_tokens_to_keep,
               float filter_value, scalar_t* out, int* statuses) {
  const int64_t batch = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t row_stride = logits.stride(0);
  const scalar_t* data = logits.data_ptr<scalar_t>();
  const scalar_t filler = static_cast<scalar_t>(filter_value);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* row_in = data + row * row_stride;
      scalar_t* row_out = out + row * vocab;
      const float* scaled = scaled_row(row_in, vocab, 1.0f, scratch);
      RowStats stats;
      Threshold threshold;
      const StopRule rule{0, vocab, std::min(min_tokens_to_keep, vocab)};
      statuses[row] = select_row(scaled, vocab, top_p[row], rule, scratch, stats, threshold);
      if (statuses[row] != kRowOk) continue;
      if (top_p[row] >= 1.0f) {
        // As Hugging Face's warper: top_p = 1 filters only tokens of probability zero.
        for (int64_t i = 0; i < vocab; ++i) {
          row_out[i] = scaled[i] == -std::numeric_limits<float>::infinity() ? filler : row_in[i];
        }
        continue;
      }
      write_mask(row_in, scaled, vocab, threshold, filler, row_out, scratch);
    }
  });
}

void raise_bad_rows(const std::vector<int>& statuses, const char* op) {
  for (size_t row = 0; row < statuses.size(); ++row) check_row_status(statuses[row], row, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_p_candidates_cpu(
    const at::Tensor& logits_in, const at::Tensor& top_p_in, int64_t max_candidates,
    double temperature) {
  constexpr const char* op = "mtp_ext::top_p_candidates";
  check_top_p_candidates_args(logits_in, top_p_in, max_candidates, temperature, true);
  const at::Tensor logits = with_unit_vocab_stride(logits_in);
  const at::Tensor top_p = top_p_in.contiguous();
  const int64_t batch = logits.size(0);
  auto ids = at::empty({batch, max_candidates}, logits.options().dtype(at::kLong));
  auto probs = at::empty({batch, max_candidates}, logits.options().dtype(at::kFloat));
  auto counts = at::empty({batch}, logits.options().dtype(at::kInt));
  auto mass = at::empty({batch}, logits.options().dtype(at::kFloat));
  std::vector<int> statuses(batch, kRowOk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), op, [&] {
    candidates_rows<scalar_t>(logits, top_p.data_ptr<float>(), max_candidates,
                              static_cast<float>(temperature), ids.data_ptr<int64_t>(),
                              probs.data_ptr<float>(), counts.data_ptr<int32_t>(),
                              mass.data_ptr<float>(), statuses.data());
  });
  raise_bad_rows(statuses, op);
  return {ids, probs, counts, mass};
}

at::Tensor top_p_mask_cpu(const at::Tensor& logits_in, const at::Tensor& top_p_in,
                          int64_t min_tokens_to_keep, double filter_value) {
  constexpr const char* op = "mtp_ext::top_p_mask";
  check_top_p_mask_args(logits_in, top_p_in, min_tokens_to_keep, true);
  const at::Tensor logits = with_unit_vocab_stride(logits_in);
  const at::Tensor top_p = top_p_in.contiguous();
  auto out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  std::vector<int> statuses(logits.size(0), kRowOk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), op, [&] {
    mask_rows<scalar_t>(logits, top_p.data_ptr<float>(), min_tokens_to_keep,
                        static_cast<float>(filter_value), out.data_ptr<scalar_t>(),
                        statuses.data());
  });
  raise_bad_rows(statuses, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtp_ext, CPU, m) {
  m.impl("top_p_candidates", &top_p_candidates_cpu);
  m.impl("top_p_mask", &top_p_mask_cpu);
}

}  // namespace mtp_ext
