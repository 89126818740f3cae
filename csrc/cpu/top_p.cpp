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
// reads of the row. top_p_mask has no cap to prune with; it brackets the threshold from a sample
// of the row instead (steps 2-3 become one exact pass, see "top_p_mask's fast path").
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

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
  // Survivor arrays only grow (a shrinking resize would refill them on every row); the first
  // survivor_count entries are live.
  int64_t survivor_count = 0;
  std::vector<int64_t> survivor_ids;
  std::vector<float> survivor_logits;
  std::vector<uint32_t> survivor_keys;
  std::vector<uint64_t> survivor_masses;
  std::vector<int32_t> members;  // positions in the survivor arrays still in the radix bucket
  std::vector<int32_t> selected;
  std::vector<int64_t> bucket_counts;
  std::vector<uint64_t> bucket_masses;
};

template <typename T>
T* room_for(std::vector<T>& buffer, int64_t count) {
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

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

// Max logit, chunk maxima and validity: the first read of a row.
RowStats scan_extremes(const float* scaled, int64_t vocab, RowScratch& scratch) {
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
  stats.max_logit = row_max;
  return stats;
}

uint64_t total_mass(const float* scaled, int64_t vocab, float max_logit) {
  uint64_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < vocab; ++i) total += quantize_mass(mtp_exp(scaled[i] - max_logit));
  return total;
}

constexpr int64_t kFewLargest = 32;

// The k-th largest of values (k <= kFewLargest, k <= values.size()) in one pass that keeps the k
// largest sorted: after the first few, nearly every value fails the compare with the smallest
// kept, so this is a fraction of nth_element's partitioning (and needs no copy).
float kth_largest_by_insertion(int64_t k, const std::vector<float>& values) {
  float largest[kFewLargest] = {};  // ascending: largest[0] is the k-th largest so far
  std::fill(largest, largest + k, -std::numeric_limits<float>::infinity());
  for (const float value : values) {
    if (!(value > largest[0])) continue;
    int64_t slot = 0;
    for (; slot + 1 < k && largest[slot + 1] < value; ++slot) largest[slot] = largest[slot + 1];
    largest[slot] = value;
  }
  return largest[0];
}

// The k-th largest chunk maximum (k <= the number of chunks).
float kth_largest_chunk_max(int64_t k, RowScratch& scratch) {
  if (k <= kFewLargest) return kth_largest_by_insertion(k, scratch.chunk_max);
  auto& sorted = scratch.chunk_max_sorted;
  sorted.assign(scratch.chunk_max.begin(), scratch.chunk_max.end());
  std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(), std::greater<float>());
  return sorted[k - 1];
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
  if (chunks_above > cap) cutoff = std::max(cutoff, kth_largest_chunk_max(cap, scratch));
  return cutoff;
}

// Keys and integer masses of the first `count` survivors, whose ids and logits are written.
void finish_survivors(int64_t count, float max_logit, RowScratch& scratch) {
  scratch.survivor_count = count;
  const float* logits = scratch.survivor_logits.data();
  uint32_t* keys = room_for(scratch.survivor_keys, count);
  uint64_t* masses = room_for(scratch.survivor_masses, count);
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    keys[k] = order_key(logits[k]);
    masses[k] = quantize_mass(mtp_exp(logits[k] - max_logit));
  }
}

// The tokens with s >= cutoff, with their keys and integer masses, in id order.
void collect_survivors(const float* scaled, int64_t vocab, float cutoff, float max_logit,
                       RowScratch& scratch) {
  // Branch-free compaction: dense rows keep most tokens, where a branch would mispredict.
  int64_t* ids = room_for(scratch.survivor_ids, vocab);
  float* logits = room_for(scratch.survivor_logits, vocab);
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
  finish_survivors(count, max_logit, scratch);
}


// 4096 buckets resolve sign, exponent and three mantissa bits in the first pass, so that
// the later levels see only the survivors of one narrow bucket.
constexpr RadixLevel kCpuRadixLevels[] = {{20, 12}, {8, 12}, {0, 8}};
constexpr int kCpuMaxBuckets = 1 << 12;

// Radix select over the survivors: the key of the last selected token and how many of the
// tokens with that key (in id order) are selected. `above` holds what lies above every survivor
// and is already selected.
Threshold select_threshold(const StopRule& rule, RowScratch& scratch, SelectState above = {}) {
  const uint32_t* keys = scratch.survivor_keys.data();
  const uint64_t* masses = scratch.survivor_masses.data();
  const int64_t survivor_count = scratch.survivor_count;
  scratch.bucket_counts.resize(kCpuMaxBuckets);
  scratch.bucket_masses.resize(kCpuMaxBuckets);
  int64_t* bucket_counts = scratch.bucket_counts.data();
  uint64_t* bucket_masses = scratch.bucket_masses.data();
  auto& members = scratch.members;  // survivors in the chosen bucket, after the first level
  members.resize(survivor_count);

  Threshold threshold;
  threshold.above = above;
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
  for (int64_t i = 0; i < scratch.survivor_count; ++i) {
    const uint32_t key = scratch.survivor_keys[i];
    if (key > threshold.key || (key == threshold.key && ties_seen++ < threshold.ties_taken)) {
      scratch.selected.push_back(static_cast<int32_t>(i));
    }
  }
}

// Steps 2-4 for one row, after scan_extremes.
Threshold select_general(const float* scaled, int64_t vocab, float top_p, const StopRule& base_rule,
                         RowScratch& scratch, RowStats& stats) {
  stats.total_mass = total_mass(scaled, vocab, stats.max_logit);
  StopRule rule = base_rule;
  rule.target_mass = mass_target(top_p, stats.total_mass);
  float cutoff = survivor_cutoff(stats, vocab, top_p, rule.cap, scratch);
  collect_survivors(scaled, vocab, cutoff, stats.max_logit, scratch);
  if (scratch.survivor_count < rule.min_keep) {
    // The mass bound does not cover min_keep: every token is a survivor.
    collect_survivors(scaled, vocab, -std::numeric_limits<float>::infinity(), stats.max_logit,
                      scratch);
  }
  return select_threshold(rule, scratch);
}

// ---- top_p_mask's fast path ----------------------------------------------------------------
// Without a cap to prune with, the general path's survivors can be most of the row. Instead a
// sample of the row brackets the threshold logit, one exact pass adds up the integer masses
// (the total, and what lies above the bracket), and the radix select runs over the bracket's
// tokens only. The exact sums decide whether the bracket holds the threshold; when it does not
// (an unlucky sample) the row takes the general path, so the result never depends on the sample.
// (bench/README.md, top_p_candidates / top_p_mask)

constexpr int64_t kMinBracketVocab = 1024;  // below this the general path is as fast
constexpr int64_t kSampleStride = 32;
// The chunks with the largest maxima hold the heavy tokens of a peaked row: sampled in full.
constexpr int64_t kFullySampledChunks = 16;
constexpr float kBucketNats = 0.03125f;
constexpr int kNumBuckets = 1024;  // 32 nats below the max: past kDeadLogitGap

struct Bracket {
  float low;   // the threshold logit is expected in [low, high)
  float high;
};

// The sample's estimate of the mass per 1/32-nat band below the max (and its variance), and a
// bracket of bands around the crossing of the stop condition A >= p (A + B), for the mass A above
// and B below a boundary: f = (1 - p) A - p B changes sign at the threshold. A and B come from
// disjoint tokens, so f's variance is (1 - p)^2 var(A) + p^2 var(B); the bracket's edges are
// where f is three standard errors from zero.
Bracket estimate_bracket(const float* scaled, int64_t vocab, float max_logit, float top_p,
                         RowScratch& scratch) {
  const auto& chunk_max = scratch.chunk_max;
  const int64_t num_chunks = static_cast<int64_t>(chunk_max.size());
  float full_floor = -std::numeric_limits<float>::infinity();
  if (num_chunks > kFullySampledChunks) full_floor = kth_largest_chunk_max(kFullySampledChunks, scratch);
  double bucket_mass[kNumBuckets] = {};
  double bucket_variance[kNumBuckets] = {};
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const int64_t end = std::min((chunk + 1) * kChunk, vocab);
    const int64_t stride = chunk_max[chunk] >= full_floor ? 1 : kSampleStride;
    const double weight = static_cast<double>(stride);
    for (int64_t i = chunk * kChunk; i < end; i += stride) {
      const float gap = max_logit - scaled[i];
      if (!(gap < kNumBuckets * kBucketNats)) continue;
      const double e = mtp_exp(-gap);
      const int bucket = static_cast<int>(gap * (1.0f / kBucketNats));
      bucket_mass[bucket] += weight * e;
      bucket_variance[bucket] += weight * (weight - 1.0) * e * e;
    }
  }
  double total = 0.0;
  double total_variance = 0.0;
  for (int bucket = 0; bucket < kNumBuckets; ++bucket) {
    total += bucket_mass[bucket];
    total_variance += bucket_variance[bucket];
  }
  const double p = top_p;
  Bracket bracket{-std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity()};
  double above = 0.0;
  double above_variance = 0.0;
  for (int bucket = 0; bucket < kNumBuckets; ++bucket) {
    above += bucket_mass[bucket];
    above_variance += bucket_variance[bucket];
    const double below = total - above;
    const double below_variance = std::max(total_variance - above_variance, 0.0);
    const double f = (1.0 - p) * above - p * below;
    const double margin = 3.0 * std::sqrt((1.0 - p) * (1.0 - p) * above_variance + p * p * below_variance) +
                          1e-6 * total;
    const float bucket_floor = max_logit - (bucket + 1) * kBucketNats;
    if (f + margin < 0.0) bracket.high = bucket_floor;
    if (f - margin > 0.0) {
      bracket.low = bucket_floor;
      break;
    }
  }
  return bracket;
}

struct BracketSums {
  uint64_t total_mass;
  uint64_t above_mass;  // of the tokens at or above bracket.high
  int64_t above_count;
};

// The exact integer sums (the bracket's tokens are found again by collect_bracket: comparing
// is cheaper than storing a flag per token here).
BracketSums bracket_sums(const float* scaled, int64_t vocab, float max_logit, Bracket bracket) {
  uint64_t total = 0;
  uint64_t above_mass = 0;
  int32_t above_count = 0;  // vocab < 2^31; half the lanes' width of an int64 count
#pragma omp simd reduction(+ : total, above_mass, above_count)
  for (int64_t i = 0; i < vocab; ++i) {
    const float s = scaled[i];
    const uint64_t q = quantize_mass(mtp_exp(s - max_logit));
    const bool above = s >= bracket.high;
    total += q;
    above_mass += above ? q : 0;
    above_count += above;
  }
  return {total, above_mass, above_count};
}

// The bracket's tokens, low <= s < high, as the survivors.
void collect_bracket(const float* scaled, int64_t vocab, Bracket bracket, float max_logit,
                     RowScratch& scratch) {
  // Full vectors are stored past the last survivor: room for one more.
  int64_t* ids = room_for(scratch.survivor_ids, vocab + 16);
  float* logits = room_for(scratch.survivor_logits, vocab + 16);
  int64_t count = 0;
  int64_t begin = 0;
#ifdef __AVX512F__
  // Sixteen tokens at a time, compressed in registers (a compressing store to memory is
  // microcoded and slow on AMD). No branches: whether a block holds a bracket token is a coin
  // flip when the bracket is sparse.
  const __m512 low = _mm512_set1_ps(bracket.low);
  const __m512 high = _mm512_set1_ps(bracket.high);
  const __m512i lane_ids = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (; begin + 16 <= vocab; begin += 16) {
    const __m512 block = _mm512_loadu_ps(scaled + begin);
    const __mmask16 keep = _mm512_cmp_ps_mask(block, low, _CMP_GE_OQ) & _mm512_cmp_ps_mask(block, high, _CMP_LT_OQ);
    _mm512_storeu_ps(logits + count, _mm512_maskz_compress_ps(keep, block));
    const __m512i first_ids = _mm512_add_epi64(lane_ids, _mm512_set1_epi64(begin));
    const __mmask8 keep_low = static_cast<__mmask8>(keep);
    const __mmask8 keep_high = static_cast<__mmask8>(keep >> 8);
    _mm512_storeu_si512(ids + count, _mm512_maskz_compress_epi64(keep_low, first_ids));
    const int64_t low_count = __builtin_popcount(keep_low);
    _mm512_storeu_si512(ids + count + low_count,
                        _mm512_maskz_compress_epi64(keep_high, _mm512_add_epi64(first_ids, _mm512_set1_epi64(8))));
    count += low_count + __builtin_popcount(keep_high);
  }
#endif
  for (int64_t token = begin; token < vocab; ++token) {
    ids[count] = token;
    logits[count] = scaled[token];
    count += (scaled[token] >= bracket.low) & (scaled[token] < bracket.high);
  }
  finish_survivors(count, max_logit, scratch);
}

// The threshold through the bracket; false when the exact sums show that it lies outside.
bool select_bracketed(const float* scaled, int64_t vocab, float top_p, const StopRule& base_rule,
                      const RowStats& stats, RowScratch& scratch, Threshold& threshold) {
  const Bracket bracket = estimate_bracket(scaled, vocab, stats.max_logit, top_p, scratch);
  const BracketSums sums = bracket_sums(scaled, vocab, stats.max_logit, bracket);
  StopRule rule = base_rule;
  rule.target_mass = mass_target(top_p, sums.total_mass);
  const SelectState above{sums.above_count, sums.above_mass};
  if (reaches_stop(rule, above.count, above.mass)) return false;  // stops above the bracket
  collect_bracket(scaled, vocab, bracket, stats.max_logit, scratch);
  const int64_t bracket_count = scratch.survivor_count;
  uint64_t bracket_mass = 0;
  for (int64_t k = 0; k < bracket_count; ++k) bracket_mass += scratch.survivor_masses[k];
  if (!reaches_stop(rule, above.count + bracket_count, above.mass + bracket_mass)) return false;
  threshold = select_threshold(rule, scratch, above);
  return true;
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
      RowStats stats = scan_extremes(scaled, vocab, scratch);
      statuses[row] = stats.status;
      if (stats.status != kRowOk) continue;
      const StopRule rule{0, max_candidates, 1};
      const Threshold threshold = select_general(scaled, vocab, top_p[row], rule, scratch, stats);

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
// at the threshold: the survivors hold every token with the threshold key, in id order.
template <typename scalar_t>
void write_mask(const scalar_t* row_in, const float* scaled, int64_t vocab,
                const Threshold& threshold, scalar_t filler, scalar_t* row_out,
                const RowScratch& scratch) {
  const float threshold_logit = key_to_float(threshold.key);
  for (int64_t i = 0; i < vocab; ++i) row_out[i] = scaled[i] > threshold_logit ? row_in[i] : filler;
  int64_t ties_left = threshold.ties_taken;
  for (int64_t k = 0; k < scratch.survivor_count && ties_left > 0; ++k) {
    if (scratch.survivor_keys[k] != threshold.key) continue;
    const int64_t token = scratch.survivor_ids[k];
    row_out[token] = row_in[token];
    --ties_left;
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
      RowStats stats = scan_extremes(scaled, vocab, scratch);
      statuses[row] = stats.status;
      if (stats.status != kRowOk) continue;
      if (top_p[row] >= 1.0f) {
        // As Hugging Face's warper: top_p = 1 filters only tokens of probability zero.
        for (int64_t i = 0; i < vocab; ++i) {
          row_out[i] = scaled[i] == -std::numeric_limits<float>::infinity() ? filler : row_in[i];
        }
        continue;
      }
      const StopRule rule{0, vocab, std::min(min_tokens_to_keep, vocab)};
      Threshold threshold;
      const bool bracketed = vocab >= kMinBracketVocab &&
          select_bracketed(scaled, vocab, top_p[row], rule, stats, scratch, threshold);
      if (!bracketed) threshold = select_general(scaled, vocab, top_p[row], rule, scratch, stats);
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
