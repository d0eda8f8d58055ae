// Weight gradient of a 1x1 convolution for XLA's CPU backend, as an XLA FFI handler:
//   dw[i, o] = sum_m x[m, i] dy[m, o],   x (M, I) and dy (M, O) row-major (NHWC, M = N*H*W).
//
// XLA CPU's matmul library wants the contracted dimension innermost, so for this product XLA
// first writes x transposed: one extra pass over every 1x1 layer's input in the backward pass
// (`copy_bitcast_fusion`; BENCHMARKS.md, "CPU kernels"). Here each
// work item, a block of rows m, copies its rows of x and dy into panels in cache (the
// transpose happens there), runs a 6 x 16 register tile over them, and adds its product into
// its chunk's partial sum of dw (`ParallelSum`: a fixed order, bit-identical results).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace dpn_jax {
namespace {

constexpr int64_t kTileRows = 6;             // dw rows per register tile (broadcast from x)
constexpr int64_t kTileCols = 2 * kLanes;    // dw columns per register tile (two vectors of dy)
constexpr int64_t kItemRows = 512;           // rows m per work item: the product's depth per pass
constexpr int64_t kPassCols = 64;           // dy columns whose panels stay in L2 per pass

// panels[p][m][k] = a[m0 + m, p * Width + k] for m < rows, zero past a's `cols` columns. Width is
// a constant so that each panel row's copy compiles to a few vector moves.
template <int64_t Width>
void PackPanels(const float* a, int64_t cols, int64_t m0, int64_t rows,
                std::vector<float>& panels) {
  const int64_t full = cols / Width, count = (cols + Width - 1) / Width;
  panels.resize(count * rows * Width);
  for (int64_t m = 0; m < rows; ++m) {
    const float* row = a + (m0 + m) * cols;
    for (int64_t p = 0; p < full; ++p) {
      std::memcpy(&panels[(p * rows + m) * Width], row + p * Width, Width * sizeof(float));
    }
    if (full < count) {  // the last panel, zero past the columns
      float* to = &panels[(full * rows + m) * Width];
      const int64_t left = cols - full * Width;
      std::memcpy(to, row + full * Width, left * sizeof(float));
      std::fill(to + left, to + Width, 0.0f);
    }
  }
}

// dw[0 .. valid_rows, 0 .. valid_cols) += x_panel^T dy_panel over `rows` rows.
void Tile(const float* x_panel, const float* dy_panel, int64_t rows, float* dw, int64_t dw_cols,
          int64_t valid_rows, int64_t valid_cols) {
  Vec acc[kTileRows][2] = {};
  for (int64_t m = 0; m < rows; ++m) {
    const Vec d0 = Load(dy_panel + m * kTileCols), d1 = Load(dy_panel + m * kTileCols + kLanes);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const Vec s = Broadcast(x_panel[m * kTileRows + r]);
      acc[r][0] += s * d0;
      acc[r][1] += s * d1;
    }
  }
  for (int64_t r = 0; r < valid_rows; ++r) {
    float* out = dw + r * dw_cols;
    if (valid_cols == kTileCols) {
      Store(out, Load(out) + acc[r][0]);
      Store(out + kLanes, Load(out + kLanes) + acc[r][1]);
    } else {
      float sums[kTileCols];
      Store(sums, acc[r][0]);
      Store(sums + kLanes, acc[r][1]);
      for (int64_t c = 0; c < valid_cols; ++c) out[c] += sums[c];
    }
  }
}

void PointwiseKernelGrad(ffi::ThreadPool& pool, const float* x, const float* dy, float* dw,
                         int64_t m_total, int64_t in_c, int64_t out_c) {
  const int64_t items = (m_total + kItemRows - 1) / kItemRows;
  const int64_t row_panels = (in_c + kTileRows - 1) / kTileRows;
  const int64_t col_panels = (out_c + kTileCols - 1) / kTileCols;
  // One part: parts over dw's columns would each pack x's rows again, which costs more than the
  // chunks' buffers (benchmarks/HISTORY.md, "CPU kernels: fixed-order sums").
  ParallelSum(pool, items, 1, in_c * out_c, dw, [&](int64_t item, int64_t, float* partial) {
    thread_local std::vector<float> x_panels, dy_panels;
    const int64_t m0 = item * kItemRows, rows = std::min(kItemRows, m_total - m0);
    PackPanels<kTileRows>(x, in_c, m0, rows, x_panels);
    PackPanels<kTileCols>(dy, out_c, m0, rows, dy_panels);
    for (int64_t q0 = 0; q0 < col_panels; q0 += kPassCols / kTileCols) {
      const int64_t q1 = std::min(col_panels, q0 + kPassCols / kTileCols);
      for (int64_t p = 0; p < row_panels; ++p) {
        const int64_t i0 = p * kTileRows;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t o0 = q * kTileCols;
          Tile(&x_panels[p * rows * kTileRows], &dy_panels[q * rows * kTileCols], rows,
               partial + i0 * out_c + o0, out_c, std::min(kTileRows, in_c - i0),
               std::min(kTileCols, out_c - o0));
        }
      }
    }
  });
}

ffi::Error PointwiseKernelGradHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                      ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  const Operand xo{"x", x.dimensions()}, dyo{"dy", dy.dimensions()}, dwo{"dw", dw->dimensions()};
  auto invalid = [](const std::string& what) {
    return ffi::Error::InvalidArgument("dpn_jax 1x1 kernel gradient: " + what);
  };
  for (const Operand* operand : {&xo, &dyo, &dwo}) {
    if (operand->dims.size() != 2) return invalid(operand->Describe() + ", expected 2 dimensions");
  }
  const auto xd = x.dimensions(), dyd = dy.dimensions();
  if (xd[0] != dyd[0]) return invalid(xo.Describe() + " and " + dyo.Describe() + " differ in rows");
  const int64_t expected[2] = {xd[1], dyd[1]};
  if (!std::equal(dwo.dims.begin(), dwo.dims.end(), expected)) {
    return invalid(dwo.Describe() + ", expected " + ShapeString(expected) + " for " +
                   xo.Describe() + " and " + dyo.Describe());
  }
  PointwiseKernelGrad(pool, x.typed_data(), dy.typed_data(), dw->typed_data(), xd[0], xd[1],
                      dyd[1]);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace dpn_jax

DPN_JAX_FFI_HANDLER(DpnPointwiseKernelGrad, dpn_jax::PointwiseKernelGradHandler,
                    xla::ffi::Ffi::Bind()
                        .Ctx<xla::ffi::ThreadPool>()
                        .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                        .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                        .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
