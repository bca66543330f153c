// The forward: a task per (batch row, query head, query block); decode calls go to decode.h.
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <cstdint>
#include <vector>

#include "blocks.h"
#include "decode.h"
#include "thread_pool.h"

namespace {

// Rows [t0, t0 + kForwardBlockQ) of query head n of batch row b. With several query blocks per
// head, XLA lays out keys and values for the GEMMs once, rather than once per query block here:
// `kt_all` holds the keys transposed block by block, [B, K, kt_blocks, H, kBlockK] (zeros past
// S), and `v_by_head` the values [B, K, S, H]. With one query block (short prompts) kt_blocks
// is 0 and v_by_head null: each key block is transposed here and values read in place. Block by
// block, because with [B, K, H, S] the GEMM's rows of keys were S floats apart: a multiple of
// 4 KiB, so every row fell in the same L1 cache set (a 16k causal forward on an Intel Xeon:
// 1.14 -> 1.07 s). Values by head for a milder form of the same: in v one head's rows are K * H
// floats apart (2 KiB for 8 heads of 64), over few L1 sets and K times as many pages (1.16 ->
// 1.03 s).
void ForwardBlock(const Shape& sh, const Mask& mask, const Alibi& alibi, float scale,
                  const float* q, const float* k, const float* kt_all, int64_t kt_blocks,
                  const float* v, const float* v_by_head, float* out, float* lse, int64_t b,
                  int64_t n, int64_t t0) {
  const int64_t H = sh.H, N = sh.N, K = sh.K, kvh = n / sh.group();
  constexpr int kRows = kForwardBlockQ;
  const int rows = static_cast<int>(std::min<int64_t>(kRows, sh.T - t0));
  thread_local std::vector<float> scratch;
  scratch.resize(kRows * H * 2 + H * kBlockK + kRows * kBlockK + 2 * kRows);
  float* qs = scratch.data();         // [rows, H] scaled queries
  float* acc = qs + kRows * H;        // [rows, H] output accumulator
  float* packed = acc + kRows * H;    // [H, kBlockK] keys transposed here (no kt_all)
  float* s = packed + H * kBlockK;    // [rows, kBlockK] logits, then probabilities
  float* m = s + kRows * kBlockK;     // [rows] running max
  float* l = m + kRows;               // [rows] running normaliser
  thread_local std::vector<int32_t> key_positions(kBlockK);

  const float* q0 = q + ((b * sh.T + t0) * N + n) * H;
  for (int r = 0; r < rows; ++r)
    for (int64_t h = 0; h < H; ++h) qs[r * H + h] = q0[r * N * H + h] * scale;
  std::fill(acc, acc + rows * H, 0.f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.f);

  const int64_t i0 = mask.q_offset + t0, i1 = i0 + rows - 1;
  for (int64_t k0 = 0; k0 < sh.S; k0 += kBlockK) {
    const int valid = static_cast<int>(std::min<int64_t>(kBlockK, sh.S - k0));
    if (!mask.BlockVisible(i0, i1, k0, k0 + valid, sh.S)) continue;
    const float* kb = k + ((b * sh.S + k0) * K + kvh) * H;
    // Keys transposed: XLA's copy when it made one, else this block's, in cache.
    const bool given = kt_blocks > 0;
    if (!given) PackTransposed(kb, K * H, valid, H, 1.f, packed);
    const float* kt = given ? kt_all + ((b * K + kvh) * kt_blocks + k0 / kBlockK) * H * kBlockK
                            : packed;
    const float* vb = v_by_head ? v_by_head + ((b * K + kvh) * sh.S + k0) * H
                                : v + ((b * sh.S + k0) * K + kvh) * H;
    if (alibi.on()) alibi.KeyPositions(b, k0, valid, key_positions.data());
    // Where the mask cuts through the block (the causal diagonal), rows go in chunks that each
    // compute only the keys they may see: about half of a diagonal block's work is skipped.
    const int chunk = mask.BlockFull(i0, i1, k0, k0 + valid) ? rows : kDiagonalRows;
    for (int r0 = 0; r0 < rows; r0 += chunk) {
      const int n_rows = std::min(chunk, rows - r0);
      const int64_t c0 = i0 + r0, c1 = c0 + n_rows - 1;
      const int seen = mask.SeenKeys(c0, c1, k0, valid);
      if (seen == 0) continue;
      const int cols = RoundUp(seen, 16);
      float* sc = s + r0 * kBlockK;
      Gemm<false>(n_rows, cols, static_cast<int>(H), qs + r0 * H, H, 1, kt, kBlockK, sc, kBlockK);
      if (alibi.on())
        AddAlibi(alibi.slopes[n], alibi.QueryPositions(b, t0 + r0), n_rows, key_positions.data(),
                 cols, sc, kBlockK);
      mask.Apply(b, t0 + r0, n_rows, k0, seen, cols, sc, kBlockK,
                 mask.BlockFull(c0, c1, k0, k0 + seen));
      OnlineSoftmax(n_rows, cols, H, sc, m + r0, l + r0, acc + r0 * H);
      Gemm(n_rows, static_cast<int>(H), seen, sc, kBlockK, 1, vb, v_by_head ? H : K * H,
           acc + r0 * H, H);
    }
  }

  float* o = out + ((b * sh.T + t0) * N + n) * H;
  float* lse_row = lse + (b * N + n) * sh.T + t0;
  for (int r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int64_t h = 0; h < H; ++h) o[r * N * H + h] = acc[r * H + h] * inv;
    lse_row[r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
  }
}

// The forward of every (batch row, query head, query block), or the decode path for a few
// query rows, as tasks on `pool` (see ParallelFor).
template <typename Pool>
void ForwardAll(Pool& pool, const Shape& sh, const Mask& mask, const Alibi& alibi, float scale,
                const float* q, const float* k, const float* kt, int64_t kt_blocks, const float* v,
                const float* v_by_head, float* out, float* lse) {
  if (sh.T <= kDecodeRows) {
    const DecodePlan plan = PlanDecode(sh, mask, pool.num_threads());
    const int64_t heads_rows = sh.N * sh.T, tasks = sh.B * plan.chunks;
    std::vector<float> pm(tasks * heads_rows), pl(tasks * heads_rows),
        pacc(tasks * heads_rows * sh.H);
    ParallelFor(pool, tasks, [&](int64_t task) {
      const int64_t b = task / plan.chunks, k0 = task % plan.chunks * plan.chunk;
      DecodeChunk(sh, mask, alibi, scale, q, k, v, b, k0, std::min(sh.S, k0 + plan.chunk),
                  pm.data() + task * heads_rows, pl.data() + task * heads_rows,
                  pacc.data() + task * heads_rows * sh.H);
    });
    MergeDecodeChunks(sh, plan.chunks, pm.data(), pl.data(), pacc.data(), out, lse);
    return;
  }
  const int64_t q_blocks = (sh.T + kForwardBlockQ - 1) / kForwardBlockQ;
  ParallelFor(pool, sh.B * sh.N * q_blocks, [&](int64_t task) {
    const int64_t qb = task % q_blocks, bn = task / q_blocks;
    ForwardBlock(sh, mask, alibi, scale, q, k, kt, kt_blocks, v, v_by_head, out, lse, bn / sh.N,
                 bn % sh.N, qb * kForwardBlockQ);
  });
}

}  // namespace
