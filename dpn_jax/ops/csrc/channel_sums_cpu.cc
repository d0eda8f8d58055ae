// BatchNorm's per-channel sums for XLA's CPU backend, as an XLA FFI handler:
//   sums[0, c] = sum_m a[m, c],   sums[1, c] = sum_m a[m, c] b[m, c],   a, b (M, C) row-major.
//
// A training step's BatchNorm needs two such pairs per layer: sum x and sum x^2 forward
// (a = b = x), sum dy and sum dy x backward. XLA reduces each sum in its own pass over
// memory; this reads a and b once for both. Work items are blocks of rows; their partial sums
// are added in a fixed order (`ParallelSum`), so the result does not depend on the threads.

#include <string>

#include "cpu_kernels.h"

namespace dpn_jax {
namespace {

constexpr int64_t kItemRows = 256;   // rows per work item
constexpr int64_t kBlockRows = 64;   // rows whose sums stay in registers
constexpr int kAccumulators = 4;     // rows m, m + 1, ... summed apart: more accurate, no stall

// sums[0 .. C) += a's rows summed, sums[C .. 2C) += (a b)'s, over rows [m0, m0 + rows) and the
// channels [c0, c0 + kLanes). Each of kAccumulators partial sums takes every kAccumulators-th
// row; they are added at the end, so a sum's rounding grows with rows / kAccumulators.
void SumColumns(const float* a, const float* b, int64_t channels, int64_t m0, int64_t rows,
                int64_t c0, float* sums) {
  static_assert(kAccumulators == 4, "the final additions below name four sums");
  Vec sum_a[kAccumulators] = {}, sum_ab[kAccumulators] = {};
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t at = (m0 + m) * channels + c0;
    const Vec va = Load(a + at), vb = Load(b + at);
    sum_a[m % kAccumulators] += va;
    sum_ab[m % kAccumulators] += va * vb;
  }
  Store(sums + c0, Load(sums + c0) + ((sum_a[0] + sum_a[1]) + (sum_a[2] + sum_a[3])));
  Store(sums + channels + c0,
        Load(sums + channels + c0) + ((sum_ab[0] + sum_ab[1]) + (sum_ab[2] + sum_ab[3])));
}

// The same for one channel: those past the last whole vector.
void SumColumn(const float* a, const float* b, int64_t channels, int64_t m0, int64_t rows,
               int64_t c, float* sums) {
  float sum_a = 0.0f, sum_ab = 0.0f;
  for (int64_t m = m0; m < m0 + rows; ++m) {
    sum_a += a[m * channels + c];
    sum_ab += a[m * channels + c] * b[m * channels + c];
  }
  sums[c] += sum_a;
  sums[channels + c] += sum_ab;
}

void ChannelSums(ffi::ThreadPool& pool, const float* a, const float* b, float* sums,
                 int64_t rows, int64_t channels) {
  const int64_t items = (rows + kItemRows - 1) / kItemRows;
  const int64_t whole = channels / kLanes * kLanes;
  ParallelSum(pool, items, 1, 2 * channels, sums, [&](int64_t item, int64_t, float* partial) {
    const int64_t m0 = item * kItemRows, count = std::min(kItemRows, rows - m0);
    // Blocks of rows, channel by channel within a block: the block's rows stay in cache.
    for (int64_t r = 0; r < count; r += kBlockRows) {
      const int64_t block = std::min(kBlockRows, count - r);
      for (int64_t c0 = 0; c0 < whole; c0 += kLanes) {
        SumColumns(a, b, channels, m0 + r, block, c0, partial);
      }
      for (int64_t c = whole; c < channels; ++c) {
        SumColumn(a, b, channels, m0 + r, block, c, partial);
      }
    }
  });
}

ffi::Error ChannelSumsHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                              ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> sums) {
  const Operand ao{"a", a.dimensions()}, bo{"b", b.dimensions()}, so{"sums", sums->dimensions()};
  auto invalid = [](const std::string& what) {
    return ffi::Error::InvalidArgument("dpn_jax channel sums: " + what);
  };
  if (ao.dims.size() != 2) return invalid(ao.Describe() + ", expected 2 dimensions");
  if (!std::equal(ao.dims.begin(), ao.dims.end(), bo.dims.begin(), bo.dims.end())) {
    return invalid(bo.Describe() + ", expected the shape of " + ao.Describe());
  }
  const int64_t expected[2] = {2, ao.dims[1]};
  if (!std::equal(so.dims.begin(), so.dims.end(), std::begin(expected), std::end(expected))) {
    return invalid(so.Describe() + ", expected " + ShapeString(expected));
  }
  ChannelSums(pool, a.typed_data(), b.typed_data(), sums->typed_data(), ao.dims[0], ao.dims[1]);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace dpn_jax

DPN_JAX_FFI_HANDLER(DpnChannelSums, dpn_jax::ChannelSumsHandler,
                    xla::ffi::Ffi::Bind()
                        .Ctx<xla::ffi::ThreadPool>()
                        .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                        .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                        .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
