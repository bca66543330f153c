// The backward (FlashAttention-2): a task per (batch row, kv head), owning its dk, dv and
// the dq rows of its query heads.
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <cstdint>
#include <vector>

#include "blocks.h"
#include "thread_pool.h"

namespace {

// dq, dk, dv of kv head `kvh` of batch row `b` and of its query heads (and, with ALiBi, the
// row's d(slope) of those heads into dslopes[b, n]). q, dout and dq are by head, [B, N, T, H]:
// every key block streams all of a head's query rows, which in [B, T, N, H] lie N * H floats
// apart (2 KiB for 8 heads of 64), over few L1 sets and N times as many pages (fwd+bwd, B 1,
// T 16k, Intel Xeon: 3.5 -> 3.25 s; T 1k: unchanged).
void BackwardHead(const Shape& sh, const Mask& mask, const Alibi& alibi, float scale,
                  const float* q, const float* k, const float* v, const float* dout,
                  const float* lse, const float* delta, float* dq, float* dk, float* dv,
                  float* dslopes, int64_t b, int64_t kvh) {
  const int64_t H = sh.H, N = sh.N, K = sh.K, G = sh.group();
  thread_local std::vector<float> scratch;
  scratch.resize(2 * H * kBlockK + 2 * kBlockQ * kBlockK + 2 * kBlockK * H);
  float* kt = scratch.data();          // [H, kBlockK] packed keys
  float* vt = kt + H * kBlockK;        // [H, kBlockK] packed values
  float* p = vt + H * kBlockK;         // [rows, kBlockK] probabilities
  float* ds = p + kBlockQ * kBlockK;   // [rows, kBlockK] dP, then scale * dS
  float* dk_acc = ds + kBlockQ * kBlockK;  // [kBlockK, H]
  float* dv_acc = dk_acc + kBlockK * H;    // [kBlockK, H]
  thread_local std::vector<int32_t> key_positions(kBlockK);

  for (int64_t g = 0; g < G; ++g) {
    dslopes[b * N + kvh * G + g] = 0.f;
    for (int64_t t = 0; t < sh.T; ++t)
      std::fill_n(dq + ((b * N + kvh * G + g) * sh.T + t) * H, H, 0.f);
  }

  for (int64_t k0 = 0; k0 < sh.S; k0 += kBlockK) {
    const int valid = static_cast<int>(std::min<int64_t>(kBlockK, sh.S - k0));
    const float* kb = k + ((b * sh.S + k0) * K + kvh) * H;
    const float* vb = v + ((b * sh.S + k0) * K + kvh) * H;
    bool packed = false;
    std::fill_n(dk_acc, valid * H, 0.f);
    std::fill_n(dv_acc, valid * H, 0.f);
    if (alibi.on()) alibi.KeyPositions(b, k0, valid, key_positions.data());
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kvh * G + g;
      for (int64_t t0 = 0; t0 < sh.T; t0 += kBlockQ) {
        const int rows = static_cast<int>(std::min<int64_t>(kBlockQ, sh.T - t0));
        const int64_t i0 = mask.q_offset + t0, i1 = i0 + rows - 1;
        if (!mask.BlockVisible(i0, i1, k0, k0 + valid, sh.S)) continue;
        if (!packed) {
          PackTransposed(kb, K * H, valid, H, scale, kt);  // so that Q Kt are scaled logits
          PackTransposed(vb, K * H, valid, H, 1.f, vt);
          packed = true;
        }
        // Keys past `seen` are hidden from all these rows (past the causal diagonal): the block
        // is computed as if it ended there.
        const int seen = mask.SeenKeys(i0, i1, k0, valid), cols = RoundUp(seen, 16);
        const float* qb = q + ((b * N + n) * sh.T + t0) * H;
        const float* dob = dout + ((b * N + n) * sh.T + t0) * H;
        float* dqb = dq + ((b * N + n) * sh.T + t0) * H;
        const float* lse_rows = lse + (b * N + n) * sh.T + t0;
        const float* delta_rows = delta + (b * N + n) * sh.T + t0;

        Gemm<false>(rows, cols, static_cast<int>(H), qb, H, 1, kt, kBlockK, p, kBlockK);
        const vf vscale = Splat(scale);
        const int32_t* q_positions = alibi.on() ? alibi.QueryPositions(b, t0) : nullptr;
        if (alibi.on())
          AddAlibi(alibi.slopes[n], q_positions, rows, key_positions.data(), cols, p, kBlockK);
        mask.Apply(b, t0, rows, k0, seen, cols, p, kBlockK, mask.BlockFull(i0, i1, k0, k0 + seen));
        for (int r = 0; r < rows; ++r) {
          float* row = p + r * kBlockK;
          if (lse_rows[r] == kNegInf) {
            std::fill_n(row, cols, 0.f);
            continue;
          }
          const vf shift = Splat(lse_rows[r]);
          for (int c = 0; c < cols; c += kLanes) Store(row + c, Exp(Load(row + c) - shift));
        }
        // dV += P^T dO
        Gemm(seen, static_cast<int>(H), rows, p, 1, kBlockK, dob, H, dv_acc, H);
        // dP = dO V^T, then dS = P (dP - delta), the gradient of the biased logits; stored
        // scaled (for dQ, dK). d(slope) = -sum dS |p_q - p_k|.
        Gemm<false>(rows, cols, static_cast<int>(H), dob, H, 1, vt, kBlockK, ds, kBlockK);
        vf dslope = Splat(0.f);
        for (int r = 0; r < rows; ++r) {
          float* dsr = ds + r * kBlockK;
          const float* pr = p + r * kBlockK;
          const vf d = Splat(delta_rows[r]);
          for (int c = 0; c < cols; c += kLanes) {
            const vf dlogit = Load(pr + c) * (Load(dsr + c) - d);
            if (q_positions != nullptr)
              dslope -= dlogit * Distance(q_positions[r], key_positions.data() + c);
            Store(dsr + c, dlogit * vscale);
          }
        }
        if (q_positions != nullptr) dslopes[b * N + n] += ReduceSum(dslope);
        // dQ += dS K; dK += dS^T Q
        Gemm(rows, static_cast<int>(H), seen, ds, kBlockK, 1, kb, K * H, dqb, H);
        Gemm(seen, static_cast<int>(H), rows, ds, 1, kBlockK, qb, H, dk_acc, H);
      }
    }
    for (int c = 0; c < valid; ++c) {
      std::copy_n(dk_acc + c * H, H, dk + ((b * sh.S + k0 + c) * K + kvh) * H);
      std::copy_n(dv_acc + c * H, H, dv + ((b * sh.S + k0 + c) * K + kvh) * H);
    }
  }
}

// The backward of every (batch row, kv head), as tasks on `pool`.
template <typename Pool>
void BackwardAll(Pool& pool, const Shape& sh, const Mask& mask, const Alibi& alibi, float scale,
                 const float* q, const float* k, const float* v, const float* dout,
                 const float* lse, const float* delta, float* dq, float* dk, float* dv,
                 float* dslopes) {
  ParallelFor(pool, sh.B * sh.K, [&](int64_t task) {
    BackwardHead(sh, mask, alibi, scale, q, k, v, dout, lse, delta, dq, dk, dv, dslopes,
                 task / sh.K, task % sh.K);
  });
}

}  // namespace
