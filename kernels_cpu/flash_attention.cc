// Fused flash attention for the CPU, forward and backward, as XLA FFI custom calls.
//
// Why this exists: XLA's CPU backend runs a blockwise attention as one GEMM call per block plus
// separate elementwise fusions that stream every [C, C] tile through memory (transposed copies,
// exp, masks, rescaling); that measured 0.5-0.7x PyTorch's fused SDPA kernel (docs/kernels.md).
// Here each block's logits, softmax and products stay in per-thread scratch that fits the L1/L2
// caches, as in FlashAttention-2 (Dao 2023), with register-tiled GEMM micro-kernels written with
// GCC vector extensions (AVX-512 or AVX2 code, whichever the build machine has: -march=native).
//
// Layouts are those of `longjax.ops.dot_product_attention`, read in place with strides:
//   q, out  [B, T, N, H]     k, v, dk, dv  [B, S, K, H]     lse, delta  [B, N, T]
// except that the backward takes q and dout and returns dq by head, [B, N, T, H] (XLA
// transposes them; see BackwardHead), and the forward may be given keys and values laid out
// for its GEMMs (ForwardBlock).
// All float32; H % 16 == 0. Query head n uses kv head n / (N / K) (GQA without repeating K/V).
// Query row t has absolute index i = q_offset + t (a runtime scalar, so decoding with a growing
// cache does not recompile); key j is visible to it when
//   causal -> j <= i;  window w > 0 -> i - j < w (causal) or |i - j| < w, unless j < global;
//   landmark period L > 0 (with causal) -> keys with (j + 1) % L == 0 are landmarks; i sees the
//     non-landmark keys of its own block (j / L == i / L) and earlier blocks' landmarks;
//   segment ids given -> q_seg[b, t] == kv_seg[b, j].
// Rows that see no key give out = 0, lse = -inf (and zero gradients). With ALiBi (Press et al.
// 2022) the logits get -slope[n] * |q_pos[b, t] - kv_pos[b, j]| from explicit positions, and
// the backward also returns d(slopes) per batch row.
//
// Parallelism: forward tasks are (batch, head, query block); backward tasks are (batch, kv head),
// each owning its dk/dv and the dq rows of its query heads, so no two tasks write the same memory.
// Tasks run on XLA's intra-op thread pool, the calling thread included.
//
// Files: simd.h (vectors, reductions, exp) < gemm.h (register-tiled GEMMs); mask.h (block sizes,
// shape, mask, ALiBi); thread_pool.h (ParallelFor); blocks.h (packed keys, online softmax) <
// decode.h (split-cache decode) < forward.h; backward.h; this file: shape checks and the FFI
// handlers. One translation unit, so the parts inline into each other as one file did.

#include <cstdint>

#include "backward.h"
#include "forward.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error CheckShapes(const Shape& sh) {
  if (sh.H % 16 != 0)
    return ffi::Error::InvalidArgument("head dim must be a multiple of 16");
  if (sh.K <= 0 || sh.N % sh.K != 0)
    return ffi::Error::InvalidArgument("query heads must be a multiple of kv heads");
  return ffi::Error::Success();
}

// From q [B, T, N, H] (or by head, [B, N, T, H]) and k [B, S, K, H].
Shape ShapeOf(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, bool by_head = false) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const int64_t T = by_head ? qd[2] : qd[1], N = by_head ? qd[1] : qd[2];
  return Shape{qd[0], T, kd[1], N, kd[2], qd[3]};
}

Mask MaskOf(const Shape& sh, bool causal, int64_t window, int64_t global_tokens,
            int64_t landmark, ffi::Buffer<ffi::S32>& q_offset, ffi::Buffer<ffi::S32>& q_seg,
            ffi::Buffer<ffi::S32>& kv_seg, bool segments) {
  Mask mask{causal, window, global_tokens, landmark, q_offset.typed_data()[0], nullptr, nullptr,
            1, 1, sh.T, sh.S};
  if (segments) {
    mask.q_seg = q_seg.typed_data();
    mask.kv_seg = kv_seg.typed_data();
    mask.q_seg_rows = q_seg.dimensions()[0];
    mask.kv_seg_rows = kv_seg.dimensions()[0];
  }
  return mask;
}

Alibi AlibiOf(const Shape& sh, ffi::Buffer<ffi::F32>& slopes, ffi::Buffer<ffi::S32>& q_pos,
              ffi::Buffer<ffi::S32>& kv_pos, bool alibi) {
  if (!alibi) return Alibi{nullptr, nullptr, nullptr, 1, 1, sh.T, sh.S};
  return Alibi{slopes.typed_data(), q_pos.typed_data(), kv_pos.typed_data(),
               q_pos.dimensions()[0], kv_pos.dimensions()[0], sh.T, sh.S};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> kt, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> v_by_head, ffi::Buffer<ffi::S32> q_offset,
                   ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg,
                   ffi::Buffer<ffi::F32> slopes,
                   ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_pos,
                   ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, float scale, bool causal, int64_t window,
                   int64_t global_tokens, int64_t landmark_block, bool segments, bool alibi) {
  const Shape sh = ShapeOf(q, k);
  if (auto error = CheckShapes(sh); error.failure()) return error;
  const Mask mask = MaskOf(sh, causal, window, global_tokens, landmark_block, q_offset, q_seg,
                           kv_seg, segments);
  const Alibi bias = AlibiOf(sh, slopes, q_pos, kv_pos, alibi);
  ForwardAll(pool, sh, mask, bias, scale, q.typed_data(), k.typed_data(), kt.typed_data(),
             TransposedKeyBlocks(sh, kt.dimensions().begin(), kt.dimensions().size()),
             v.typed_data(),
             ValuesByHead(sh, v_by_head.dimensions().begin(), v_by_head.dimensions().size())
                 ? v_by_head.typed_data() : nullptr,
             out->typed_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> dout,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> delta,
                    ffi::Buffer<ffi::S32> q_offset, ffi::Buffer<ffi::S32> q_seg,
                    ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::F32> slopes,
                    ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_pos,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dslopes,
                    float scale, bool causal, int64_t window, int64_t global_tokens,
                    int64_t landmark_block, bool segments, bool alibi) {
  const Shape sh = ShapeOf(q, k, /*by_head=*/true);
  if (auto error = CheckShapes(sh); error.failure()) return error;
  const Mask mask = MaskOf(sh, causal, window, global_tokens, landmark_block, q_offset, q_seg,
                           kv_seg, segments);
  const Alibi bias = AlibiOf(sh, slopes, q_pos, kv_pos, alibi);
  BackwardAll(pool, sh, mask, bias, scale, q.typed_data(), k.typed_data(), v.typed_data(),
              dout.typed_data(), lse.typed_data(), delta.typed_data(), dq->typed_data(),
              dk->typed_data(), dv->typed_data(), dslopes->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongjaxFlashForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k transposed or [1,1,1,1]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v by head or [1,1,1,1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_offset []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_segment_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_segment_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ALiBi slopes [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // key positions
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("global_tokens")
                                  .Attr<int64_t>("landmark_block")
                                  .Attr<bool>("segments")
                                  .Attr<bool>("alibi"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LongjaxFlashBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q by head
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout by head
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_offset []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_segment_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_segment_ids
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ALiBi slopes [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query positions
                                  .Arg<ffi::Buffer<ffi::S32>>()  // key positions
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq by head
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d(slopes) per batch row [B, N]
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("global_tokens")
                                  .Attr<int64_t>("landmark_block")
                                  .Attr<bool>("segments")
                                  .Attr<bool>("alibi"));
