// Block sizes, the problem's shape, the attention mask (causal, window, global tokens, landmarks,
// segments) and ALiBi.
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "simd.h"

namespace {

// Query rows per block: the backward's, and the forward's (kernels_cpu/flash_attention.py:
// BLOCK_Q). The forward streams every visible key and value block once per query block, so
// taller blocks read them fewer times (a 16k causal forward on an Intel Xeon: 64 rows 1.03 s,
// 128 rows 0.99 s, with values by head; torch SDPA 1.02 s).
constexpr int kBlockQ = 64;
constexpr int kForwardBlockQ = 128;
constexpr int kBlockK = 128;  // keys per block (a multiple of 16)
constexpr int kDiagonalRows = 4 * kTileRows;  // query rows per chunk where a mask cuts a block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Shape {
  int64_t B, T, S, N, K, H;
  int64_t group() const { return N / K; }
};

struct Mask {
  bool causal;
  int64_t window;  // 0: none
  int64_t global_tokens;
  int64_t landmark;  // 0: none
  int64_t q_offset;
  const int32_t* q_seg;  // [B or 1, T] or null
  const int32_t* kv_seg;  // [B or 1, S] or null
  int64_t q_seg_rows, kv_seg_rows;  // 1 (broadcast over the batch) or B
  int64_t q_len, kv_len;  // T, S

  bool Visible(int64_t i, int64_t j) const {
    if (causal && j > i) return false;
    if (window > 0 && j >= global_tokens) {
      const int64_t d = causal ? i - j : std::abs(i - j);
      if (d >= window) return false;
    }
    if (landmark > 0) {  // i >= j >= 0 here (landmarks need causal)
      if ((j + 1) % landmark == 0) return j / landmark < i / landmark;
      return j / landmark == i / landmark;
    }
    return true;
  }

  // Keys [lo, hi) that absolute query rows [i0, i1] may see by index, besides [0, global_hi).
  void KeyRange(int64_t i0, int64_t i1, int64_t S, int64_t* lo, int64_t* hi,
                int64_t* global_hi) const {
    *hi = S;
    if (causal) *hi = std::min(*hi, i1 + 1);
    else if (window > 0) *hi = std::min(*hi, i1 + window);
    *lo = window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0;
    *hi = std::max(*hi, int64_t{0});
    // Global keys escape the window, not causality.
    *global_hi = window > 0 ? std::min(global_tokens, causal ? *hi : S) : 0;
  }

  // Whether any key of [k0, k1) is visible to rows [i0, i1] by index.
  bool BlockVisible(int64_t i0, int64_t i1, int64_t k0, int64_t k1, int64_t S) const {
    int64_t lo, hi, ghi;
    KeyRange(i0, i1, S, &lo, &hi, &ghi);
    return (k0 < hi && k1 > lo) || k0 < ghi;
  }

  // Whether every key of [k0, k1) is visible to every row of [i0, i1] (no per-entry work).
  bool BlockFull(int64_t i0, int64_t i1, int64_t k0, int64_t k1) const {
    if (q_seg != nullptr || landmark > 0) return false;
    if (causal && k1 - 1 > i0) return false;
    if (window > 0 && k1 > global_tokens) {
      const int64_t far = causal ? i1 - k0 : std::max(i1 - k0, k1 - 1 - i0);
      if (far >= window) return false;
    }
    return true;
  }

  // How many keys from k0 on, at most `valid`, hold every key of [k0, k0 + valid) that rows
  // [i0, i1] may see: causality and windows bound them above (landmarks and segments only hide
  // keys that causality leaves).
  int SeenKeys(int64_t i0, int64_t i1, int64_t k0, int valid) const {
    int64_t lo, hi, global_hi;
    KeyRange(i0, i1, k0 + valid, &lo, &hi, &global_hi);
    return static_cast<int>(std::clamp<int64_t>(std::max(hi, global_hi) - k0, 0, valid));
  }

  // Sets s[r, c] = -inf for hidden (row, key) pairs and for key columns >= valid.
  void Apply(int64_t b, int64_t t0, int rows, int64_t k0, int valid, int cols, float* s,
             int64_t lds, bool full) const {
    // Without segments or landmarks a row sees the keys of an interval and the global tokens
    // (KeyRange of that row alone): hide the rest of the block as runs of columns, which costs
    // a fill where testing each entry cost about as much as the block's two GEMMs.
    const bool by_range = q_seg == nullptr && landmark == 0;
    for (int r = 0; r < rows; ++r) {
      float* row = s + r * lds;
      const int64_t i = q_offset + t0 + r;
      if (!full && by_range) {
        int64_t lo, hi, global_hi;
        KeyRange(i, i, k0 + valid, &lo, &hi, &global_hi);
        const auto column = [&](int64_t j) { return std::clamp<int64_t>(j - k0, 0, valid); };
        const int64_t c_lo = column(lo), c_hi = column(hi), c_global = column(global_hi);
        std::fill(row + c_global, row + std::max(c_global, c_lo), kNegInf);
        std::fill(row + std::max(c_global, c_hi), row + valid, kNegInf);
      } else if (!full) {
        for (int c = 0; c < valid; ++c) {
          const int64_t j = k0 + c;
          bool visible = Visible(i, j);
          if (visible && q_seg != nullptr) visible = QuerySegment(b, t0 + r) == KeySegment(b, j);
          if (!visible) row[c] = kNegInf;
        }
      }
      for (int c = valid; c < cols; ++c) row[c] = kNegInf;
    }
  }

  int32_t QuerySegment(int64_t b, int64_t t) const {
    return q_seg[(q_seg_rows == 1 ? 0 : b) * q_len + t];
  }
  int32_t KeySegment(int64_t b, int64_t j) const {
    return kv_seg[(kv_seg_rows == 1 ? 0 : b) * kv_len + j];
  }
};

// ALiBi's explicit positions and per-head slopes; `slopes` null means no bias.
struct Alibi {
  const float* slopes;  // [N]
  const int32_t* q_pos;  // [B or 1, T]
  const int32_t* kv_pos;  // [B or 1, S]
  int64_t q_rows, kv_rows, q_len, kv_len;

  bool on() const { return slopes != nullptr; }
  const int32_t* QueryPositions(int64_t b, int64_t t0) const {
    return q_pos + (q_rows == 1 ? 0 : b) * q_len + t0;
  }
  // The key positions of block [k0, k0 + valid) into `out` [kBlockK], zeros past `valid`.
  void KeyPositions(int64_t b, int64_t k0, int valid, int32_t* out) const {
    const int32_t* src = kv_pos + (kv_rows == 1 ? 0 : b) * kv_len + k0;
    std::copy_n(src, valid, out);
    std::fill(out + valid, out + kBlockK, 0);
  }
};

// |p_q - p_k| as floats for one row against a block of key positions (subtracted in int32,
// exact for any position, as `longjax.ops.AlibiBias` does).
inline vf Distance(int32_t q_position, const int32_t* key_positions) {
  vi d = LoadInt(key_positions) - q_position;
  d = d < 0 ? -d : d;
  return __builtin_convertvector(d, vf);
}

// s[r, c] -= slope * |q_pos[r] - kv_pos[c]| for c < cols.
void AddAlibi(float slope, const int32_t* q_positions, int rows, const int32_t* key_positions,
              int cols, float* s, int64_t lds) {
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * lds;
    for (int c = 0; c < cols; c += kLanes)
      Store(row + c, Load(row + c) - slope * Distance(q_positions[r], key_positions + c));
  }
}

}  // namespace
