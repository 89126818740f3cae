// Dot products of a few input rows with many weight rows, for products bound by reading the
// weights (small_batch_linear, and multihead_unembed_topk with few rows). MKL's GEMM over so
// thin a matrix, and even its GEMV, streams the weights well below memory speed on the
// project's CPU; this reads each weight row once, in order, against two input rows at a time:
// four input rows (or two weight rows at once) made the loop load-bound there.
#pragma once

#include <cstdint>

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

// out[r * row_stride + j * feature_stride] = <weight row j, rows[r]> for r < count and j in
// [begin, end): rows [count, size] and weight [*, size] contiguous. The weight rows are streamed
// once per pair of input rows (the pairs after the first find them in cache when begin..end is
// a thread's share).
inline void dot_rows(const float* rows, int64_t count, const float* weight, int64_t size, int64_t begin,
                     int64_t end, float* out, int64_t row_stride, int64_t feature_stride) {
  for (int64_t first = 0; first < count; first += 2) {
    const float* pair = rows + first * size;
    float* pair_out = out + first * row_stride;
    if (count - first == 1) {
      dot_two_rows<1>(pair, weight, size, begin, end, pair_out, row_stride, feature_stride);
    } else {
      dot_two_rows<2>(pair, weight, size, begin, end, pair_out, row_stride, feature_stride);
    }
  }
}

}  // namespace mtp_ext
