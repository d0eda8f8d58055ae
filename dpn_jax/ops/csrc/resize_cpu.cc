// Pillow's 8-bit resampling (`Image.resize(size, BILINEAR or BICUBIC)` of an RGB image, no box,
// no reducing_gap), bit for bit, for the training input pipeline's random-resized crops
// (`dpn_jax/ops/resize.py`).
//
// A port of Pillow's src/libImaging/Resample.c (Pillow 12-13): the same double-precision filter
// coefficients (`PrecomputeCoefficients`), the same rounding of them to 22-bit integers, the
// same int32 sums from 1 << 21 clipped to 8 bits, the same two passes (horizontal first, over
// only the rows the vertical pass reads; a pass is skipped where its axis keeps its size).
// Integer sums do not depend on their order, so the AVX2 build may sum several channels and
// taps at once and still give Pillow's bytes; only the coefficients are computed in double, and
// they must not fuse multiply-adds (Pillow's x86-64 wheels cannot): contraction is off below.
//
// The input is a window of an H x W x 3 uint8 image (Pillow would crop first), treated as the
// whole image: the filters' support is clipped at the window's edges, as on the crop.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace dpn_jax {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS
constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);
constexpr int kBilinear = 2, kBicubic = 3;  // PIL.Image.Resampling values
constexpr int kChannels = 3;

double BilinearFilter(double x) {
  if (x < 0.0) x = -x;
  if (x < 1.0) return 1.0 - x;
  return 0.0;
}

double BicubicFilter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Filter {
  double (*weight)(double);
  double support;
};

// One axis's resampling: output i sums input [first[i], first[i] + count[i]) with weights
// weights[i * ksize + j] (Pillow's 22-bit integers; zero from count[i] on).
struct Coefficients {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for box [0, in_size), same operations in
// the same order (in0/in1 are floats there: exact here, sizes are far below 2^24).
Coefficients PrecomputeCoefficients(int in_size, int out_size, const Filter& filter) {
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter.support * filterscale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  const double inv_filterscale = 1.0 / filterscale;
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    std::fill(k.begin(), k.end(), 0.0);
    for (int x = 0; x < xmax; ++x) {
      const double w = filter.weight((x + xmin - center + 0.5) * inv_filterscale);
      k[x] = w;
      ww += w;
    }
    if (ww != 0.0) {
      for (int x = 0; x < xmax; ++x) k[x] /= ww;
    }
    int32_t* out = &c.weights[static_cast<size_t>(xx) * c.ksize];
    for (int x = 0; x < c.ksize; ++x) {
      out[x] = k[x] < 0 ? static_cast<int>(-0.5 + k[x] * (1 << kPrecisionBits))
                        : static_cast<int>(0.5 + k[x] * (1 << kPrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = std::max(xmax, 0);
  }
  return c;
}

// Pillow's clip8: the sum's integer part, clamped to a byte.
inline uint8_t Clip8(int32_t sum) {
  return static_cast<uint8_t>(std::clamp(sum >> kPrecisionBits, 0, 255));
}

// An image region: `rows` rows of `width` RGB pixels, `stride` bytes apart, in a buffer that
// ends at `end` (a vectorised load may read, not use, bytes past a row's last pixel).
struct Rows {
  const uint8_t* data;
  int64_t stride;
  int rows, width;
  const uint8_t* end;
  const uint8_t* Row(int y) const { return data + y * stride; }
};

// Bytes past a row's last pixel that the horizontal pass may read (AVX2: 8 from its first).
constexpr int64_t kHorizontalSlack = 5;

#if defined(__AVX2__)

// Per output pixel, its taps in pairs: [w0 x4, w1 x4] for the pair's two pixels' RGB0 lanes.
std::vector<int32_t> PairedWeights(const Coefficients& c, int out_size, int* pairs) {
  *pairs = (c.ksize + 1) / 2;
  std::vector<int32_t> paired(static_cast<size_t>(out_size) * *pairs * 8, 0);
  for (int xx = 0; xx < out_size; ++xx) {
    for (int x = 0; x < c.count[xx]; ++x) {
      int32_t* lanes = &paired[(static_cast<size_t>(xx) * *pairs + x / 2) * 8 + (x % 2) * 4];
      std::fill(lanes, lanes + 4, c.weights[static_cast<size_t>(xx) * c.ksize + x]);
    }
  }
  return paired;
}

void ResampleHorizontal(const Rows& in, int offset, int out_rows, const Coefficients& c,
                        uint8_t* out, int out_width) {
  int pairs;
  const std::vector<int32_t> paired = PairedWeights(c, out_width, &pairs);
  // Two packed RGB pixels (6 of 8 loaded bytes) -> R G B 0 R G B 0.
  const __m128i to_rgb0 = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  std::vector<uint8_t> padded;
  for (int yy = 0; yy < out_rows; ++yy) {
    const uint8_t* line = in.Row(yy + offset);
    if (line + in.width * kChannels + kHorizontalSlack > in.end) {  // a load would pass the end
      padded.assign(static_cast<size_t>(in.width) * kChannels + kHorizontalSlack, 0);
      std::memcpy(padded.data(), line, static_cast<size_t>(in.width) * kChannels);
      line = padded.data();
    }
    uint8_t* line_out = out + static_cast<int64_t>(yy) * out_width * kChannels;
    for (int xx = 0; xx < out_width; ++xx) {
      const uint8_t* pixels = line + static_cast<int64_t>(c.first[xx]) * kChannels;
      const int32_t* w = &paired[static_cast<size_t>(xx) * pairs * 8];
      __m256i sum = _mm256_setzero_si256();
      for (int p = 0; p < (c.count[xx] + 1) / 2; ++p) {
        const __m128i two = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pixels + 6 * p));
        const __m256i wide = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(two, to_rgb0));
        const __m256i weights = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * p));
        sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(wide, weights));
      }
      __m128i rgb0 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      rgb0 = _mm_srai_epi32(_mm_add_epi32(rgb0, _mm_set1_epi32(kHalf)), kPrecisionBits);
      rgb0 = _mm_packus_epi16(_mm_packs_epi32(rgb0, rgb0), rgb0);
      const uint32_t bytes = static_cast<uint32_t>(_mm_cvtsi128_si32(rgb0));
      std::memcpy(line_out + xx * kChannels, &bytes, kChannels);  // little-endian: R, G, B
    }
  }
}

#else
// Pillow's loops (for 3 bands: RGB packed here, RGBX there).
void ResampleHorizontal(const Rows& in, int offset, int out_rows, const Coefficients& c,
                        uint8_t* out, int out_width) {
  for (int yy = 0; yy < out_rows; ++yy) {
    const uint8_t* line = in.Row(yy + offset);
    uint8_t* line_out = out + static_cast<int64_t>(yy) * out_width * kChannels;
    for (int xx = 0; xx < out_width; ++xx) {
      const int32_t* k = &c.weights[static_cast<size_t>(xx) * c.ksize];
      const uint8_t* pixels = line + static_cast<int64_t>(c.first[xx]) * kChannels;
      int32_t s0 = kHalf, s1 = kHalf, s2 = kHalf;
      for (int x = 0; x < c.count[xx]; ++x) {
        s0 += pixels[x * kChannels + 0] * k[x];
        s1 += pixels[x * kChannels + 1] * k[x];
        s2 += pixels[x * kChannels + 2] * k[x];
      }
      line_out[xx * kChannels + 0] = Clip8(s0);
      line_out[xx * kChannels + 1] = Clip8(s1);
      line_out[xx * kChannels + 2] = Clip8(s2);
    }
  }
}

#endif

// Blocks of bytes with their sums in registers: GCC vectorises the loops over a block.
void ResampleRow(const Rows& in, int first, int count, const int32_t* w, uint8_t* out) {
  constexpr int64_t kBlock = 32;
  const int64_t bytes = static_cast<int64_t>(in.width) * kChannels;
  for (int64_t at = 0; at < bytes; at += kBlock) {
    const int64_t n = std::min(kBlock, bytes - at);
    int32_t sums[kBlock];
    for (int64_t i = 0; i < kBlock; ++i) sums[i] = kHalf;
    for (int y = 0; y < count; ++y) {
      const uint8_t* row = in.Row(first + y) + at;
      if (n == kBlock) {
        for (int64_t i = 0; i < kBlock; ++i) sums[i] += row[i] * w[y];
      } else {
        for (int64_t i = 0; i < n; ++i) sums[i] += row[i] * w[y];
      }
    }
    for (int64_t i = 0; i < n; ++i) out[at + i] = Clip8(sums[i]);
  }
}
void ResampleVertical(const Rows& in, int offset, const Coefficients& c, uint8_t* out,
                      int out_rows) {
  for (int yy = 0; yy < out_rows; ++yy) {
    ResampleRow(in, c.first[yy] - offset, c.count[yy], &c.weights[static_cast<size_t>(yy) * c.ksize],
                out + static_cast<int64_t>(yy) * in.width * kChannels);
  }
}

// Pillow 13 resizes vertically first when the height shrinks by more than twice as many pixels
// as the width (python-pillow/Pillow#9549); found by testing, the order changes the bytes.
bool VerticalFirst(int rows, int width, int out_h, int out_w) {
  return out_h < rows && rows - out_h > 2 * (width - out_w);
}

// Pillow's ImagingResampleInner, the window standing for the whole image.
void Resample(const Rows& window, uint8_t* out, int out_h, int out_w, const Filter& filter) {
  const bool need_horizontal = out_w != window.width;
  const bool need_vertical = out_h != window.rows;
  if (!need_horizontal && !need_vertical) {
    for (int y = 0; y < out_h; ++y) {
      std::memcpy(out + static_cast<int64_t>(y) * out_w * kChannels, window.Row(y),
                  static_cast<size_t>(out_w) * kChannels);
    }
    return;
  }
  if (!need_horizontal) {
    ResampleVertical(window, 0, PrecomputeCoefficients(window.rows, out_h, filter), out, out_h);
    return;
  }
  const Coefficients horizontal = PrecomputeCoefficients(window.width, out_w, filter);
  if (!need_vertical) {
    ResampleHorizontal(window, 0, out_h, horizontal, out, out_w);
    return;
  }
  const Coefficients vertical = PrecomputeCoefficients(window.rows, out_h, filter);
  std::vector<uint8_t> temp;
  if (VerticalFirst(window.rows, window.width, out_h, out_w)) {
    const int64_t stride = static_cast<int64_t>(window.width) * kChannels;
    temp.resize(static_cast<size_t>(out_h * stride + kHorizontalSlack));
    ResampleVertical(window, 0, vertical, temp.data(), out_h);
    const Rows shrunk{temp.data(), stride, out_h, window.width, temp.data() + temp.size()};
    ResampleHorizontal(shrunk, 0, out_h, horizontal, out, out_w);
    return;
  }
  // Horizontally only the rows the vertical pass reads.
  const int ybox_first = vertical.first[0];
  const int rows = vertical.first[out_h - 1] + vertical.count[out_h - 1] - ybox_first;
  const int64_t stride = static_cast<int64_t>(out_w) * kChannels;
  temp.resize(static_cast<size_t>(rows * stride));
  ResampleHorizontal(window, ybox_first, rows, horizontal, temp.data(), out_w);
  const Rows narrowed{temp.data(), stride, rows, out_w, temp.data() + temp.size()};
  ResampleVertical(narrowed, ybox_first, vertical, out, out_h);
}

}  // namespace
}  // namespace dpn_jax

// Resizes the window (top, left, crop_h, crop_w) of `image`, height x width x 3 uint8 and
// C-contiguous, to out (out_h x out_w x 3) as Pillow's `image.crop(window).resize((out_w, out_h),
// filter)` does; filter is PIL's BILINEAR (2) or BICUBIC (3). Returns 0, or 1 for arguments out
// of range, 2 when out of memory.
extern "C" __attribute__((visibility("default"))) int DpnResizeRgb8(
    const uint8_t* image, int64_t height, int64_t width, int64_t top, int64_t left,
    int64_t crop_h, int64_t crop_w, uint8_t* out, int64_t out_h, int64_t out_w, int filter) {
  using namespace dpn_jax;
  constexpr int64_t kMaxSide = 1 << 24;  // Pillow's float box is exact below this
  if (filter != kBilinear && filter != kBicubic) return 1;
  if (top < 0 || left < 0 || crop_h < 1 || crop_w < 1 || top + crop_h > height ||
      left + crop_w > width || width > kMaxSide || height > kMaxSide || out_h < 1 ||
      out_w < 1 || out_h > kMaxSide || out_w > kMaxSide) {
    return 1;
  }
  const Filter chosen = filter == kBicubic ? Filter{BicubicFilter, 2.0} : Filter{BilinearFilter, 1.0};
  const int64_t stride = width * kChannels;
  const Rows window{image + top * stride + left * kChannels, stride, static_cast<int>(crop_h),
                    static_cast<int>(crop_w), image + height * stride};
  try {
    Resample(window, out, static_cast<int>(out_h), static_cast<int>(out_w), chosen);
  } catch (const std::bad_alloc&) {
    return 2;
  }
  return 0;
}
