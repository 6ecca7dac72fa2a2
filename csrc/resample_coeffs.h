// Pillow's 8-bit bicubic resampling arithmetic, shared by the CPU kernel (csrc/cpu/resize_tiles.cpp) and the
// host side of the CUDA kernel (kernels/cuda/resize_tiles.cu), so both compute the very same fixed-point
// weights and apply the same rounding and the same pass-order rules. One definition of each.
//
// Pillow (libImaging/Resample.c, 8 bpc): weights are doubles normalised per output pixel, then rounded to
// fixed point with 22 fractional bits; a pass accumulates uint8 * weight in int starting from 1 << 21 (the
// rounding half), shifts right by 22 and clamps to 0..255. The two passes meet in a uint8 image.
//
// Plain C++17; clip8 is also callable from CUDA device code (PYVL_HOST_DEVICE), the rest is host-only.
#pragma once

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

#ifdef __CUDACC__
#define PYVL_HOST_DEVICE __host__ __device__
#else
#define PYVL_HOST_DEVICE
#endif

namespace pyvl {
namespace resample {

inline constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS for 8-bit images
inline constexpr int kHalf = 1 << (kPrecisionBits - 1);

// Pillow's clip8: the accumulator (which started at kHalf) shifted back to an integer and clamped to 0..255.
PYVL_HOST_DEVICE inline std::uint8_t clip8(int v) {
  const int shifted = v >> kPrecisionBits;
  return static_cast<std::uint8_t>(shifted < 0 ? 0 : (shifted > 255 ? 255 : shifted));
}

inline double bicubic(double x) {  // Pillow's cubic kernel: a = -0.5, support 2
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

// Weights per output pixel (the row length of Axis::weights): the support widens with the downscale factor.
inline int taps(std::int64_t in_size, std::int64_t out_size) {
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  return static_cast<int>(std::ceil(2.0 * std::max(scale, 1.0))) * 2 + 1;
}

// Sides of a source or output image: at most 2^28 pixels, so taps and weight-table sizes (about
// 4 * in + 5 * out entries) stay far from overflowing int / int64 arithmetic. Pillow's pixel limit is lower.
inline constexpr std::int64_t kMaxSide = std::int64_t{1} << 28;

inline void check_sides(std::int64_t h, std::int64_t w, std::int64_t oh, std::int64_t ow, const char* op) {
  check(h > 0 && w > 0 && h <= kMaxSide && w <= kMaxSide, op, ": source size ", w, "x", h,
        " is out of range (1..", kMaxSide, " per side)");
  check(oh > 0 && ow > 0 && oh <= kMaxSide && ow <= kMaxSide, op, ": output size ", ow, "x", oh,
        " is out of range (1..", kMaxSide, " per side)");
}

// Which Pillow's rule orders the two passes; the uint8 rounding between the passes makes the order visible
// in the result, so the caller passes the rule of the Pillow it must equal.
enum PassOrder : int {
  kHorizontalFirst = 0,   // Pillow <= 12.1 (ImagingResampleInner): always the horizontal pass first
  kTallVerticalFirst = 1,  // Pillow 12.2, 12.3 (Image.resize): vertical first when h > 100 w and the height shrinks
  kShrinkVerticalFirst = 2,  // Pillow 13: vertical first when the height shrinks by more than twice the width
};

inline void check_pass_order(int pass_order, const char* op) {
  check(pass_order >= kHorizontalFirst && pass_order <= kShrinkVerticalFirst, op, ": pass_order must be ",
        int{kHorizontalFirst}, ", ", int{kTallVerticalFirst}, " or ", int{kShrinkVerticalFirst}, ", got ",
        pass_order);
}

// True when the resize (h, w) -> (oh, ow) runs the vertical pass first under `pass_order`.
inline bool vertical_first(std::int64_t h, std::int64_t w, std::int64_t oh, std::int64_t ow, int pass_order) {
  switch (pass_order) {
    case kTallVerticalFirst: return h > w * 100 && oh < h;
    case kShrinkVerticalFirst: return h - oh > 0 && h - oh > (w - ow) * 2;
    default: return false;
  }
}

// taps(in_size, out_size), refusing a weight table larger than Pillow's precompute_coeffs allows (out_size x
// taps doubles within INT_MAX bytes): Pillow raises MemoryError there, so no image Pillow resizes is refused.
inline int checked_taps(std::int64_t in_size, std::int64_t out_size) {
  const int k = taps(in_size, out_size);
  if (out_size > INT_MAX / (std::int64_t{k} * static_cast<std::int64_t>(sizeof(double))))
    throw AllocationTooLarge(concat("resizing ", in_size, " pixels to ", out_size, " needs a weight table of ",
                                    out_size, " x ", k, " taps, more than Pillow allows (", INT_MAX, " bytes)"));
  return k;
}

// Fixed-point weights of one axis: output i reads `count[i]` inputs starting at `first[i]`.
struct Axis {
  int ksize = 0;
  std::vector<std::int64_t> first, count;
  std::vector<int> weights;  // out_size x ksize

  // Pillow's precompute_coeffs + normalize_coeffs_8bpc for the box (0, in_size): the support widens with the
  // downscale factor (antialiasing) and the weights are normalised per output pixel before rounding.
  Axis(std::int64_t in_size, std::int64_t out_size) : ksize(checked_taps(in_size, out_size)), first(out_size),
                                                       count(out_size) {
    const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
    const double filterscale = std::max(scale, 1.0);
    const double support = 2.0 * filterscale;
    const double inv_filterscale = 1.0 / filterscale;  // Pillow multiplies by it; dividing rounds differently
    weights.assign(out_size * ksize, 0);
    std::vector<double> w(ksize);
    for (std::int64_t i = 0; i < out_size; ++i) {
      const double center = (i + 0.5) * scale;
      const std::int64_t lo = std::max<std::int64_t>(static_cast<std::int64_t>(center - support + 0.5), 0);
      const std::int64_t hi = std::min(static_cast<std::int64_t>(center + support + 0.5), in_size);
      double total = 0.0;
      for (std::int64_t x = 0; x < hi - lo; ++x) total += (w[x] = bicubic((x + lo - center + 0.5) * inv_filterscale));
      for (std::int64_t x = 0; x < hi - lo; ++x) {
        const double v = total != 0.0 ? w[x] / total : w[x];
        weights[i * ksize + x] = static_cast<int>(v < 0 ? -0.5 + v * (1 << kPrecisionBits)
                                                        : 0.5 + v * (1 << kPrecisionBits));
      }
      first[i] = lo;
      count[i] = hi - lo;
    }
  }
  std::int64_t size() const { return static_cast<std::int64_t>(first.size()); }
  std::int64_t rows_begin() const { return first.front(); }
  std::int64_t rows_end() const { return first.back() + count.back(); }
};

}  // namespace resample
}  // namespace pyvl
