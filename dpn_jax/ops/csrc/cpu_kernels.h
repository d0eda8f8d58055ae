// What dpn_jax's CPU kernels share: 8-lane float vectors (GCC >= 12 or Clang vector extensions,
// no intrinsics) and work sharing on XLA's intra-op thread pool.
#ifndef DPN_JAX_CSRC_CPU_KERNELS_H_
#define DPN_JAX_CSRC_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace dpn_jax {

namespace ffi = xla::ffi;

constexpr int64_t kLanes = 8;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
// Not `Vec{} + s`: without fast-math that is a real addition (-0.0 + 0.0 is +0.0) before the
// broadcast, an extra dependent instruction in every inner loop.
inline Vec Broadcast(float s) {
  static_assert(kLanes == 8);
  return Vec{s, s, s, s, s, s, s, s};
}

// Calls f(std::integral_constant<int, n>) for a runtime n in 1..N (nothing for other n).
template <int N, typename F>
void Dispatch(int64_t n, const F& f) {
  if constexpr (N > 0) {
    if (n == N) return f(std::integral_constant<int, N>{});
    Dispatch<N - 1>(n, f);
  }
}

// Runs body(item, slot) for item in [0, items) on the calling thread and the pool's threads;
// `slot` numbers the participating threads 0..threads-1 (for per-thread accumulators). The
// caller takes items too, so the call finishes even if no pool task ever starts. Returns the
// number of slots.
template <typename Body>
int64_t ParallelFor(ffi::ThreadPool& pool, int64_t items, const Body& body) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> slots{1};
  };
  const int64_t threads = std::max<int64_t>(1, std::min(pool.num_threads(), items));
  auto progress = std::make_shared<Progress>();
  auto work = [progress, items, &body](int64_t slot) {
    for (int64_t item; (item = progress->next.fetch_add(1)) < items;) {
      body(item, slot);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    // A task that starts after the caller has returned finds no item left and touches nothing.
    pool.Schedule([progress, work] { work(progress->slots.fetch_add(1)); });
  }
  work(0);
  while (progress->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  return threads;
}

// out[0 .. size) = the sum over items of what body(item, partial) adds into `partial`, a
// zeroed buffer of `size` floats owned by the running thread (weight gradients: sums over the
// batch, accumulated per thread and added up once at the end).
template <typename Body>
void ParallelSum(ffi::ThreadPool& pool, int64_t items, int64_t size, float* out,
                 const Body& body) {
  std::vector<std::vector<float>> partial(std::max<int64_t>(1, pool.num_threads()));
  const int64_t slots = ParallelFor(pool, items, [&](int64_t item, int64_t slot) {
    if (partial[slot].empty()) partial[slot].assign(size, 0.0f);
    body(item, partial[slot].data());
  });
  std::fill(out, out + size, 0.0f);
  for (int64_t t = 0; t < slots; ++t) {
    if (partial[t].empty()) continue;
    for (int64_t j = 0; j < size; ++j) out[j] += partial[t][j];
  }
}

}  // namespace dpn_jax

#endif  // DPN_JAX_CSRC_CPU_KERNELS_H_
