// ParallelFor over XLA's intra-op thread pool (or the sanitizer harness's std::thread pool).
// Part of the fused CPU flash attention; flash_attention.cc says what the kernel computes and
// includes every part into one translation unit (so each call inlines as before the split).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

namespace {

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

}  // namespace
