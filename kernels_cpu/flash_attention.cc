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

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

// Query rows per block: the backward's, and the forward's (kernels_cpu/flash_attention.py:
// BLOCK_Q). The forward streams every visible key and value block once per query block, so
// taller blocks read them fewer times (a 16k causal forward on an Intel Xeon: 64 rows 1.03 s,
// 128 rows 0.99 s, with values by head; torch SDPA 1.02 s).
constexpr int kBlockQ = 64;
constexpr int kForwardBlockQ = 128;
constexpr int kBlockK = 128;  // keys per block (a multiple of 16)
constexpr int kDiagonalRows = 4 * kTileRows;  // query rows per chunk where a mask cuts a block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// Runs body(0..n-1) on the thread pool and the calling thread; returns when all are done.
// Helpers that start late find no work left and only touch the shared counter state. `Pool` is
// ffi::ThreadPool here and a std::thread pool in the sanitizer harness, which runs this under
// ThreadSanitizer and AddressSanitizer.
template <typename Pool, typename Body>
void ParallelFor(Pool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

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
