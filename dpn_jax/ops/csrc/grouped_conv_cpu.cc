// Grouped 3x3 convolution for XLA's CPU backend, NHWC x HWIO, float32, as XLA FFI handlers.
//
// XLA CPU runs `feature_group_count` convolutions far slower than oneDNN, and splitting them
// into dense convolutions costs a transpose and a copy per group and direction (BENCHMARKS.md,
// "CPU kernels"). Here each work item (an image's block of rows) takes the
// channel blocks in turn: it copies the input window a block reads into a small zero-padded
// buffer, then accumulates 8-lane vectors of output channels in registers over taps and input
// channels:
//   - groups of 8, 16, 24 or 32 channels ("broadcast"): each input channel is broadcast and
//     multiplied with the 8-lane rows of the kernel;
//   - groups of 1, 2 or 4 channels, as many in as out ("shuffle"): 8 / group-width groups fill
//     the 8 lanes, and the input channel each lane needs is shuffled into place.
// `ChooseLayout` is the rule, and `CheckConv` the strides and paddings taken (mirrored by
// `_kernel_layout_exists` and `_kernel_geometry_exists` in conv.py, which merges narrower groups
// into block-diagonal ones of a width listed here). GCC >= 12 or Clang: vector extensions, no
// intrinsics.
//
// The three products of a layer:
//   forward:     y[n, oy, ox, g*O + o]  = sum_{ky,kx,i} x[n, oy*s+ky-p, ox*s+kx-p, g*I + i] w[ky, kx, i, g*O + o]
//   input grad:  dx[n, iy, ix, g*I + i] = sum over (ky, kx, o) with iy = oy*s+ky-p, ix = ox*s+kx-p
//                of dy[n, oy, ox, g*O + o] w[ky, kx, i, g*O + o]: per stride phase of (iy, ix), a
//                stride-1 product over dy with the kernel transposed per group (`InputGrad`).
//   kernel grad: dw[ky, kx, i, g*O + o] = sum_{n,oy,ox} x[n, oy*s+ky-p, ox*s+kx-p, g*I + i] dy[n, oy, ox, g*O + o]
// Work items run on XLA's intra-op thread pool; the kernel gradient adds them up in a fixed
// order (`ParallelSum`), so its result does not depend on which thread ran which.

#include <string>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

namespace dpn_jax {
namespace {

constexpr int64_t kKernel = 3;

// Lane l of the result is lane (l / V) * V + R of x: in each V-lane group, channel R of that
// group, spread over the group's lanes. Constant indices: one in-lane permute instruction.
template <int V, int R, size_t... L>
inline Vec Spread(Vec x, std::index_sequence<L...>) {
  return __builtin_shufflevector(x, x, static_cast<int>(L / V * V + R)...);
}

// acc[R * acc_step] += Spread<V, R>(x) * w[R * w_step] for R in 0..V-1.
template <int V, int... R>
inline void SpreadMultiplyAdd(Vec x, const Vec* w, int w_step, Vec* acc, int acc_step,
                              std::integer_sequence<int, R...>) {
  ((acc[R * acc_step] += Spread<V, R>(x, std::make_index_sequence<kLanes>{}) * w[R * w_step]), ...);
}

enum class Layout { kBroadcast, kShuffle };

// in/out channels per group -> how the kernels vectorise them (false: not supported).
bool ChooseLayout(int64_t in_per_group, int64_t out_per_group, int64_t channels, Layout* layout) {
  if (out_per_group % kLanes == 0 && out_per_group <= 4 * kLanes) {
    *layout = Layout::kBroadcast;
    return true;
  }
  if (in_per_group == out_per_group && kLanes % out_per_group == 0 && channels % kLanes == 0) {
    *layout = Layout::kShuffle;
    return true;
  }
  return false;
}

// Floor of a / b for b > 0 and either sign of a.
int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// An NHWC image as the kernels read it.
struct Image {
  const float* data;
  int64_t height, width, channels;
};

// Copies channels [c0, c0 + count) of image rows row0 .. row0 + rows - 1 and columns
// col0 .. col0 + cols - 1 into buf[rows][cols][count], zeros where that is outside the image.
void PackWindow(const Image& image, int64_t c0, int64_t count, int64_t row0, int64_t rows,
                int64_t col0, int64_t cols, std::vector<float>& buf) {
  buf.assign(rows * cols * count, 0.0f);
  const int64_t c_lo = std::max<int64_t>(0, -col0), c_hi = std::min(cols, image.width - col0);
  for (int64_t j = std::max<int64_t>(0, -row0); j < rows && row0 + j < image.height; ++j) {
    for (int64_t c = c_lo; c < c_hi; ++c) {
      const float* from = image.data + ((row0 + j) * image.width + col0 + c) * image.channels + c0;
      float* to = &buf[(j * cols + c) * count];
      for (int64_t k = 0; k < count; ++k) to[k] = from[k];  // a few vectors: no memcpy call
    }
  }
}

// One tile of the "gather" product shared by the forward pass and the input gradient:
// out[y, x, lanes] = sum over taps t and r of window[y*step, x*step + offset_t][r] kernel_t[r][lanes].
struct GatherArgs {
  const float* window;  // [rows][cols][window_channels], from PackWindow
  int64_t cols, window_channels, step;
  int taps;
  int64_t tap_offset[kKernel * kKernel];       // window offset of each tap, in floats
  const float* tap_kernel[kKernel * kKernel];  // each tap's [R][kernel_out], at the tile's lanes
  int64_t R, kernel_out;
  float* out;  // the tile's first pixel, at its first lane
  int64_t out_row_stride, out_col_stride;  // in floats
  int64_t y_count, x_count;
};

// Window positions and output addresses of the tile's P output pixels, numbered row by row
// from `first` (past the last pixel: the last pixel again, computed and not stored).
template <int P>
struct TilePixels {
  const float* window[P];
  float* out[P];
  TilePixels(const GatherArgs& a, int64_t first) {
    const int64_t last = a.y_count * a.x_count - 1;
    for (int p = 0; p < P; ++p) {
      const int64_t k = std::min(first + p, last), y = k / a.x_count, x = k % a.x_count;
      window[p] = a.window + (y * a.cols + x) * a.step * a.window_channels;
      out[p] = a.out + y * a.out_row_stride + x * a.out_col_stride;
    }
  }
};

// Broadcast layout: one group (R inputs), NV vectors of its outputs, P pixels at a time (12
// accumulators where the registers allow). The pixels run on across output rows, so that a
// row's width need not be a multiple of P.
template <int NV>
void GatherBroadcast(const GatherArgs& a) {
  constexpr int P = NV == 1 ? 12 : NV == 2 ? 6 : 3;
  const int64_t pixels = a.y_count * a.x_count;
  for (int64_t k0 = 0; k0 < pixels; k0 += P) {
    const TilePixels<P> tile(a, k0);
    Vec acc[P][NV] = {};
    for (int t = 0; t < a.taps; ++t) {
      const int64_t offset = a.tap_offset[t];
      const float* w = a.tap_kernel[t];
      for (int64_t r = 0; r < a.R; ++r) {
        Vec wv[NV];
        for (int j = 0; j < NV; ++j) wv[j] = Load(w + r * a.kernel_out + j * kLanes);
        for (int p = 0; p < P; ++p) {
          const Vec s = Broadcast(tile.window[p][offset + r]);
          for (int j = 0; j < NV; ++j) acc[p][j] += s * wv[j];
        }
      }
    }
    for (int p = 0; p < P && k0 + p < pixels; ++p) {
      for (int j = 0; j < NV; ++j) Store(tile.out[p] + j * kLanes, acc[p][j]);
    }
  }
}

// Shuffle layout: 8 / V groups of V channels in 8 lanes.
template <int V>
void GatherShuffle(const GatherArgs& a) {
  constexpr int P = 6;
  const int64_t pixels = a.y_count * a.x_count;
  for (int64_t k0 = 0; k0 < pixels; k0 += P) {
    const TilePixels<P> tile(a, k0);
    Vec acc[P] = {};
    for (int t = 0; t < a.taps; ++t) {
      const int64_t offset = a.tap_offset[t];
      Vec wv[V];
      for (int r = 0; r < V; ++r) wv[r] = Load(a.tap_kernel[t] + r * a.kernel_out);
      for (int p = 0; p < P; ++p) {
        const Vec xv = Load(tile.window[p] + offset);
        SpreadMultiplyAdd<V>(xv, wv, 1, &acc[p], 0, std::make_integer_sequence<int, V>{});
      }
    }
    for (int p = 0; p < P && k0 + p < pixels; ++p) Store(tile.out[p], acc[p]);
  }
}

void RunGather(const GatherArgs& a, Layout layout, int64_t out_per_group) {
  if (layout == Layout::kShuffle) {
    Dispatch<4>(out_per_group, [&](auto v) { if constexpr (kLanes % v == 0) GatherShuffle<v>(a); });
  } else {
    Dispatch<4>(out_per_group / kLanes, [&](auto nv) { GatherBroadcast<nv>(a); });
  }
}

// How a convolution's channels are cut into blocks of work: one group (broadcast) or the
// 8 / V groups of one 8-lane vector (shuffle).
struct Blocks {
  int64_t groups_per_block, count, in_channels, out_channels;  // per block
  Blocks(Layout layout, int64_t groups, int64_t in_per_group, int64_t out_per_group)
      : groups_per_block(layout == Layout::kShuffle ? kLanes / out_per_group : 1),
        count(groups / groups_per_block),
        in_channels(groups_per_block * in_per_group),
        out_channels(groups_per_block * out_per_group) {}
};

// Work items: blocks of `rows` rows of one image's `height`. An item computes every channel of
// its rows, so the rows it writes (`row_bytes` each) should stay in the core's cache until all
// channel blocks are done.
struct RowBlocks {
  static constexpr int64_t kItemBytes = 128 << 10;
  int64_t height, rows, per_image;
  RowBlocks(int64_t height, int64_t row_bytes)
      : height(height),
        rows(std::max<int64_t>(1, std::min(height, kItemBytes / row_bytes))),
        per_image((height + rows - 1) / rows) {}
  int64_t items(int64_t batch) const { return batch * per_image; }
  int64_t image(int64_t item) const { return item / per_image; }
  int64_t first(int64_t item) const { return item % per_image * rows; }
  int64_t count(int64_t item) const { return std::min(rows, height - first(item)); }
};

// The n-th image of an NHWC batch.
Image ImageAt(const Image& batch, int64_t n) {
  Image image = batch;
  image.data += n * batch.height * batch.width * batch.channels;
  return image;
}

void Forward(ffi::ThreadPool& pool, const Image& x, const float* w, float* y, int64_t batch,
             int64_t out_h, int64_t out_w, int64_t out_c, int64_t groups, int64_t stride,
             int64_t pad, Layout layout) {
  const int64_t I = x.channels / groups, O = out_c / groups;
  const Blocks blocks(layout, groups, I, O);
  const RowBlocks items(out_h, out_w * out_c * sizeof(float));
  const int64_t cols = (out_w - 1) * stride + kKernel;
  ParallelFor(pool, items.items(batch), [&](int64_t item) {
    thread_local std::vector<float> window;
    const int64_t n = items.image(item), y0 = items.first(item), y_count = items.count(item);
    const Image xn = ImageAt(x, n);
    for (int64_t block = 0; block < blocks.count; ++block) {
      PackWindow(xn, block * blocks.in_channels, blocks.in_channels, y0 * stride - pad,
                 (y_count - 1) * stride + kKernel, -pad, cols, window);
      GatherArgs a{window.data(), cols, blocks.in_channels, stride};
      a.taps = kKernel * kKernel;
      for (int t = 0; t < a.taps; ++t) {
        a.tap_offset[t] = (t / kKernel * cols + t % kKernel) * blocks.in_channels;
        a.tap_kernel[t] = w + t * I * out_c + block * blocks.out_channels;
      }
      a.R = I;
      a.kernel_out = out_c;
      a.out = y + ((n * out_h + y0) * out_w) * out_c + block * blocks.out_channels;
      a.out_row_stride = out_w * out_c;
      a.out_col_stride = out_c;
      a.y_count = y_count;
      a.x_count = out_w;
      RunGather(a, layout, O);
    }
  });
}

// The input gradient, one stride phase (py, px) at a time: dx pixels (py + s*m, px + s*k) take
// dy[m + e_y, k + e_x] through tap (ky, kx) wherever e = (phase + pad - tap) / s is whole, so
// each phase is a stride-1 gather product over dy with a subset of the taps.
void InputGrad(ffi::ThreadPool& pool, const Image& dy, const float* w_t, float* dx,
               int64_t batch, int64_t in_h, int64_t in_w, int64_t in_c, int64_t groups,
               int64_t stride, int64_t pad, Layout layout) {
  const int64_t O = dy.channels / groups, I = in_c / groups;
  const Blocks blocks(layout, groups, O, I);  // the gather reads O and writes I per group
  int64_t e_min = 0, e_max = 0;
  for (int64_t phase = 0; phase < stride; ++phase) {
    for (int64_t k = 0; k < kKernel; ++k) {
      if ((phase + pad - k) % stride != 0) continue;
      e_min = std::min(e_min, FloorDiv(phase + pad - k, stride));
      e_max = std::max(e_max, FloorDiv(phase + pad - k, stride));
    }
  }
  const int64_t m_total = (in_h + stride - 1) / stride, k_total = (in_w + stride - 1) / stride;
  // An item: rows m of every phase, i.e. `stride` rows of dx per m.
  const RowBlocks items(m_total, stride * in_w * in_c * sizeof(float));
  const int64_t cols = k_total + e_max - e_min;
  ParallelFor(pool, items.items(batch), [&](int64_t item) {
    thread_local std::vector<float> window;
    const int64_t n = items.image(item), m0 = items.first(item), m_count = items.count(item);
    const Image dyn = ImageAt(dy, n);
    for (int64_t block = 0; block < blocks.count; ++block) {
      PackWindow(dyn, block * blocks.in_channels, blocks.in_channels, m0 + e_min,
                 m_count + e_max - e_min, e_min, cols, window);
      for (int64_t py = 0; py < stride; ++py) {
        for (int64_t px = 0; px < stride; ++px) {
          GatherArgs a{window.data(), cols, blocks.in_channels, 1};
          a.taps = 0;
          for (int64_t ky = 0; ky < kKernel; ++ky) {
            for (int64_t kx = 0; kx < kKernel; ++kx) {
              if ((py + pad - ky) % stride != 0 || (px + pad - kx) % stride != 0) continue;
              const int64_t ey = FloorDiv(py + pad - ky, stride) - e_min;
              const int64_t ex = FloorDiv(px + pad - kx, stride) - e_min;
              a.tap_offset[a.taps] = (ey * cols + ex) * blocks.in_channels;
              a.tap_kernel[a.taps++] =
                  w_t + (ky * kKernel + kx) * O * in_c + block * blocks.out_channels;
            }
          }
          a.R = O;
          a.kernel_out = in_c;
          a.out = dx + ((n * in_h + py + stride * m0) * in_w + px) * in_c +
                  block * blocks.out_channels;
          a.out_row_stride = stride * in_w * in_c;
          a.out_col_stride = stride * in_c;
          a.y_count = std::min(m_count, (in_h - py + stride - 1) / stride - m0);
          a.x_count = (in_w - px + stride - 1) / stride;
          if (a.y_count > 0 && a.x_count > 0) RunGather(a, layout, I);
        }
      }
    }
  });
}

// Kernel gradient of one work item, added into `dw` (its chunk's partial sum).
struct KernelGradArgs {
  const float* window;  // x, packed: [rows][cols][block_in]
  int64_t cols;
  const float* dy;  // packed: [y_count][out_width][block_out]
  int64_t y_count, out_width, stride;
  float* dw;  // HWIO (3, 3, R, dw_out), offset to the block's first output channel
  int64_t R, dw_out;
};

// dw rows i0 .. i0 + IC - 1 of tap (ky, kx), NV vectors wide: IC x NV sums over the item's pixels.
template <int NV, int IC>
void KernelGradTile(const KernelGradArgs& a, int64_t ky, int64_t kx, int64_t i0, float* dw_tap) {
  const int64_t block_out = NV * kLanes;
  Vec acc[IC][NV] = {};
  for (int64_t y = 0; y < a.y_count; ++y) {
    const float* x_row = a.window + ((y * a.stride + ky) * a.cols + kx) * a.R + i0;
    const float* d_row = a.dy + y * a.out_width * block_out;
    for (int64_t x = 0; x < a.out_width; ++x) {
      const float* xs = x_row + x * a.stride * a.R;
      Vec d[NV];
      for (int j = 0; j < NV; ++j) d[j] = Load(d_row + x * block_out + j * kLanes);
      for (int i = 0; i < IC; ++i) {
        const Vec s = Broadcast(xs[i]);
        for (int j = 0; j < NV; ++j) acc[i][j] += s * d[j];
      }
    }
  }
  for (int i = 0; i < IC; ++i) {
    for (int j = 0; j < NV; ++j) {
      float* o = dw_tap + (i0 + i) * a.dw_out + j * kLanes;
      Store(o, Load(o) + acc[i][j]);
    }
  }
}

template <int NV>
void KernelGradBroadcast(const KernelGradArgs& a) {
  constexpr int IC = NV == 1 ? 8 : NV == 2 ? 4 : NV == 3 ? 4 : 3;  // 8 or 12 accumulators
  for (int64_t ky = 0; ky < kKernel; ++ky) {
    for (int64_t kx = 0; kx < kKernel; ++kx) {
      float* dw_tap = a.dw + (ky * kKernel + kx) * a.R * a.dw_out;
      for (int64_t i0 = 0; i0 < a.R; i0 += IC) {
        // The tile's height a constant: no test of the channel count in the inner loop.
        Dispatch<IC>(std::min<int64_t>(IC, a.R - i0),
                     [&](auto ic) { KernelGradTile<NV, ic>(a, ky, kx, i0, dw_tap); });
      }
    }
  }
}

template <int V>
void KernelGradShuffle(const KernelGradArgs& a) {
  for (int64_t ky = 0; ky < kKernel; ++ky) {
    // The three taps of a kernel row at once: 3 * V independent sums.
    Vec acc[kKernel][V] = {};
    for (int64_t y = 0; y < a.y_count; ++y) {
      const float* x_row = a.window + (y * a.stride + ky) * a.cols * kLanes;
      const float* d_row = a.dy + y * a.out_width * kLanes;
      for (int64_t x = 0; x < a.out_width; ++x) {
        const Vec d = Load(d_row + x * kLanes);
        for (int kx = 0; kx < kKernel; ++kx) {
          const Vec xv = Load(x_row + (x * a.stride + kx) * kLanes);
          SpreadMultiplyAdd<V>(xv, &d, 0, acc[kx], 1, std::make_integer_sequence<int, V>{});
        }
      }
    }
    for (int kx = 0; kx < kKernel; ++kx) {
      for (int r = 0; r < V; ++r) {
        float* o = a.dw + ((ky * kKernel + kx) * V + r) * a.dw_out;
        Store(o, Load(o) + acc[kx][r]);
      }
    }
  }
}

void KernelGrad(ffi::ThreadPool& pool, const Image& x, const Image& dy, float* dw,
                int64_t batch, int64_t groups, int64_t stride, int64_t pad, Layout layout) {
  const int64_t R = x.channels / groups, V = dy.channels / groups;
  const int64_t size = kKernel * kKernel * R * dy.channels;
  const Blocks blocks(layout, groups, R, V);
  // The sum's parts: runs of channel blocks at least kPartChannels wide in x and dy, so that
  // parts read whole cache lines of either, none shared.
  constexpr int64_t kPartChannels = 32;
  const int64_t narrower = std::min(blocks.in_channels, blocks.out_channels);
  const int64_t blocks_per_part =
      std::min(blocks.count, (kPartChannels + narrower - 1) / narrower);
  const int64_t parts = (blocks.count + blocks_per_part - 1) / blocks_per_part;
  const RowBlocks items(dy.height, dy.width * dy.channels * sizeof(float));
  const int64_t cols = (dy.width - 1) * stride + kKernel;
  ParallelSum(pool, items.items(batch), parts, size, dw,
              [&](int64_t item, int64_t part, float* sum) {
    thread_local std::vector<float> window, dy_block;
    const int64_t n = items.image(item), y0 = items.first(item), y_count = items.count(item);
    const Image xn = ImageAt(x, n), dyn = ImageAt(dy, n);
    const int64_t first = part * blocks_per_part;
    for (int64_t block = first; block < std::min(blocks.count, first + blocks_per_part);
         ++block) {
      PackWindow(xn, block * blocks.in_channels, blocks.in_channels, y0 * stride - pad,
                 (y_count - 1) * stride + kKernel, -pad, cols, window);
      PackWindow(dyn, block * blocks.out_channels, blocks.out_channels, y0, y_count, 0, dy.width,
                 dy_block);
      KernelGradArgs a{window.data(), cols, dy_block.data(), y_count, dy.width, stride,
                       sum + block * blocks.out_channels, R, dy.channels};
      if (layout == Layout::kShuffle) {
        Dispatch<4>(V, [&](auto v) { if constexpr (kLanes % v == 0) KernelGradShuffle<v>(a); });
      } else {
        Dispatch<4>(V / kLanes, [&](auto nv) { KernelGradBroadcast<nv>(a); });
      }
    }
  });
}

Image AsImage(const float* data, ffi::Span<const int64_t> dims) {
  return Image{data, dims[1], dims[2], dims[3]};
}

// Checks everything the products rely on before they run, so that a mis-shaped call is an
// error that names the problem and never a read or write outside a buffer. Each product is a
// convolution from an (N, H, W, C_in) `image` to an (N, OH, OW, C_out) `out` with the
// (3, 3, C_in / G, C_out) kernel, or for the input gradient that kernel transposed per group,
// (3, 3, C_out / G, C_in); `layout` is set for the channels the product reads and writes.
ffi::Error CheckConv(const char* product, const Operand& image, const Operand& out,
                     const Operand& kernel, bool kernel_transposed, int64_t groups,
                     int64_t stride, int64_t pad, Layout* layout) {
  const std::string where = std::string("dpn_jax grouped conv ") + product + ": ";
  auto invalid = [&](const std::string& what) {
    return ffi::Error::InvalidArgument(where + what);
  };
  for (const Operand* operand : {&image, &out, &kernel}) {
    if (operand->dims.size() != 4) {
      return invalid(operand->Describe() + ", expected 4 dimensions");
    }
  }
  for (const Operand* operand : {&image, &out}) {
    const auto d = operand->dims;
    if (d[1] < 1 || d[2] < 1 || d[3] < 1) {
      return invalid(operand->Describe() + ", expected a non-empty image (N, H, W, C)");
    }
  }
  if (groups < 1) return invalid("groups = " + std::to_string(groups) + ", expected >= 1");
  if (stride < 1 || stride > kKernel) {
    return invalid("stride = " + std::to_string(stride) + ", expected 1 to " +
                   std::to_string(kKernel));
  }
  if (pad < 0 || pad > kKernel - 1) {
    return invalid("pad = " + std::to_string(pad) + ", expected 0 to " +
                   std::to_string(kKernel - 1));
  }
  for (const Operand* operand : {&image, &out}) {
    if (operand->dims[3] % groups != 0) {
      return invalid(operand->Describe() + ": its " + std::to_string(operand->dims[3]) +
                     " channels do not split into " + std::to_string(groups) + " groups");
    }
  }
  if (image.dims[0] != out.dims[0]) {
    return invalid(image.Describe() + " and " + out.Describe() + " differ in batch size");
  }
  for (int axis = 1; axis <= 2; ++axis) {
    const int64_t padded = image.dims[axis] + 2 * pad;
    if (padded < kKernel) {
      return invalid(image.Describe() + " padded by " + std::to_string(pad) +
                     " is smaller than the 3x3 kernel");
    }
    if (out.dims[axis] != (padded - kKernel) / stride + 1) {
      return invalid(out.Describe() + " does not match " + image.Describe() + " with stride " +
                     std::to_string(stride) + " and pad " + std::to_string(pad) +
                     ": expected " + std::to_string((padded - kKernel) / stride + 1) +
                     (axis == 1 ? " rows" : " columns"));
    }
  }
  const int64_t in_per_group = image.dims[3] / groups, out_per_group = out.dims[3] / groups;
  const int64_t expected[4] = {kKernel, kKernel,
                               kernel_transposed ? out_per_group : in_per_group,
                               kernel_transposed ? image.dims[3] : out.dims[3]};
  if (!std::equal(kernel.dims.begin(), kernel.dims.end(), expected)) {
    return invalid(kernel.Describe() + ", expected " + ShapeString(expected) + " for " +
                   image.Describe() + ", " + out.Describe() + " and " + std::to_string(groups) +
                   " groups");
  }
  // The input gradient gathers from `out` (dy) into `image` (dx): it reads C_out / G channels
  // per group and writes C_in / G.
  const int64_t read = kernel_transposed ? out_per_group : in_per_group;
  const int64_t written = kernel_transposed ? in_per_group : out_per_group;
  if (!ChooseLayout(read, written, kernel_transposed ? image.dims[3] : out.dims[3], layout)) {
    return invalid("no kernel for groups of " + std::to_string(in_per_group) + " input and " +
                   std::to_string(out_per_group) + " output channels (" +
                   std::to_string(groups) + " groups)");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y, int64_t groups,
                          int64_t stride, int64_t pad) {
  Layout layout;
  if (auto e = CheckConv("forward", {"x", x.dimensions()}, {"y", y->dimensions()},
                         {"kernel", w.dimensions()}, false, groups, stride, pad, &layout);
      e.failure()) {
    return e;
  }
  const auto yd = y->dimensions();
  Forward(pool, AsImage(x.typed_data(), x.dimensions()), w.typed_data(), y->typed_data(), yd[0],
          yd[1], yd[2], yd[3], groups, stride, pad, layout);
  return ffi::Error::Success();
}

// `w_t` is the kernel transposed per group, (3, 3, O, G*I): w_t[ky, kx, o, g*I + i] = w[ky, kx, i, g*O + o].
ffi::Error InputGradHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                            ffi::Buffer<ffi::F32> w_t, ffi::ResultBuffer<ffi::F32> dx,
                            int64_t groups, int64_t stride, int64_t pad) {
  Layout layout;
  if (auto e = CheckConv("input gradient", {"dx", dx->dimensions()}, {"dy", dy.dimensions()},
                         {"transposed kernel", w_t.dimensions()}, true, groups, stride, pad,
                         &layout);
      e.failure()) {
    return e;
  }
  const auto xd = dx->dimensions();
  InputGrad(pool, AsImage(dy.typed_data(), dy.dimensions()), w_t.typed_data(), dx->typed_data(),
            xd[0], xd[1], xd[2], xd[3], groups, stride, pad, layout);
  return ffi::Error::Success();
}

ffi::Error KernelGradHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                             int64_t groups, int64_t stride, int64_t pad) {
  Layout layout;
  if (auto e = CheckConv("kernel gradient", {"x", x.dimensions()}, {"dy", dy.dimensions()},
                         {"dw", dw->dimensions()}, false, groups, stride, pad, &layout);
      e.failure()) {
    return e;
  }
  KernelGrad(pool, AsImage(x.typed_data(), x.dimensions()),
             AsImage(dy.typed_data(), dy.dimensions()), dw->typed_data(), x.dimensions()[0],
             groups, stride, pad, layout);
  return ffi::Error::Success();
}

// Every handler: two float32 operands, one float32 result, the convolution's attributes.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("groups")
      .Attr<int64_t>("stride")
      .Attr<int64_t>("pad");
}

}  // namespace
}  // namespace dpn_jax

DPN_JAX_FFI_HANDLER(DpnGroupedConvForward, dpn_jax::ForwardHandler, dpn_jax::ConvBinding());
DPN_JAX_FFI_HANDLER(DpnGroupedConvInputGrad, dpn_jax::InputGradHandler, dpn_jax::ConvBinding());
DPN_JAX_FFI_HANDLER(DpnGroupedConvKernelGrad, dpn_jax::KernelGradHandler,
                    dpn_jax::ConvBinding());
