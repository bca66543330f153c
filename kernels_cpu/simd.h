// Vector types and lane operations (AVX-512 or AVX2 via GCC vector extensions), reductions, exp.
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

namespace {

#ifdef __AVX512F__
constexpr int kLanes = 16;
constexpr int kTileRows = 6;  // 6 rows x 4 vectors = 24 of the 32 zmm registers accumulate
#else
constexpr int kLanes = 8;
constexpr int kTileRows = 3;  // 3 x 4 = 12 of the 16 ymm registers
#endif
constexpr int kTileVecs = 4;
constexpr int kTileCols = kTileVecs * kLanes;

// Unaligned (aligned(4)) and may_alias, so that Load and Store are single vector moves from and
// to any float array. (They were memcpy, which GCC tuned for recent Intel cores expands to two
// 256-bit stores and one 512-bit reload of the stack: a store-forwarding stall on every load,
// that made the decode path 2.5x slower on such a machine than on an AMD one.)
typedef float vf __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));

inline vf Load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void Store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vi LoadInt(const int32_t* p) { return *reinterpret_cast<const vi*>(p); }
// x - 0 is x for every x (where 0 + x is not, for x = -0), so this folds to a broadcast; 0 + x
// cost a scalar add and a register broadcast per use, on the FMA ports of Intel cores.
inline vf Splat(float x) { return x - vf{}; }

// Shuffles with constant lane indices: __builtin_shufflevector (clang, GCC >= 12), or on older
// GCC __builtin_shuffle with the indices as a constant vector (it folds them the same way).
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUFFLE(x, y, ...) __builtin_shuffle(x, y, vi{__VA_ARGS__})
#endif

// Lane i + W (mod kLanes) of v in lane i. Butterfly combines v with it for W = kLanes / 2, ...,
// 2, 1: log2(kLanes) steps leave every lane holding the whole reduction. (A loop over the lanes
// is a serial chain of kLanes - 1 operations: GCC may not reassociate float adds.)
template <int W, int... I>
inline vf Rotate(vf v, std::integer_sequence<int, I...>) {
  return SHUFFLE(v, v, ((I + W) % kLanes)...);
}
template <int W>
inline vf Rotate(vf v) {
  return Rotate<W>(v, std::make_integer_sequence<int, kLanes>());
}
template <int W = kLanes / 2, typename Combine>
inline vf Butterfly(vf v, Combine combine) {
  v = combine(v, Rotate<W>(v));
  if constexpr (W > 1) {
    return Butterfly<W / 2>(v, combine);
  } else {
    return v;
  }
}
inline float ReduceMax(vf v) {
  return Butterfly(v, [](vf a, vf b) { return a > b ? a : b; })[0];
}
inline float ReduceSum(vf v) {
  return Butterfly(v, [](vf a, vf b) { return a + b; })[0];
}

// Many dot products at once: lane i of ReduceSums(a) is the sum of a[i]'s lanes, for kLanes
// vectors a (overwritten). A transpose-and-add tree: each level folds every item (a run of W
// lanes of one a[i]) to its half, packing two vectors' items into one, so kLanes sums take
// kLanes - 1 shuffle pairs, where ReduceSum takes a dependent chain of kLanes - 1 adds per sum.
// FoldLane(W, i, high) is the source lane, in shufflevector's numbering (y's lanes come after
// x's), of output lane i: the low (or high) half of an item of x for i < kLanes / 2, else of y.
constexpr int FoldLane(int W, int i, bool high) {
  const int half = kLanes / 2, j = i % half;
  return (i < half ? 0 : kLanes) + j / (W / 2) * W + j % (W / 2) + (high ? W / 2 : 0);
}
template <int W, int... I>
inline vf Fold(vf x, vf y, std::integer_sequence<int, I...>) {
  return SHUFFLE(x, y, FoldLane(W, I, false)...) + SHUFFLE(x, y, FoldLane(W, I, true)...);
}
template <int W = kLanes>  // W vectors of kLanes / W items, W lanes each
inline vf ReduceSums(vf* a) {
  if constexpr (W == 1) {
    return a[0];
  } else {
    for (int i = 0; i < W / 2; ++i)
      a[i] = Fold<W>(a[2 * i], a[2 * i + 1], std::make_integer_sequence<int, kLanes>());
    return ReduceSums<W / 2>(a);
  }
}

// exp(x) for x <= 0, relative error < 2e-7; x < -87 (and -inf) gives exactly 0, so results are
// never subnormal (exp(-87) = 1.6e-38 > FLT_MIN; subnormal arithmetic is slow on x86).
inline vf Exp(vf x) {
  const vf lowest = Splat(-87.f);
  const vi underflow = x < lowest;
  x = x < lowest ? lowest : x;
  const vf magic = Splat(12582912.f);  // 1.5 * 2^23: adding and subtracting rounds to integer
  const vf n = (x * 1.44269504f + magic) - magic;
  vf r = x - n * 0.693145752f;  // ln 2 split in two so that n * hi is exact
  r = r - n * 1.42860677e-6f;
  vf p = Splat(1.f / 5040);  // Taylor series to r^7: |r| <= ln(2) / 2 leaves < 1e-8
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return (vf)((vi)(p * (vf)bits) & ~underflow);  // vector casts reinterpret the bits
}

}  // namespace
