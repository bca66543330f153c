// Register-tiled GEMM micro-kernels on the vectors of simd.h.
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <cstdint>

#include "simd.h"

namespace {

// C[R, V*kLanes] (+)= sum_k A(r, k) * B[k, :] with A(r, k) = a[r * a_row + k * a_col]: adds to
// C when Add, else overwrites it (so callers need not zero C first).
template <int R, int V, bool Add>
inline void Tile(int depth, const float* a, int64_t a_row, int64_t a_col, const float* b,
                 int64_t ldb, float* c, int64_t ldc) {
  vf acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = Add ? Load(c + r * ldc + v * kLanes) : vf{};
  for (int k = 0; k < depth; ++k) {
    vf bk[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bk[v] = Load(b + k * ldb + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf ar = Splat(a[r * a_row + k * a_col]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] += ar * bk[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) Store(c + r * ldc + v * kLanes, acc[r][v]);
}

// The last rows < kTileRows as one tile of exactly that many rows.
template <int V, bool Add, int R>
inline void TileRemainder(int rows, int depth, const float* a, int64_t a_row, int64_t a_col,
                          const float* b, int64_t ldb, float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R) return Tile<R, V, Add>(depth, a, a_row, a_col, b, ldb, c, ldc);
    TileRemainder<V, Add, R - 1>(rows, depth, a, a_row, a_col, b, ldb, c, ldc);
  }
}

// Rows in tiles of kTileRows, then one tile of the rest (row by row would cost a load per
// multiply-add).
template <int V, bool Add>
inline void TileRows(int rows, int depth, const float* a, int64_t a_row, int64_t a_col,
                     const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (; rows >= kTileRows; rows -= kTileRows, a += kTileRows * a_row, c += kTileRows * ldc)
    Tile<kTileRows, V, Add>(depth, a, a_row, a_col, b, ldb, c, ldc);
  TileRemainder<V, Add, kTileRows - 1>(rows, depth, a, a_row, a_col, b, ldb, c, ldc);
}

// C[m, n] += A[m, depth] B[depth, n] (C = A B with Add false); A(r, k) = a[r * a_row + k * a_col]
// (any strides, so a transposed A costs nothing); rows of B and C contiguous in n,
// n % kLanes == 0.
template <bool Add = true>
void Gemm(int m, int n, int depth, const float* a, int64_t a_row, int64_t a_col, const float* b,
          int64_t ldb, float* c, int64_t ldc) {
  int j = 0;
  for (; j + kTileCols <= n; j += kTileCols)
    TileRows<kTileVecs, Add>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
  for (; j + 2 * kLanes <= n; j += 2 * kLanes)
    TileRows<2, Add>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
  for (; j < n; j += kLanes) TileRows<1, Add>(m, depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
}

}  // namespace
