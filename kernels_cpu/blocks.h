// Helpers every path shares: packed transposed key blocks, the online softmax of a block,
// and the operand layouts XLA hands the forward.
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <cstdint>

#include "gemm.h"
#include "mask.h"

namespace {

int RoundUp(int x, int m) { return (x + m - 1) / m * m; }

// Kt[h, c] = scale * k[row c, h] for c < valid, zero for valid <= c < kBlockK. Rows are `ld`
// apart.
void PackTransposed(const float* k, int64_t ld, int valid, int64_t H, float scale, float* kt) {
  for (int64_t h = 0; h < H; ++h) {
    float* dst = kt + h * kBlockK;
    for (int c = 0; c < valid; ++c) dst[c] = k[c * ld + h] * scale;
    for (int c = valid; c < kBlockK; ++c) dst[c] = 0.f;
  }
}

// One key block of the online softmax (FlashAttention-2): logits s[r, :cols] become
// probabilities relative to the updated running max m[r]; the normaliser l[r] and the output
// accumulator acc[r, :H] are rescaled to it. Rows with nothing visible yet are left alone (and
// their s zeroed, so that the caller's P V adds nothing).
void OnlineSoftmax(int rows, int cols, int64_t H, float* s, float* m, float* l, float* acc) {
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * kBlockK;
    vf vmax = Splat(kNegInf);
    for (int c = 0; c < cols; c += kLanes) {
      const vf x = Load(row + c);
      vmax = x > vmax ? x : vmax;
    }
    const float m_new = std::max(m[r], ReduceMax(vmax));
    if (m_new == kNegInf) {
      std::fill(row, row + cols, 0.f);
      continue;
    }
    const float alpha = std::exp(m[r] - m_new);  // exp(-inf) = 0 on the first visible block
    vf vsum = Splat(0.f);
    const vf shift = Splat(m_new);
    for (int c = 0; c < cols; c += kLanes) {
      const vf p = Exp(Load(row + c) - shift);
      Store(row + c, p);
      vsum += p;
    }
    l[r] = l[r] * alpha + ReduceSum(vsum);
    m[r] = m_new;
    if (alpha != 1.f)
      for (int64_t h = 0; h < H; h += kLanes) Store(acc + r * H + h, Load(acc + r * H + h) * alpha);
  }
}

// The number of key blocks of the transposed keys when `dims` (of the kernel's third operand,
// of rank `rank`) is their shape [B, K, S_blocks, H, kBlockK] with S_blocks * kBlockK >= S,
// else 0: the [1, 1, 1, 1] placeholder that makes ForwardBlock transpose each key block itself.
// (Reading the placeholder's last dimension as a length once made a call with S = 1 read keys
// past the end of the placeholder.)
int64_t TransposedKeyBlocks(const Shape& sh, const int64_t* dims, size_t rank) {
  const bool real = rank == 5 && dims[0] == sh.B && dims[1] == sh.K && dims[3] == sh.H &&
                    dims[4] == kBlockK && dims[2] * kBlockK >= sh.S;
  return real ? dims[2] : 0;
}

// Whether `dims` (of the kernel's fifth operand, of rank `rank`) are [B, K, S, H]: the values
// by head, else the [1, 1, 1, 1] placeholder (one query block, decoding).
bool ValuesByHead(const Shape& sh, const int64_t* dims, size_t rank) {
  return rank == 4 && dims[0] == sh.B && dims[1] == sh.K && dims[2] == sh.S && dims[3] == sh.H;
}

}  // namespace
