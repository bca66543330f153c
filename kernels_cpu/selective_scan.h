// Mamba's selective scan on the CPU, forward and backward: the drivers behind the FFI handlers
// of selective_scan.cc (and the sanitizer harness, which runs them on a std::thread pool).
//
// Recurrence, per batch row b, channel e and state n, with m_t = keep[b, t] (0 where a document
// starts) and a_t = m_t exp(dt_t A[e, n]):
//   h_t = a_t h_{t-1} + dt_t u_t B_t[n],        y_t = sum_n h_t[n] C_t[n]
// Channels are independent, so the lanes of a vector are kLanes consecutive channels: the
// forward pass needs no horizontal sums, and its cost is one Exp and three multiply-adds per
// (step, channel, state), where XLA's while loop spends about 6 ns per element.
//
// Layouts, all float32, row-major:
//   u, dt, y, du, ddt  [B, T, E]       a_t  [N, E]  (A transposed: lanes read channels)
//   b, c               [B, T, G, N]    channel e reads group e / (E / G)
//   keep               [B, T]          h0, final, dfinal, dh0  [B, E, N]
//   da                 [B, N, E]       per batch row; the caller sums over B
//   db, dc             [B, T, E / block, N]  per block of channels; the caller sums each group's
// Tasks are (batch row, block of `block` channels, block a multiple of kLanes dividing E / G);
// each task writes only its own rows of the outputs, so tasks never race.
//
// Backward: the state's gradient obeys the reversed recurrence g_t = dy_t C_t + a_{t+1} g_{t+1}.
// A forward pass keeps the state before every kCheckpoint-th step; then, chunk by chunk from the
// end, the chunk's decays and states are recomputed into task-local buffers (L2-sized) and the
// gradient runs backward through them:
//   dC_t[n] += dy_t h_t[n]        dB_t[n] += g_t[n] dt_t u_t       z = g_t a_t h_{t-1}
//   du_t = dt_t sum_n g_t B_t     ddt_t = sum_n z A + u_t sum_n g_t B_t      dA += z dt_t
#pragma once

#include <cstdint>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace {

constexpr int64_t kScanCheckpoint = 64;  // steps between the backward pass's kept states

struct ScanShape {
  int64_t B, T, E, N, G, block;
  int64_t Blocks() const { return E / block; }
  int64_t Vectors() const { return block / kLanes; }
  int64_t StateFloats() const { return Vectors() * N * kLanes; }  // one task's state
};

// One task's view: batch row b, channels e0 .. e0 + block - 1 (group g). A task's state is
// [Vectors, N, kLanes]: element (v, n, l) is channel e0 + v * kLanes + l, state n.
struct ScanTask {
  const ScanShape& sh;
  int64_t b, e0, g;
  ScanTask(const ScanShape& shape, int64_t index)
      : sh(shape),
        b(index / shape.Blocks()),
        e0(index % shape.Blocks() * shape.block),
        g(e0 / (shape.E / shape.G)) {}
  int64_t Channel(int64_t t, int64_t v) const { return (b * sh.T + t) * sh.E + e0 + v * kLanes; }
  int64_t Group(int64_t t) const { return ((b * sh.T + t) * sh.G + g) * sh.N; }
  int64_t BlockSum(int64_t t) const { return ((b * sh.T + t) * sh.Blocks() + e0 / sh.block) * sh.N; }
  float Keep(const float* keep, int64_t t) const { return keep[b * sh.T + t]; }

  // [B, E, N] <-> the task's [Vectors, N, kLanes] (once per sequence: scalar loops suffice).
  void LoadState(const float* src, float* state) const {
    for (int64_t v = 0; v < sh.Vectors(); ++v)
      for (int64_t n = 0; n < sh.N; ++n)
        for (int l = 0; l < kLanes; ++l)
          state[(v * sh.N + n) * kLanes + l] = src[(b * sh.E + e0 + v * kLanes + l) * sh.N + n];
  }
  void StoreState(const float* state, float* dst) const {
    for (int64_t v = 0; v < sh.Vectors(); ++v)
      for (int64_t n = 0; n < sh.N; ++n)
        for (int l = 0; l < kLanes; ++l)
          dst[(b * sh.E + e0 + v * kLanes + l) * sh.N + n] = state[(v * sh.N + n) * kLanes + l];
  }
};

struct ScanInputs {
  const float *u, *dt, *a_t, *b, *c, *keep, *h0;
};

// Advances the task's state over step t; writes the step's decays and previous states (each
// [Vectors, N, kLanes]) where given, and y_t where given.
inline void ScanStep(const ScanTask& task, const ScanInputs& in, int64_t t, float* state,
                     float* decays, float* previous, float* y) {
  const ScanShape& sh = task.sh;
  const float m = task.Keep(in.keep, t);
  const float* bt = in.b + task.Group(t);
  const float* ct = in.c + task.Group(t);
  for (int64_t v = 0; v < sh.Vectors(); ++v) {
    const int64_t at = task.Channel(t, v);
    const vf d = Load(in.dt + at), x = d * Load(in.u + at);
    const float* a = in.a_t + task.e0 + v * kLanes;
    vf acc{};
    for (int64_t n = 0; n < sh.N; ++n) {
      const int64_t s = (v * sh.N + n) * kLanes;
      const vf decay = Exp(d * Load(a + n * sh.E)) * m;
      const vf h = Load(state + s);
      if (decays != nullptr) {
        Store(decays + s, decay);
        Store(previous + s, h);
      }
      const vf h_new = decay * h + x * bt[n];
      Store(state + s, h_new);
      acc += h_new * ct[n];
    }
    if (y != nullptr) Store(y + at, acc);
  }
}

template <typename Pool>
void ScanForwardAll(Pool& pool, const ScanShape& sh, const ScanInputs& in, float* y,
                    float* final_state) {
  ParallelFor(pool, sh.B * sh.Blocks(), [&](int64_t index) {
    const ScanTask task(sh, index);
    std::vector<float> state(sh.StateFloats());
    task.LoadState(in.h0, state.data());
    for (int64_t t = 0; t < sh.T; ++t) ScanStep(task, in, t, state.data(), nullptr, nullptr, y);
    task.StoreState(state.data(), final_state);
  });
}

// Sums of `sums` ([N, kLanes]) over their lanes, into out[0 .. N).
inline void StoreLaneSums(float* sums, int64_t n_states, float* out) {
  int64_t n = 0;
  for (; n + kLanes <= n_states; n += kLanes) {  // kLanes sums at once (ReduceSums)
    vf group[kLanes];
    for (int i = 0; i < kLanes; ++i) group[i] = Load(sums + (n + i) * kLanes);
    Store(out + n, ReduceSums(group));
  }
  for (; n < n_states; ++n) out[n] = ReduceSum(Load(sums + n * kLanes));
}

struct ScanGrads {
  float *du, *ddt, *da, *db, *dc, *dh0;
};

template <typename Pool>
void ScanBackwardAll(Pool& pool, const ScanShape& sh, const ScanInputs& in, const float* dy,
                     const float* dfinal, const ScanGrads& out) {
  ParallelFor(pool, sh.B * sh.Blocks(), [&](int64_t index) {
    const ScanTask task(sh, index);
    const int64_t S = sh.StateFloats(), N = sh.N;
    const int64_t chunks = (sh.T + kScanCheckpoint - 1) / kScanCheckpoint;
    std::vector<float> starts(chunks * S), state(S), decays(kScanCheckpoint * S),
        previous(kScanCheckpoint * S), grad(S), da(S, 0.f), db(N * kLanes), dc(N * kLanes);
    task.LoadState(in.h0, state.data());
    for (int64_t t = 0; t < sh.T; ++t) {
      if (t % kScanCheckpoint == 0)
        std::copy(state.begin(), state.end(), starts.begin() + t / kScanCheckpoint * S);
      ScanStep(task, in, t, state.data(), nullptr, nullptr, nullptr);
    }
    task.LoadState(dfinal, grad.data());  // grad holds a_{t+1} g_{t+1}: here d loss / d h_T
    for (int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
      const int64_t t0 = chunk * kScanCheckpoint;
      const int64_t t1 = std::min(sh.T, t0 + kScanCheckpoint);
      std::copy(starts.begin() + chunk * S, starts.begin() + (chunk + 1) * S, state.begin());
      for (int64_t t = t0; t < t1; ++t)
        ScanStep(task, in, t, state.data(), decays.data() + (t - t0) * S,
                 previous.data() + (t - t0) * S, nullptr);
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const float* dec = decays.data() + (t - t0) * S;
        const float* prev = previous.data() + (t - t0) * S;
        const float* bt = in.b + task.Group(t);
        const float* ct = in.c + task.Group(t);
        std::fill(db.begin(), db.end(), 0.f);
        std::fill(dc.begin(), dc.end(), 0.f);
        for (int64_t v = 0; v < sh.Vectors(); ++v) {
          const int64_t at = task.Channel(t, v);
          const vf d = Load(in.dt + at), u = Load(in.u + at), x = d * u, dyv = Load(dy + at);
          const float* a = in.a_t + task.e0 + v * kLanes;
          vf grad_b{}, z_a{};
          for (int64_t n = 0; n < N; ++n) {
            const int64_t s = (v * N + n) * kLanes;
            const vf decay = Load(dec + s), h_prev = Load(prev + s);
            const vf h = decay * h_prev + x * bt[n];
            const vf g = dyv * ct[n] + Load(grad.data() + s);
            const vf z = g * decay * h_prev;  // d loss / d log a_t
            z_a += z * Load(a + n * sh.E);
            grad_b += g * bt[n];
            Store(da.data() + s, Load(da.data() + s) + z * d);
            Store(dc.data() + n * kLanes, Load(dc.data() + n * kLanes) + dyv * h);
            Store(db.data() + n * kLanes, Load(db.data() + n * kLanes) + g * x);
            Store(grad.data() + s, decay * g);
          }
          Store(out.du + at, d * grad_b);
          Store(out.ddt + at, z_a + u * grad_b);
        }
        StoreLaneSums(db.data(), N, out.db + task.BlockSum(t));
        StoreLaneSums(dc.data(), N, out.dc + task.BlockSum(t));
      }
    }
    task.StoreState(grad.data(), out.dh0);
    for (int64_t v = 0; v < sh.Vectors(); ++v)
      for (int64_t n = 0; n < N; ++n)
        Store(out.da + (task.b * N + n) * sh.E + task.e0 + v * kLanes,
              Load(da.data() + (v * N + n) * kLanes));
  });
}

}  // namespace
