// Pillow's 8-bit resampling (`Image.resize(size, BILINEAR or BICUBIC)` of an RGB image, no box,
// no reducing_gap), bit for bit, for the training input pipeline's random-resized crops
// (`dpn_jax/ops/resize.py`).
//
// A port of Pillow's src/libImaging/Resample.c (Pillow 10-13): the same double-precision filter
// coefficients (`PrecomputeCoefficients`), the same rounding of them to 22-bit integers, the
// same int32 sums from 1 << 21 clipped to 8 bits, the same two passes (horizontal first, over
// only the rows the vertical pass reads, or from Pillow 13 on, in some cases vertical first;
// a pass is skipped where its axis keeps its size). Each pass rounds to 8 bits, so the order
// changes the bytes.
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
// The horizontal pass two output pixels at a time (one per 128-bit lane), two taps a step: the
// 16-bit products of `_mm256_madd_epi16`, each 22-bit weight split as high * 2^11 + low
// (exact: the int32 sums are the same integers).
struct HorizontalPlan {
  int pairs = 0;                 // tap pairs per output pixel
  std::vector<int32_t> offsets;  // [pixel][pair]: the pair's first byte in the input row
  std::vector<int16_t> high, low;  // [pixel / 2][pair][lane A: w0 w1 w0 w1 w0 w1 0 0, lane B]
};

HorizontalPlan PlanHorizontal(const Coefficients& c, int in_width, int out_width) {
  HorizontalPlan plan;
  plan.pairs = (*std::max_element(c.count.begin(), c.count.end()) + 1) / 2;
  const size_t pixels = out_width + out_width % 2;  // a last odd pixel's partner: weights 0
  plan.offsets.assign(pixels * plan.pairs, 0);
  plan.high.assign(pixels * plan.pairs * 8, 0);
  plan.low.assign(pixels * plan.pairs * 8, 0);
  for (int xx = 0; xx < out_width; ++xx) {
    for (int p = 0; p < plan.pairs; ++p) {
      // Past its taps a pixel reads (with weight 0) inside the row, never past its end.
      plan.offsets[xx * plan.pairs + p] = kChannels * std::min(c.first[xx] + 2 * p, in_width - 1);
      const size_t lanes = ((xx / 2) * plan.pairs + p) * 16 + (xx % 2) * 8;
      for (int t = 0; t < 2 && 2 * p + t < c.count[xx]; ++t) {
        const int32_t w = c.weights[static_cast<size_t>(xx) * c.ksize + 2 * p + t];
        for (int channel = 0; channel < kChannels; ++channel) {
          plan.high[lanes + 2 * channel + t] = static_cast<int16_t>(w >> 11);
          plan.low[lanes + 2 * channel + t] = static_cast<int16_t>(w & 2047);
        }
      }
    }
  }
  return plan;
}

void ResampleHorizontal(const Rows& in, int offset, int out_rows, const Coefficients& c,
                        uint8_t* out, int out_width) {
  const HorizontalPlan plan = PlanHorizontal(c, in.width, out_width);
  const int pairs = plan.pairs;
  // Two packed RGB pixels (6 of 8 loaded bytes) -> 16-bit R0 R1 G0 G1 B0 B1 0 0, in each lane.
  const __m256i interleave = _mm256_broadcastsi128_si256(
      _mm_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1));
  std::vector<uint8_t> padded;
  for (int yy = 0; yy < out_rows; ++yy) {
    const uint8_t* line = in.Row(yy + offset);
    if (line + in.width * kChannels + kHorizontalSlack > in.end) {  // a load would pass the end
      padded.assign(static_cast<size_t>(in.width) * kChannels + kHorizontalSlack, 0);
      std::memcpy(padded.data(), line, static_cast<size_t>(in.width) * kChannels);
      line = padded.data();
    }
    uint8_t* line_out = out + static_cast<int64_t>(yy) * out_width * kChannels;
    for (int xx = 0; xx < out_width; xx += 2) {
      const int32_t* at_a = &plan.offsets[static_cast<size_t>(xx) * pairs];
      const int32_t* at_b = at_a + pairs;
      const int16_t* high = &plan.high[static_cast<size_t>(xx / 2) * pairs * 16];
      const int16_t* low = &plan.low[static_cast<size_t>(xx / 2) * pairs * 16];
      __m256i sum_high = _mm256_setzero_si256(), sum_low = _mm256_setzero_si256();
      for (int p = 0; p < pairs; ++p) {
        const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(line + at_a[p]));
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(line + at_b[p]));
        const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
        const __m256i taps = _mm256_shuffle_epi8(both, interleave);
        const __m256i* w_high = reinterpret_cast<const __m256i*>(high + 16 * p);
        const __m256i* w_low = reinterpret_cast<const __m256i*>(low + 16 * p);
        sum_high = _mm256_add_epi32(sum_high, _mm256_madd_epi16(taps, _mm256_loadu_si256(w_high)));
        sum_low = _mm256_add_epi32(sum_low, _mm256_madd_epi16(taps, _mm256_loadu_si256(w_low)));
      }
      __m256i sum = _mm256_add_epi32(_mm256_slli_epi32(sum_high, 11), sum_low);
      sum = _mm256_srai_epi32(_mm256_add_epi32(sum, _mm256_set1_epi32(kHalf)), kPrecisionBits);
      const __m256i words = _mm256_packs_epi32(sum, sum);
      const __m256i bytes = _mm256_packus_epi16(words, words);  // per lane: R G B 0 ...
      const uint32_t pixel_a = static_cast<uint32_t>(_mm256_cvtsi256_si32(bytes));
      std::memcpy(line_out + xx * kChannels, &pixel_a, kChannels);  // little-endian: R, G, B
      if (xx + 1 < out_width) {
        const uint32_t pixel_b =
            static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1)));
        std::memcpy(line_out + (xx + 1) * kChannels, &pixel_b, kChannels);
      }
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
// as the width (python-pillow/Pillow#9549; the rule as tests against Pillow 13.0 find it).
bool VerticalFirst(int rows, int width, int out_h, int out_w) {
  return out_h < rows && rows - out_h > 2 * (width - out_w);
}

// Pillow's ImagingResampleInner, the window standing for the whole image.
void Resample(const Rows& window, uint8_t* out, int out_h, int out_w, const Filter& filter,
              bool pillow_13) {
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
  if (pillow_13 && VerticalFirst(window.rows, window.width, out_h, out_w)) {
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
// filter)` does; filter is PIL's BILINEAR (2) or BICUBIC (3), pillow_13 whether to take that
// version's order of the passes (else the earlier versions'). Returns 0, or 1 for arguments out
// of range, 2 when out of memory.
extern "C" __attribute__((visibility("default"))) int DpnResizeRgb8(
    const uint8_t* image, int64_t height, int64_t width, int64_t top, int64_t left,
    int64_t crop_h, int64_t crop_w, uint8_t* out, int64_t out_h, int64_t out_w, int filter,
    int pillow_13) {
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
    Resample(window, out, static_cast<int>(out_h), static_cast<int>(out_w), chosen, pillow_13 != 0);
  } catch (const std::bad_alloc&) {
    return 2;
  }
  return 0;
}
