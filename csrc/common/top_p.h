// The nucleus (top-p) selection rule, written once for the CPU and the CUDA kernel.
//
// Everything here is plain arithmetic on one row's values so that both backends make exactly
// the same decisions: the CPU tests exercise the logic that the GPU runs.
//
// Definitions (see README, "top_p_candidates"):
//   s_i   = float(logit_i) / temperature, with -0.0 folded into +0.0
//   e_i   = exp(s_i - max_j s_j)                      (mtp_exp below, x <= 0)
//   q_i   = round(e_i * 2^40)                         integer mass, see quantize_mass
//   order = s descending, ties by lower id            (order_key below)
//   the nucleus is the shortest prefix of that order whose integer mass reaches
//   ceil(top_p' * sum_i q_i), top_p' the float32 just below top_p (mass_target), or at least
//   min_keep tokens, cut at `cap` tokens.
//
// Integer masses make the sums associative: a histogram built with atomics on the GPU, a
// different summation order on the CPU and a parallel reduction all give the same bits, so the
// result is deterministic and identical on both backends.
#pragma once

#include <cstdint>
#include <cstring>
#include <math.h>

#if defined(__CUDACC__)
#define MTP_HD __host__ __device__ __forceinline__
#else
#define MTP_HD inline __attribute__((always_inline))
#endif

namespace mtp_ext {

// 2^40: the integer unit of probability mass relative to the top token (e = 1).
constexpr float kMassScale = 1099511627776.0f;
// Sums of q over up to 2^23 tokens stay far below 2^64.
constexpr int64_t kMaxVocab = int64_t(1) << 23;
// Tokens this far below the top logit have q = 0 (e < 2^-41): no mass, never in a nucleus.
constexpr float kDeadLogitGap = 29.0f;

// Per-row outcome of the first pass, reported by both backends.
constexpr int kRowOk = 0;
constexpr int kRowHasNanOrPosInf = 1;
constexpr int kRowAllNegInf = 2;


// memcpy is the portable bit cast, on the host and in CUDA device code alike.
template <typename To, typename From>
MTP_HD To bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To out;
  memcpy(&out, &value, sizeof(To));
  return out;
}

// exp(x) for x <= 0, in fp32, with explicit fused multiply-adds so that host and device round
// identically (Cephes' expf polynomial, about 1 ulp). Results below 2^-126 are flushed to 0:
// those tokens have q = 0 anyway.
MTP_HD float mtp_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  const float n = floorf(fmaf(x, kLog2e, 0.5f));
  float r = fmaf(n, -kLn2Hi, x);
  r = fmaf(n, -kLn2Lo, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r + 1.0f);
  const float scale = bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return underflow ? 0.0f : p * scale;
}

// round(e * 2^40) for e in [0, 1]: adding 2^52 in double rounds to an integer (to nearest
// even) on any IEEE machine, and the low mantissa bits are that integer.
MTP_HD uint64_t quantize_mass(float e) {
  const double kMagic = 4503599627370496.0;  // 2^52
  return bit_cast<uint64_t>(static_cast<double>(e * kMassScale) + kMagic) - bit_cast<uint64_t>(kMagic);
}

MTP_HD float scaled_logit(float logit, float temperature) { return logit / temperature; }

// A uint32 that orders like the float (NaN excluded): larger key, larger logit.
MTP_HD uint32_t order_key(float s) {
  const uint32_t bits = bit_cast<uint32_t>(s + 0.0f);  // + 0.0f folds -0.0 into +0.0: they tie
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

MTP_HD float key_to_float(uint32_t key) {
  return bit_cast<float>((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// A radix select fixes the key's bits from the top, `bits` at a time; the last level has
// shift 0. Backends choose their own schedule (the answer does not depend on it).
struct RadixLevel {
  int shift;
  int bits;
};

MTP_HD int radix_digit(uint32_t key, RadixLevel level) {
  return static_cast<int>((key >> level.shift) & ((1u << level.bits) - 1u));
}

// Mask of the key bits fixed before `level`.
MTP_HD uint32_t radix_prefix_mask(RadixLevel level) {
  const int fixed_from = level.shift + level.bits;
  return fixed_from >= 32 ? 0u : ~0u << fixed_from;
}

// ceil(top_p' * total): the integer mass a nucleus must reach, where top_p' is the float32 just
// below top_p. top_p arrives rounded to float32 (0.3 becomes 0.30000001), so a prefix holding
// exactly the decimal top_p (3 of 10 equal tokens) would otherwise fall short by the rounding
// and take one token more than Hugging Face's warper: a mass within one float32 ulp under
// top_p reaches it. (top_p > 0 here, so the bits minus one are the next float down.)
MTP_HD uint64_t mass_target(float top_p, uint64_t total_mass) {
  if (top_p >= 1.0f) return total_mass;
  const float lowered = bit_cast<float>(bit_cast<uint32_t>(top_p) - 1u);
  const double target = ceil(static_cast<double>(lowered) * static_cast<double>(total_mass));
  return target < 1.0 ? 1 : static_cast<uint64_t>(target);
}

// Where the selection stops: `cap` tokens, or the mass target once `min_keep` tokens are in.
struct StopRule {
  uint64_t target_mass;
  int64_t cap;
  int64_t min_keep;
};

// What lies strictly above the threshold chosen so far. No member initialisers: it also lives
// in CUDA shared memory, which cannot run constructors. Zero it with SelectState{}.
struct SelectState {
  int64_t count;
  uint64_t mass;
};

MTP_HD bool reaches_stop(const StopRule& rule, int64_t count, uint64_t mass) {
  return count >= rule.cap || (mass >= rule.target_mass && count >= rule.min_keep);
}

// Walks one radix level's buckets from the highest key down and returns the bucket in which the
// selection stops, adding the buckets above it to `state`. If it never stops (fewer tokens than
// the rule asks for), returns the lowest non-empty bucket, so that everything is taken.
MTP_HD int choose_bucket(const int64_t* bucket_counts, const uint64_t* bucket_masses,
                         int num_buckets, const StopRule& rule, SelectState& state) {
  int last_nonempty = -1;
  for (int bucket = num_buckets - 1; bucket >= 0; --bucket) {
    if (bucket_counts[bucket] == 0) continue;
    const int64_t count = state.count + bucket_counts[bucket];
    const uint64_t mass = state.mass + bucket_masses[bucket];
    if (reaches_stop(rule, count, mass)) return bucket;
    state.count = count;
    state.mass = mass;
    last_nonempty = bucket;
  }
  if (last_nonempty >= 0) {  // the caller takes the lowest bucket as the threshold bucket
    state.count -= bucket_counts[last_nonempty];
    state.mass -= bucket_masses[last_nonempty];
  }
  return last_nonempty;
}

// How many of the `tie_count` tokens that share the threshold key (each of mass `tie_mass`),
// taken in id order, complete the selection.
MTP_HD int64_t ties_to_take(const StopRule& rule, const SelectState& above, int64_t tie_count,
                            uint64_t tie_mass) {
  int64_t take = rule.cap - above.count;
  const uint64_t missing = rule.target_mass > above.mass ? rule.target_mass - above.mass : 0;
  // Zero-mass ties can complete the selection only when the mass is already there.
  if (missing == 0 || tie_mass > 0) {
    int64_t for_mass = missing == 0 ? 0 : static_cast<int64_t>((missing + tie_mass - 1) / tie_mass);
    if (for_mass < rule.min_keep - above.count) for_mass = rule.min_keep - above.count;
    if (for_mass < take) take = for_mass;
  }
  if (take > tie_count) take = tie_count;
  return take < 1 ? 1 : take;
}

// A logit below which no selected token can lie, from the mass bound: n tokens below
// max - gap hold at most n * (exp(-gap) + 2^-41) of mass (the second term is quantisation), so
// when that is at most half the mass the nucleus may leave out, none of them is needed.
// `total_mass` is sum q / 2^40. Never above the dead-token floor.
MTP_HD float mass_cutoff_logit(float max_logit, double total_mass, int64_t vocab, float top_p) {
  double gap = kDeadLogitGap;
  if (top_p < 1.0f) {
    const double budget = (1.0 - static_cast<double>(top_p)) * total_mass /
                              (2.0 * static_cast<double>(vocab)) -
                          4.547473508864641e-13;  // 2^-41
    if (budget > 0.0 && -log(budget) < gap) gap = -log(budget);
  }
  return max_logit - static_cast<float>(gap) - 1.0f;
}

}  // namespace mtp_ext
