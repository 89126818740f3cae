// Dot products of a few input rows with many weight rows, for products bound by reading the
// weights (small_batch_linear, and multihead_unembed_topk with few rows). MKL's GEMM over so
// thin a matrix, and even its GEMV, streams the weights well below memory speed on the
// project's CPU. Here each weight row is read from memory once, in order.
//
// With AVX-512 each weight row meets up to 4 input rows per pass over it, in registers; the
// passes after the first find it in L1. That takes fewer passes than the portable loop below,
// which pairs input rows, and gains from 4 rows on; at 1-2 rows both run at memory speed. One
// weight row at a time: interleaved weight streams defeat the hardware prefetcher. From 5 rows
// on, where the loop is bound by its FMAs, a software prefetch 2 KB ahead keeps the weight
// stream from stalling it; below that it only costs time (bench/README.md, small_batch_linear).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef __AVX512F__
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

#ifdef __AVX512F__

// out[r * row_stride] = <weight_row, rows[r]> for r < kRows; the last partial vector of each
// row is read with a mask.
template <int kRows, bool kPrefetch>
inline void dot_weight_row(const float* rows, const float* weight_row, int64_t size, float* out, int64_t row_stride) {
  constexpr int64_t kPrefetchAhead = 512;  // floats
  __m512 sums[kRows];
  for (int r = 0; r < kRows; ++r) sums[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= size; i += 16) {
    if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(weight_row + i + kPrefetchAhead), _MM_HINT_T0);
    const __m512 weights = _mm512_loadu_ps(weight_row + i);
    for (int r = 0; r < kRows; ++r) sums[r] = _mm512_fmadd_ps(weights, _mm512_loadu_ps(rows + r * size + i), sums[r]);
  }
  if (i < size) {
    const __mmask16 lanes = static_cast<__mmask16>((1u << (size - i)) - 1u);
    const __m512 weights = _mm512_maskz_loadu_ps(lanes, weight_row + i);
    for (int r = 0; r < kRows; ++r)
      sums[r] = _mm512_fmadd_ps(weights, _mm512_maskz_loadu_ps(lanes, rows + r * size + i), sums[r]);
  }
  for (int r = 0; r < kRows; ++r) out[r * row_stride] = _mm512_reduce_add_ps(sums[r]);
}

template <bool kPrefetch>
inline void dot_rows_avx512(const float* rows, int64_t count, const float* weight, int64_t size, int64_t begin,
                            int64_t end, float* out, int64_t row_stride, int64_t feature_stride) {
  for (int64_t j = begin; j < end; ++j) {
    const float* weight_row = weight + j * size;
    for (int64_t first = 0; first < count; first += 4) {
      const float* group = rows + first * size;
      float* group_out = out + first * row_stride + j * feature_stride;
      switch (std::min<int64_t>(count - first, 4)) {
        case 4: dot_weight_row<4, kPrefetch>(group, weight_row, size, group_out, row_stride); break;
        case 3: dot_weight_row<3, kPrefetch>(group, weight_row, size, group_out, row_stride); break;
        case 2: dot_weight_row<2, kPrefetch>(group, weight_row, size, group_out, row_stride); break;
        default: dot_weight_row<1, kPrefetch>(group, weight_row, size, group_out, row_stride); break;
      }
    }
  }
}

#endif  // __AVX512F__

// out[r * row_stride + j * feature_stride] = <weight row j, rows[r]> for r < count and j in
// [begin, end): rows [count, size] and weight [*, size] contiguous.
inline void dot_rows(const float* rows, int64_t count, const float* weight, int64_t size, int64_t begin,
                     int64_t end, float* out, int64_t row_stride, int64_t feature_stride) {
#ifdef __AVX512F__
  if (count > 4) {
    dot_rows_avx512<true>(rows, count, weight, size, begin, end, out, row_stride, feature_stride);
  } else {
    dot_rows_avx512<false>(rows, count, weight, size, begin, end, out, row_stride, feature_stride);
  }
#else
  // Without AVX-512: the weight rows are streamed once per pair of input rows (the pairs after
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
