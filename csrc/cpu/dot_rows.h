// Dot products of a few input rows with many weight rows, for products bound by reading the
// weights (small_batch_linear, and multihead_unembed_topk with few rows). MKL's GEMM over so
// thin a matrix, and even its GEMV, streams the weights well below memory speed on the
// project's CPU. Here each weight row is read from memory once, in order.
//
// With AVX-512, or AVX2 and FMA, up to 4 rows: each weight row meets up to 4 input rows per pass
// over it, in registers; the passes after the first find it in L1. That takes fewer passes than
// the portable loop below, which pairs input rows, and gains from 3 rows on; at 1-2 rows both run
// at memory speed. One weight row at a time: interleaved weight streams defeat the hardware
// prefetcher, and a software prefetch only cost time there where it was measured, with AVX-512.
// From 5 rows on, blocks of weight rows and input rows (dot_rows_blocked; bench/README.md,
// small_batch_linear).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mtp_ext {

// out[r * row_stride + j * feature_stride] = <weight row j, rows[r]>, r < kRows (1 or 2).
template <int kRows>
void dot_two_rows(const float* rows, const float* weight, int64_t size, int64_t begin, int64_t end,
                  float* out, int64_t row_stride, int64_t feature_stride) {
  const float* row0 = rows;
  const float* row1 = rows + (kRows > 1 ? size : 0);
  for (int64_t j = begin; j < end; ++j) {
    const float* weight_row = weight + j * size;
    float dot0 = 0.0f, dot1 = 0.0f;
#pragma omp simd reduction(+ : dot0, dot1)
    for (int64_t i = 0; i < size; ++i) {
      const float w = weight_row[i];
      dot0 += w * row0[i];
      if (kRows > 1) dot1 += w * row1[i];
    }
    out[j * feature_stride] = dot0;
    if (kRows > 1) out[row_stride + j * feature_stride] = dot1;
  }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define MTP_EXT_DOT_ROWS_SIMD 1

// The vector operations of dot_weight_row, 16 floats wide with AVX-512, 8 with AVX2 + FMA.
#ifdef __AVX512F__
struct Simd {
  using Vector = __m512;
  static constexpr int64_t kWidth = 16;
  static Vector zero() { return _mm512_setzero_ps(); }
  static Vector load(const float* p) { return _mm512_loadu_ps(p); }
  static Vector fmadd(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
  // The first `count` (< kWidth) floats at p, zeros after.
  static Vector load_first(const float* p, int64_t count) {
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
  }
  static float sum(Vector v) { return _mm512_reduce_add_ps(v); }
};
#else
struct Simd {
  using Vector = __m256;
  static constexpr int64_t kWidth = 8;
  static Vector zero() { return _mm256_setzero_ps(); }
  static Vector load(const float* p) { return _mm256_loadu_ps(p); }
  static Vector fmadd(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
  static Vector load_first(const float* p, int64_t count) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes);
    return _mm256_maskload_ps(p, mask);
  }
  static float sum(Vector v) {
    const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
    return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)));
  }
};
#endif

// out[r * row_stride] = <weight_row, rows[r]> for r < kRows; the last partial vector of each
// row is read with a mask.
template <int kRows>
inline void dot_weight_row(const float* rows, const float* weight_row, int64_t size, float* out, int64_t row_stride) {
  typename Simd::Vector sums[kRows];
  for (int r = 0; r < kRows; ++r) sums[r] = Simd::zero();
  int64_t i = 0;
  for (; i + Simd::kWidth <= size; i += Simd::kWidth) {
    const typename Simd::Vector weights = Simd::load(weight_row + i);
    for (int r = 0; r < kRows; ++r) sums[r] = Simd::fmadd(weights, Simd::load(rows + r * size + i), sums[r]);
  }
  if (i < size) {
    const typename Simd::Vector weights = Simd::load_first(weight_row + i, size - i);
    for (int r = 0; r < kRows; ++r) sums[r] = Simd::fmadd(weights, Simd::load_first(rows + r * size + i, size - i), sums[r]);
  }
  for (int r = 0; r < kRows; ++r) out[r * row_stride] = Simd::sum(sums[r]);
}

inline void dot_rows_simd(const float* rows, int64_t count, const float* weight, int64_t size, int64_t begin,
                          int64_t end, float* out, int64_t row_stride, int64_t feature_stride) {
  for (int64_t j = begin; j < end; ++j) {
    const float* weight_row = weight + j * size;
    for (int64_t first = 0; first < count; first += 4) {
      const float* group = rows + first * size;
      float* group_out = out + first * row_stride + j * feature_stride;
      switch (std::min<int64_t>(count - first, 4)) {
        case 4: dot_weight_row<4>(group, weight_row, size, group_out, row_stride); break;
        case 3: dot_weight_row<3>(group, weight_row, size, group_out, row_stride); break;
        case 2: dot_weight_row<2>(group, weight_row, size, group_out, row_stride); break;
        default: dot_weight_row<1>(group, weight_row, size, group_out, row_stride); break;
      }
    }
  }
}

// From 5 rows on, dot_rows_simd is bound by its loads (one weight and four row vectors per four
// FMAs) and, once the rows outgrow L1, by re-reading them from L2 for every weight row. So there
// a block of kBlockWeights weight rows meets kBlockRows input rows at a time, all in registers:
// each row vector loaded serves kBlockWeights FMAs, and the rows are re-read once per block of
// weight rows rather than once per weight row. The block's weight rows are streamed together on
// the first group of input rows, with a software prefetch 2 KB ahead on each (where the loop is
// bound by its FMAs it keeps the weight streams from stalling it); the later groups find them in
// L1. Of the blocks measured with AVX2 (3 x 3, 4 x 2, 2 x 4), 3 x 3 was the fastest.
#ifdef __AVX512F__
constexpr int kBlockWeights = 4, kBlockRows = 4;  // 16 accumulators of 32 registers
#else
constexpr int kBlockWeights = 3, kBlockRows = 3;  // 9 accumulators, 3 weight vectors, 1 row vector of 16
#endif

// out[r * row_stride + w * feature_stride] = <weight row w, rows[r]> for w < kW, r < kR.
template <int kW, int kR, bool kPrefetch>
inline void dot_block(const float* rows, const float* weight, int64_t size, float* out, int64_t row_stride,
                      int64_t feature_stride) {
  constexpr int64_t kPrefetchAhead = 512;  // floats
  typename Simd::Vector sums[kW][kR];
  for (int w = 0; w < kW; ++w)
    for (int r = 0; r < kR; ++r) sums[w][r] = Simd::zero();
  typename Simd::Vector weights[kW];
  int64_t i = 0;
  for (; i + Simd::kWidth <= size; i += Simd::kWidth) {
    for (int w = 0; w < kW; ++w) {
      if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(weight + w * size + i + kPrefetchAhead), _MM_HINT_T0);
      weights[w] = Simd::load(weight + w * size + i);
    }
    for (int r = 0; r < kR; ++r) {
      const typename Simd::Vector row = Simd::load(rows + r * size + i);
      for (int w = 0; w < kW; ++w) sums[w][r] = Simd::fmadd(weights[w], row, sums[w][r]);
    }
  }
  if (i < size) {
    for (int w = 0; w < kW; ++w) weights[w] = Simd::load_first(weight + w * size + i, size - i);
    for (int r = 0; r < kR; ++r) {
      const typename Simd::Vector row = Simd::load_first(rows + r * size + i, size - i);
      for (int w = 0; w < kW; ++w) sums[w][r] = Simd::fmadd(weights[w], row, sums[w][r]);
    }
  }
  for (int w = 0; w < kW; ++w)
    for (int r = 0; r < kR; ++r) out[r * row_stride + w * feature_stride] = Simd::sum(sums[w][r]);
}

template <int kW, bool kPrefetch>
inline void dot_block_rows(int64_t block_rows, const float* rows, const float* weight, int64_t size, float* out,
                           int64_t row_stride, int64_t feature_stride) {
  static_assert(kBlockRows <= 4, "dot_block_rows dispatches up to 4 rows");
  switch (block_rows) {
    case 4: dot_block<kW, 4, kPrefetch>(rows, weight, size, out, row_stride, feature_stride); break;
    case 3: dot_block<kW, 3, kPrefetch>(rows, weight, size, out, row_stride, feature_stride); break;
    case 2: dot_block<kW, 2, kPrefetch>(rows, weight, size, out, row_stride, feature_stride); break;
    default: dot_block<kW, 1, kPrefetch>(rows, weight, size, out, row_stride, feature_stride); break;
  }
}

template <bool kPrefetch>
inline void dot_block_of(int64_t block_weights, int64_t block_rows, const float* rows, const float* weight,
                         int64_t size, float* out, int64_t row_stride, int64_t feature_stride) {
  static_assert(kBlockWeights <= 4, "dot_block_of dispatches up to 4 weight rows");
  switch (block_weights) {
    case 4: dot_block_rows<4, kPrefetch>(block_rows, rows, weight, size, out, row_stride, feature_stride); break;
    case 3: dot_block_rows<3, kPrefetch>(block_rows, rows, weight, size, out, row_stride, feature_stride); break;
    case 2: dot_block_rows<2, kPrefetch>(block_rows, rows, weight, size, out, row_stride, feature_stride); break;
    default: dot_block_rows<1, kPrefetch>(block_rows, rows, weight, size, out, row_stride, feature_stride); break;
  }
}

inline void dot_rows_blocked(const float* rows, int64_t count, const float* weight, int64_t size, int64_t begin,
                             int64_t end, float* out, int64_t row_stride, int64_t feature_stride) {
  for (int64_t j = begin; j < end; j += kBlockWeights) {
    const int64_t block_weights = std::min<int64_t>(end - j, kBlockWeights);
    for (int64_t first = 0; first < count; first += kBlockRows) {
      const int64_t block_rows = std::min<int64_t>(count - first, kBlockRows);
      float* block_out = out + first * row_stride + j * feature_stride;
      if (first == 0) {
        dot_block_of<true>(block_weights, block_rows, rows, weight + j * size, size, block_out, row_stride,
                           feature_stride);
      } else {
        dot_block_of<false>(block_weights, block_rows, rows + first * size, weight + j * size, size, block_out,
                            row_stride, feature_stride);
      }
    }
  }
}

#endif  // AVX-512, or AVX2 + FMA

// out[r * row_stride + j * feature_stride] = <weight row j, rows[r]> for r < count and j in
// [begin, end): rows [count, size] and weight [*, size] contiguous.
inline void dot_rows(const float* rows, int64_t count, const float* weight, int64_t size, int64_t begin,
                     int64_t end, float* out, int64_t row_stride, int64_t feature_stride) {
#ifdef MTP_EXT_DOT_ROWS_SIMD
  if (count > 4) {
    dot_rows_blocked(rows, count, weight, size, begin, end, out, row_stride, feature_stride);
  } else {
    dot_rows_simd(rows, count, weight, size, begin, end, out, row_stride, feature_stride);
  }
#else
  // Without AVX2: the weight rows are streamed once per pair of input rows (the pairs after
  // the first find them in cache when begin..end is a thread's share).
  for (int64_t first = 0; first < count; first += 2) {
    const float* pair = rows + first * size;
    float* pair_out = out + first * row_stride;
    if (count - first == 1) {
      dot_two_rows<1>(pair, weight, size, begin, end, pair_out, row_stride, feature_stride);
    } else {
      dot_two_rows<2>(pair, weight, size, begin, end, pair_out, row_stride, feature_stride);
    }
  }
#endif
}

}  // namespace mtp_ext
