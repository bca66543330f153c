// The decode path: a few query rows against a long cache, split into chunks merged by
// log-sum-exp (flash-decoding).
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <algorithm>
#include <cstdint>

#include "blocks.h"

namespace {

// Decoding: up to this many query rows take the split-cache path below.
constexpr int kDecodeRows = 4;
// Keys per decode task at least (a multiple of kBlockK): enough work to pay for a task.
constexpr int64_t kMinChunk = 512;

// The decode path splits the visible cache [0, hi) into chunks, a task per (batch row, chunk),
// as flash-decoding does across GPU thread blocks. Each task reads its chunk of K and V front to
// back, every kv head at once: a cache row [K, H] is contiguous but one head's keys are K * H
// floats apart, and the per-head tasks of the blocked path streamed a long cache at about half
// of the memory bandwidth (docs/kernels.md). Tasks leave per (query head, row) partial softmax
// state that MergeDecodeChunks combines by log-sum-exp.
struct DecodePlan {
  int64_t chunk, chunks;  // keys per chunk, chunks per batch row
};

DecodePlan PlanDecode(const Shape& sh, const Mask& mask, int64_t threads) {
  int64_t lo, hi, global_hi;
  mask.KeyRange(mask.q_offset, mask.q_offset + sh.T - 1, sh.S, &lo, &hi, &global_hi);
  hi = std::max(hi, global_hi);  // global tokens may lie past a bidirectional window
  // Four chunks per thread evens out chunks that the mask partly hides.
  const int64_t wanted = std::max<int64_t>(1, 4 * threads / std::max<int64_t>(sh.B, 1));
  int64_t chunk = (hi + wanted - 1) / wanted;
  chunk = std::max(kMinChunk, (chunk + kBlockK - 1) / kBlockK * kBlockK);
  return {chunk, std::max<int64_t>(1, (hi + chunk - 1) / chunk)};
}

// Partial softmax of every query head's rows against keys [k0, k1) of batch row b: running max
// `pm`, normaliser `pl` [N * T] and unnormalised output `pacc` [N * T, H], rows n * T + t.
void DecodeChunk(const Shape& sh, const Mask& mask, const Alibi& alibi, float scale,
                 const float* q, const float* k, const float* v, int64_t b, int64_t k0,
                 int64_t k1, float* pm, float* pl, float* pacc) {
  const int64_t H = sh.H, N = sh.N, K = sh.K, G = sh.group(), T = sh.T;
  const int rows = static_cast<int>(T);
  const int64_t heads_rows = N * T;
  thread_local std::vector<float> scratch;
  scratch.resize(heads_rows * H + heads_rows * kBlockK);
  float* qs = scratch.data();          // [N * T, H] scaled queries
  float* s = qs + heads_rows * H;      // [N * T, kBlockK] logits, then probabilities
  thread_local std::vector<int32_t> key_positions(kBlockK);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        qs[(n * T + t) * H + h] = q[((b * T + t) * N + n) * H + h] * scale;
  std::fill(pm, pm + heads_rows, kNegInf);
  std::fill(pl, pl + heads_rows, 0.f);
  std::fill(pacc, pacc + heads_rows * H, 0.f);

  const int64_t i0 = mask.q_offset, i1 = i0 + T - 1;
  for (int64_t j0 = k0; j0 < k1; j0 += kBlockK) {
    const int valid = static_cast<int>(std::min<int64_t>(kBlockK, k1 - j0));
    if (!mask.BlockVisible(i0, i1, j0, j0 + valid, sh.S)) continue;
    const int cols = RoundUp(valid, 16);
    // Logits in the cache's memory order: key row c, then its kv heads, then their query heads,
    // summed up kLanes dot products at a time (ReduceSums).
    vf dots[kLanes];
    int64_t at[kLanes];  // where each pending dot goes in s
    int pending = 0;
    const auto flush = [&]() {
      for (int i = pending; i < kLanes; ++i) dots[i] = Splat(0.f);
      const vf sums = ReduceSums(dots);
      for (int i = 0; i < pending; ++i) s[at[i]] = sums[i];
      pending = 0;
    };
    for (int c = 0; c < valid; ++c) {
      const float* key_row = k + (b * sh.S + j0 + c) * K * H;
      for (int64_t kvh = 0; kvh < K; ++kvh) {
        const float* key = key_row + kvh * H;
        for (int64_t r = kvh * G * T; r < (kvh + 1) * G * T; ++r) {
          vf acc = Splat(0.f);
          for (int64_t h = 0; h < H; h += kLanes) acc += Load(qs + r * H + h) * Load(key + h);
          dots[pending] = acc;
          at[pending] = r * kBlockK + c;
          if (++pending == kLanes) flush();
        }
      }
    }
    if (pending > 0) flush();
    if (alibi.on()) alibi.KeyPositions(b, j0, valid, key_positions.data());
    const bool full = mask.BlockFull(i0, i1, j0, j0 + valid);
    for (int64_t n = 0; n < N; ++n) {
      float* sn = s + n * T * kBlockK;
      if (alibi.on())
        AddAlibi(alibi.slopes[n], alibi.QueryPositions(b, 0), rows, key_positions.data(), cols,
                 sn, kBlockK);
      mask.Apply(b, 0, rows, j0, valid, cols, sn, kBlockK, full);
    }
    OnlineSoftmax(static_cast<int>(heads_rows), cols, H, s, pm, pl, pacc);
    for (int64_t n = 0; n < N; ++n)
      Gemm(rows, static_cast<int>(H), valid, s + n * T * kBlockK, kBlockK, 1,
           v + ((b * sh.S + j0) * K + n / G) * H, K * H, pacc + n * T * H, H);
  }
}

// out [B, T, N, H] and lse [B, N, T] from the chunks' partials ([B, chunks, N * T] and
// [B, chunks, N * T, H]): each chunk's normaliser and output rescaled to the common max.
void MergeDecodeChunks(const Shape& sh, int64_t chunks, const float* pm, const float* pl,
                       const float* pacc, float* out, float* lse) {
  const int64_t H = sh.H, N = sh.N, T = sh.T, heads_rows = N * T;
  std::vector<float> merged(H);
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t row = 0; row < heads_rows; ++row) {
      const int64_t n = row / T, t = row % T;
      float m = kNegInf;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, pm[(b * chunks + c) * heads_rows + row]);
      float l = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      if (m != kNegInf)
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t at = (b * chunks + c) * heads_rows + row;
          if (pm[at] == kNegInf) continue;
          const float w = std::exp(pm[at] - m);
          l += pl[at] * w;
          for (int64_t h = 0; h < H; ++h) merged[h] += pacc[at * H + h] * w;
        }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float* o = out + ((b * T + t) * N + n) * H;
      for (int64_t h = 0; h < H; ++h) o[h] = merged[h] * inv;
      lse[(b * N + n) * T + t] = l > 0.f ? m + std::log(l) : kNegInf;
    }
}

}  // namespace
