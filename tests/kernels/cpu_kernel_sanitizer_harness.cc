// Runs the CPU flash attention kernel's forward (blocked and split-cache decode paths) and
// backward over random shapes, masks and biases, and the selective scan's forward and backward
// over random shapes, groups and resets, on a small std::thread pool that stands in for XLA's. cpu_kernel_sanitizer_test.py builds it twice: with AddressSanitizer and
// UndefinedBehaviorSanitizer (any read or write outside a buffer aborts with a report) and with
// ThreadSanitizer (a data race between tasks, or in ParallelFor's hand-off, aborts). jaxlib
// cannot be loaded under the sanitizers, so the kernel's drivers are called here directly.
//
// Usage: harness ITERATIONS SEED; prints "ok" when every case ran clean.

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "flash_attention.cc"
#include "selective_scan.cc"

// The two members of ffi::ThreadPool that ParallelFor uses, on `threads` worker threads.
class TestPool {
 public:
  explicit TestPool(int threads) {
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~TestPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  int64_t num_threads() const { return static_cast<int64_t>(workers_.size()); }
  template <typename F>
  void Schedule(F&& f) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.emplace_back(std::forward<F>(f));
    }
    cv_.notify_one();
  }

 private:
  void Work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

int main(int argc, char** argv) {
  const int iterations = argc > 1 ? std::atoi(argv[1]) : 500;
  std::mt19937 rng(argc > 2 ? std::atoi(argv[2]) : 0);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  auto fill = [&](std::vector<float>& x) {
    for (float& e : x) e = std::uniform_real_distribution<float>(-1.f, 1.f)(rng);
  };
  for (int it = 0; it < iterations; ++it) {
    Shape sh;
    sh.B = pick(1, 2);
    sh.K = pick(1, 2);
    sh.N = sh.K * pick(1, 3);
    sh.H = 16 * pick(1, 4);
    // Decode rows, lengths around the block sizes, or anything; keys as many, a few, or any.
    const int edges[] = {1, 2, 4, 5, 15, 16, 17, 63, 64, 65, 127, 128, 129};
    auto length = [&](int most) { return pick(0, 1) ? edges[pick(0, 12)] : pick(1, most); };
    sh.T = length(200);
    const int keys = pick(0, 4);
    sh.S = keys == 0 ? sh.T : keys == 1 ? pick(1, 3) : keys == 2 ? pick(500, 3000) : length(300);
    const bool causal = pick(0, 3) != 0;
    const int64_t window = pick(0, 1) ? pick(1, 50) : 0;
    const int64_t landmark = causal && pick(0, 2) == 0 ? pick(2, 70) : 0;
    const int64_t q_offset = pick(0, 1) ? std::max<int64_t>(0, sh.S - sh.T) : 0;
    Mask mask{causal, window, pick(0, 5), landmark, q_offset, nullptr, nullptr, 1, 1,
              sh.T, sh.S};
    std::vector<float> q(sh.B * sh.T * sh.N * sh.H), k(sh.B * sh.S * sh.K * sh.H), v(k.size());
    fill(q);
    fill(k);
    fill(v);
    std::vector<int32_t> q_seg(sh.B * sh.T), kv_seg(sh.B * sh.S);
    for (int32_t& x : q_seg) x = pick(0, 2);
    for (int32_t& x : kv_seg) x = pick(0, 2);
    if (pick(0, 2) == 0) {
      mask.q_seg = q_seg.data();
      mask.kv_seg = kv_seg.data();
      mask.q_seg_rows = mask.kv_seg_rows = sh.B;
    }
    std::vector<int32_t> q_pos(sh.B * sh.T), kv_pos(sh.B * sh.S);
    for (size_t i = 0; i < q_pos.size(); ++i) q_pos[i] = i % sh.T + q_offset;
    for (size_t i = 0; i < kv_pos.size(); ++i) kv_pos[i] = i % sh.S;
    std::vector<float> slopes(sh.N, 0.1f);
    Alibi alibi{nullptr, nullptr, nullptr, 1, 1, sh.T, sh.S};
    if (pick(0, 2) == 0) alibi = Alibi{slopes.data(), q_pos.data(), kv_pos.data(), sh.B, sh.B,
                                       sh.T, sh.S};
    // As kernels_cpu/flash_attention.py: beyond one query block, keys transposed block by block
    // ([B, K, S_blocks, H, kBlockK], zeros past S) and values by head ([B, K, S, H]) by XLA,
    // else [1, 1, 1, 1] placeholders.
    std::vector<int64_t> kt_dims = {1, 1, 1, 1}, vh_dims = {1, 1, 1, 1};
    std::vector<float> kt(1), vh(1);
    if (sh.T > kForwardBlockQ) {
      const int64_t blocks = (sh.S + kBlockK - 1) / kBlockK;
      kt_dims = {sh.B, sh.K, blocks, sh.H, kBlockK};
      kt.assign(sh.B * sh.K * blocks * sh.H * kBlockK, 0.f);
      vh_dims = {sh.B, sh.K, sh.S, sh.H};
      vh.resize(v.size());
      for (int64_t b = 0; b < sh.B; ++b)
        for (int64_t j = 0; j < sh.S; ++j)
          for (int64_t kvh = 0; kvh < sh.K; ++kvh)
            for (int64_t h = 0; h < sh.H; ++h) {
              const int64_t from = ((b * sh.S + j) * sh.K + kvh) * sh.H + h;
              kt[(((b * sh.K + kvh) * blocks + j / kBlockK) * sh.H + h) * kBlockK + j % kBlockK] =
                  k[from];
              vh[((b * sh.K + kvh) * sh.S + j) * sh.H + h] = v[from];
            }
    }
    const int64_t kt_blocks = TransposedKeyBlocks(sh, kt_dims.data(), kt_dims.size());
    std::vector<float> out(q.size()), lse(sh.B * sh.N * sh.T);
    // Zero workers: the calling thread runs every task; more: chunk plans of other sizes.
    TestPool pool(pick(0, 4));
    const float* v_by_head = ValuesByHead(sh, vh_dims.data(), vh_dims.size()) ? vh.data()
                                                                                 : nullptr;
    ForwardAll(pool, sh, mask, alibi, 0.25f, q.data(), k.data(), kt.data(), kt_blocks,
               v.data(), v_by_head, out.data(), lse.data());
    std::vector<float> dout(q.size()), delta(lse.size(), 0.1f), dq(q.size()), dk(k.size()),
        dv(v.size()), dslopes(sh.B * sh.N);
    fill(dout);
    // The backward takes q and dout (and returns dq) by head, [B, N, T, H].
    auto by_head = [&sh](const std::vector<float>& x) {
      std::vector<float> y(x.size());
      for (int64_t b = 0; b < sh.B; ++b)
        for (int64_t t = 0; t < sh.T; ++t)
          for (int64_t n = 0; n < sh.N; ++n)
            std::copy_n(&x[((b * sh.T + t) * sh.N + n) * sh.H], sh.H,
                        &y[((b * sh.N + n) * sh.T + t) * sh.H]);
      return y;
    };
    BackwardAll(pool, sh, mask, alibi, 0.25f, by_head(q).data(), k.data(), v.data(),
                by_head(dout).data(), lse.data(), delta.data(), dq.data(), dk.data(), dv.data(),
                dslopes.data());

    // The selective scan: lengths around its 64-step checkpoints, 1 to 3 groups of 16 to 64
    // channels, state sizes off the lane count, resets anywhere.
    const int64_t groups = pick(1, 3), per_group = 16 * pick(1, 4);
    const int64_t blocks_of[] = {64, 32, 16};
    int64_t block = 16;
    for (int64_t b : blocks_of) {
      if (per_group % b == 0) {
        block = b;
        break;
      }
    }
    const ScanShape ss{pick(1, 2), length(200), groups * per_group, pick(1, 20), groups, block};
    std::vector<float> u(ss.B * ss.T * ss.E), dt(u.size()), a_t(ss.N * ss.E),
        bc(ss.B * ss.T * ss.G * ss.N), cc(bc.size()), keep(ss.B * ss.T), h0(ss.B * ss.E * ss.N);
    for (auto* x : {&u, &bc, &cc, &h0}) fill(*x);
    for (float& x : dt) x = 0.5f + 0.5f * std::uniform_real_distribution<float>(0.f, 1.f)(rng);
    for (float& x : a_t) x = -std::uniform_real_distribution<float>(0.1f, 2.f)(rng);
    for (float& x : keep) x = pick(0, 9) ? 1.f : 0.f;
    const ScanInputs in{u.data(), dt.data(), a_t.data(), bc.data(), cc.data(), keep.data(),
                        h0.data()};
    std::vector<float> y(u.size()), final_state(h0.size());
    ScanForwardAll(pool, ss, in, y.data(), final_state.data());
    std::vector<float> du(u.size()), ddt(u.size()), da(ss.B * ss.N * ss.E),
        db(ss.B * ss.T * ss.Blocks() * ss.N), dc(db.size()), dh0(h0.size());
    ScanBackwardAll(pool, ss, in, y.data(), final_state.data(),
                    ScanGrads{du.data(), ddt.data(), da.data(), db.data(), dc.data(),
                              dh0.data()});
  }
  std::puts("ok");
  return 0;
}
