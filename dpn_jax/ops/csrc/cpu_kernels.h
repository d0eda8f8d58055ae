// What dpn_jax's CPU kernels share: 8-lane float vectors (GCC >= 12 or Clang vector extensions,
// no intrinsics), work sharing on XLA's intra-op thread pool, and the handlers' shape checks.
//
// setup.py compiles the kernels twice, for the architecture's baseline and for AVX2 + FMA, into
// two libraries; every symbol but the handlers (and `DpnCpuSupportsAvx2Fma`) is hidden, so
// neither library's code can be bound to the other's when both are loaded.
#ifndef DPN_JAX_CSRC_CPU_KERNELS_H_
#define DPN_JAX_CSRC_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

// Defines an exported XLA FFI handler symbol `name` (the build hides all other symbols).
#define DPN_JAX_FFI_HANDLER(name, impl, binding)                                            \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name(XLA_FFI_CallFrame*); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, binding)

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

// Runs body(item) for item in [0, items) on the calling thread and the pool's threads. The
// caller takes items too, so the call finishes even if no pool task ever starts.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, const Body& body) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  const int64_t threads = std::max<int64_t>(1, std::min(pool.num_threads(), items));
  auto progress = std::make_shared<Progress>();
  auto work = [progress, items, &body] {
    for (int64_t item; (item = progress->next.fetch_add(1)) < items;) {
      body(item);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    // A task that starts after the caller has returned finds no item left and touches nothing.
    pool.Schedule([progress, work] { work(); });
  }
  work();
  while (progress->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// How many units of work `ParallelSum` makes at least, where the items allow: as many threads
// can share its work.
constexpr int64_t kSumUnits = 16;

// out[0 .. size) = the sum over items of what body(item, part, sum) adds into `sum`, a zeroed
// buffer of `size` floats, for each of `parts` parts: disjoint sets of out's elements, as the
// body defines them (weight gradients: sums over the batch, parts = ranges of channels).
//
// The floating-point sums run in one order fixed by `items` and `parts` alone, whichever threads
// run which work and however many there are, so the same call gives bit-identical results: the
// items are cut into `chunks` contiguous chunks, a unit of work sums one part over one chunk's
// items in item order into the chunk's own buffer, and the chunks' buffers are added in chunk
// order. Parts cost nothing; chunks cost a buffer of `size` floats each, so there are only as
// many as it takes to make kSumUnits units: one where there are that many parts.
template <typename Body>
void ParallelSum(ffi::ThreadPool& pool, int64_t items, int64_t parts, int64_t size, float* out,
                 const Body& body) {
  const int64_t chunks = std::min(items, (kSumUnits + parts - 1) / parts);
  // Chunk 0 sums straight into `out`, chunk c > 0 into partials[(c - 1) * size, c * size).
  const std::unique_ptr<float[]> partials(new float[std::max<int64_t>(0, chunks - 1) * size]);
  auto chunk_sum = [&](int64_t c) { return c == 0 ? out : partials.get() + (c - 1) * size; };
  constexpr int64_t kSlice = 4096;
  const int64_t slices = (size + kSlice - 1) / kSlice;
  auto for_each_slice = [&](auto&& f) {
    ParallelFor(pool, slices, [&](int64_t slice) {
      f(slice * kSlice, std::min(size, (slice + 1) * kSlice));
    });
  };
  for_each_slice([&](int64_t begin, int64_t end) {
    for (int64_t c = 0; c < std::max<int64_t>(1, chunks); ++c) {
      std::fill(chunk_sum(c) + begin, chunk_sum(c) + end, 0.0f);
    }
  });
  ParallelFor(pool, chunks * parts, [&](int64_t unit) {
    const int64_t c = unit / parts, part = unit % parts;
    for (int64_t item = c * items / chunks; item < (c + 1) * items / chunks; ++item) {
      body(item, part, chunk_sum(c));
    }
  });
  // out += chunk 1, chunk 2, ... in that order.
  for_each_slice([&](int64_t begin, int64_t end) {
    for (int64_t c = 1; c < chunks; ++c) {
      const float* from = chunk_sum(c);
      for (int64_t j = begin; j < end; ++j) out[j] += from[j];
    }
  });
}

// "(2, 7, 7, 64)": dimensions as error messages print them.
template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string text = "(";
  for (const int64_t d : dims) text += (text.size() > 1 ? ", " : "") + std::to_string(d);
  return text + ")";
}

// A handler's buffer as its error messages name it: "x of shape (2, 7, 7, 64)".
struct Operand {
  const char* name;
  ffi::Span<const int64_t> dims;
  std::string Describe() const { return std::string(name) + " of shape " + ShapeString(dims); }
};

}  // namespace dpn_jax

#endif  // DPN_JAX_CSRC_CPU_KERNELS_H_
