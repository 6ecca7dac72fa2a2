// Pillow-exact bicubic resize, fused with tiling and normalisation (the CPU side of pyvl's preprocessing).
// The source's pixels are 3 bytes apart (packed RGB) or 4 (RGBX: how Pillow stores an RGB image, read in place;
// the 4th byte is never part of a result).
//
// The original pipeline: PIL resize(RGB, (T*cols, T*rows), BICUBIC) -> crop row-major TxT tiles ->
// PIL resize(original, (T, T)) thumbnail -> ToTensor -> Normalize. Pillow's 8-bit resampler is separable: one
// pass into a uint8 image, then the other, each with fixed-point weights of 22 fractional bits, rounding
// (+ 1 << 21), an arithmetic shift and a clamp to 0..255. We redo exactly that arithmetic, so every uint8
// pixel is bit-identical, but vectorised: Pillow computes one pixel at a time, we compute 16 rows x 3 channels
// per weight (horizontal pass) or a run of a row per weight (vertical pass), with explicit AVX2 for both where
// the CPU has it. The horizontal passes of the grid and the thumbnail share one sweep over the source, and the
// last pass writes normalised floats straight into the [N, 3, T, T] tile tensor, one run of a tile row at a time.
//
// Memory: besides the uint8 image between the passes and the weight tables (what Pillow allocates too),
// scratch is bounded by a constant and the kernel taps, never by the source width: the horizontal pass
// interleaves only the window of source columns a chunk of output columns reads, the vertical pass
// accumulates a fixed-size run of a row at a time.
#include <climits>
#include <cmath>
#include <cstring>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PYVL_HAVE_AVX2_KERNEL 1
#endif

#include "common.h"
#include "resample_coeffs.h"

// Hot loops are compiled twice (AVX2 and baseline x86-64) and picked at load time, where GCC supports it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PYVL_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define PYVL_MULTIVERSION
#endif

namespace pyvl {
namespace {

using resample::Axis;
using resample::clip8;
using resample::kHalf;
using resample::kPrecisionBits;

constexpr int kRowBlock = 16;             // rows resized in x together
constexpr int kLanes = kRowBlock * 3;     // values sharing one horizontal weight
constexpr std::int64_t kWindow = 32768;   // source columns interleaved at once (1.5 MB), unless taps need more
constexpr std::int64_t kVerticalRun = 4096;  // values of a row accumulated at once by the vertical pass
constexpr int kSplitBits = 11;            // weight = hi * 2^11 + lo, lo in [0, 2^11): both halves fit int16

// Fresh buffers of megabytes (the output tensor, the uint8 image between the passes) come straight from mmap,
// and the first-touch faults of their 4 KB pages cost as much as the resize itself on some machines (a 70 MB
// output: ~40 ms in a VM). Asking for transparent huge pages on the 2 MB-aligned interior, which is written in
// full before it is read, cuts the faults 512-fold. Advisory only: a no-op where THP is off or the memory is not
// anonymous, and it never changes what is stored.
void advise_huge_pages(void* p, std::int64_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  const std::uintptr_t a = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t e = (reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(n)) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p, (void)n;
#endif
}

// Uninitialised uint8 storage: every byte is written before it is read, and zero-filling a buffer of
// gigabytes would cost time and touch every page.
using Bytes = std::unique_ptr<std::uint8_t[]>;
Bytes new_bytes(std::int64_t n) {
  Bytes b(new std::uint8_t[static_cast<std::size_t>(n)]);
  advise_huge_pages(b.get(), n);
  return b;
}

// The horizontal weights regrouped for tap pairs: output i reads `pairs[i]` pairs of source columns from the
// even column `start[i]` (first[i] rounded down; a leading zero weight when first[i] is odd). Each pair j is
// four int16 (hi(2j), hi(2j+1), lo(2j), lo(2j+1)): what _mm256_madd_epi16 multiplies with a pair of pixels.
// The split is exact: (sum(p * hi) << 11) + sum(p * lo) = sum(p * w) in int arithmetic, as Pillow sums.
struct PairedWeights {
  std::vector<std::int64_t> start;
  std::vector<int> pairs;
  std::int64_t stride = 0;  // pairs per output in `w`
  std::vector<std::int16_t> w;

  explicit PairedWeights(const Axis& ax) : start(ax.size()), pairs(ax.size()), stride((ax.ksize + 2) / 2) {
    w.assign(static_cast<std::size_t>(ax.size() * stride * 4), 0);
    for (std::int64_t i = 0; i < ax.size(); ++i) {
      const int lead = static_cast<int>(ax.first[i] & 1);
      start[i] = ax.first[i] - lead;
      pairs[i] = static_cast<int>((ax.count[i] + lead + 1) / 2);
      for (std::int64_t t = 0; t < ax.count[i]; ++t) {
        const int k = ax.weights[i * ax.ksize + t];
        const std::int64_t at = t + lead;  // tap position from start[i]
        std::int16_t* pair = &w[(i * stride + at / 2) * 4];
        pair[at % 2] = static_cast<std::int16_t>(k >> kSplitBits);              // arithmetic shift: floor
        pair[2 + at % 2] = static_cast<std::int16_t>(k & ((1 << kSplitBits) - 1));
      }
    }
  }
  std::int64_t size() const { return static_cast<std::int64_t>(start.size()); }
  std::int64_t end(std::int64_t i) const { return start[i] + 2 * pairs[i]; }  // one past the last column read
};

// Up to 16 RGB rows interleaved column by column over a window of columns [x0, x1): data[x - x0][r][c], so
// the rows' pixels at one column are contiguous. A row's pixels are `pixel_bytes` (3 or 4) apart, R, G, B
// first; a 4th byte is never kept. Missing rows (a short last block) repeat the last one: their lanes are
// computed but never stored. Columns past the row end (a tap pair's zero-weighted second column) are zeros.
class Interleaved {
 public:
  Interleaved(const std::uint8_t* first_row, std::int64_t stride, int n_rows, std::int64_t width, int pixel_bytes)
      : width_(width), pixel_bytes_(pixel_bytes) {
    for (int r = 0; r < kRowBlock; ++r) rows_[r] = first_row + std::min(r, n_rows - 1) * stride;
  }
  // Columns [a, b) interleaved (b <= width + 1); returns where column x0 lies.
  const std::uint8_t* window(std::int64_t a, std::int64_t b, std::int64_t& x0) {
    if (a < x0_ || b > x1_) fill(a, std::max(b, std::min(a + kWindow, width_)));
    x0 = x0_;
    return data_.data();
  }

 private:
  void fill(std::int64_t a, std::int64_t b) {
    x0_ = a, x1_ = b;
    data_.resize(static_cast<std::size_t>((b - a) * kLanes));
    const std::int64_t real = std::min(b, width_) - a;  // columns inside the rows
    for (std::int64_t x = 0; x + 1 < real; ++x) {  // 4-byte moves (the 4th byte is overwritten by the next)
      std::uint8_t* dst = &data_[x * kLanes];
      for (int r = 0; r < kRowBlock; ++r) {
        std::uint32_t v;
        std::memcpy(&v, rows_[r] + pixel_bytes_ * (a + x), 4);
        std::memcpy(dst + 3 * r, &v, 4);
      }
    }
    for (int r = 0; r < kRowBlock; ++r)  // the last column: exactly 3 bytes, never reading past the row
      std::memcpy(&data_[(real - 1) * kLanes + 3 * r], rows_[r] + pixel_bytes_ * (a + real - 1), 3);
    std::fill(data_.begin() + real * kLanes, data_.end(), std::uint8_t{0});
  }

  const std::uint8_t* rows_[kRowBlock];
  std::int64_t width_, x0_ = 0, x1_ = 0;
  int pixel_bytes_;
  std::vector<std::uint8_t> data_;
};

// Output columns [i0, i1) of an interleaved window whose first column is x0: acc[i - i0][lane].
PYVL_MULTIVERSION
void horizontal_columns_scalar(const std::uint8_t* block, std::int64_t x0, const PairedWeights& pw, std::int64_t i0,
                               std::int64_t i1, std::uint8_t* px) {
  for (std::int64_t i = i0; i < i1; ++i) {
    int acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = kHalf;
    const std::uint8_t* p = block + (pw.start[i] - x0) * kLanes;
    const std::int16_t* k = &pw.w[i * pw.stride * 4];
    for (int j = 0; j < pw.pairs[i]; ++j, p += 2 * kLanes, k += 4) {
      const int ka = k[0] * (1 << kSplitBits) + k[2], kb = k[1] * (1 << kSplitBits) + k[3];
      for (int l = 0; l < kLanes; ++l) acc[l] += p[l] * ka + p[kLanes + l] * kb;
    }
    for (int l = 0; l < kLanes; ++l) px[(i - i0) * kLanes + l] = clip8(acc[l]);
  }
}

#ifdef PYVL_HAVE_AVX2_KERNEL
// The same with AVX2: per tap pair, the two columns' 48 bytes are interleaved byte-wise and zero-extended to
// int16 pairs, and _mm256_madd_epi16 with the (hi, hi') and (lo, lo') pairs gives exact int32 partial sums.
__attribute__((target("avx2"))) void horizontal_columns_avx2(const std::uint8_t* block, std::int64_t x0,
                                                             const PairedWeights& pw, std::int64_t i0,
                                                             std::int64_t i1, std::uint8_t* px) {
  for (std::int64_t i = i0; i < i1; ++i) {
    __m256i hi[6], lo[6];
    for (int g = 0; g < 6; ++g) hi[g] = lo[g] = _mm256_setzero_si256();
    const std::uint8_t* p = block + (pw.start[i] - x0) * kLanes;
    const std::int16_t* k = &pw.w[i * pw.stride * 4];
    for (int j = 0; j < pw.pairs[i]; ++j, p += 2 * kLanes, k += 4) {
      std::int32_t kh, kl;
      std::memcpy(&kh, k, 4);
      std::memcpy(&kl, k + 2, 4);
      const __m256i wh = _mm256_set1_epi32(kh), wl = _mm256_set1_epi32(kl);
      for (int q = 0; q < 3; ++q) {  // lanes 16q .. 16q + 15
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * q));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kLanes + 16 * q));
        const __m256i v0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));
        const __m256i v1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
        hi[2 * q] = _mm256_add_epi32(hi[2 * q], _mm256_madd_epi16(v0, wh));
        lo[2 * q] = _mm256_add_epi32(lo[2 * q], _mm256_madd_epi16(v0, wl));
        hi[2 * q + 1] = _mm256_add_epi32(hi[2 * q + 1], _mm256_madd_epi16(v1, wh));
        lo[2 * q + 1] = _mm256_add_epi32(lo[2 * q + 1], _mm256_madd_epi16(v1, wl));
      }
    }
    const __m256i half = _mm256_set1_epi32(kHalf);
    __m256i v[6];
    for (int g = 0; g < 6; ++g)  // clip8: >> 22, clamp to 0..255
      v[g] = _mm256_srai_epi32(
          _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(hi[g], kSplitBits), lo[g]), half), kPrecisionBits);
    // packs/packus work per 128-bit half: (v0, v1) -> int16 [v0.lo v1.lo v0.hi v1.hi], permute back to order.
    for (int q = 0; q < 3; ++q) {
      const __m256i s16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[2 * q], v[2 * q + 1]), 0xD8);
      const __m128i u8 = _mm_packus_epi16(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(px + (i - i0) * kLanes + 16 * q), u8);
    }
  }
}

bool cpu_has_avx2_kernel() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#else
bool cpu_has_avx2_kernel() { return false; }
#endif

// Horizontal pass (Pillow's ImagingResampleHorizontal_8bpc) of the rows of `in`: output row r goes to out[r]
// (null: computed, not stored), in chunks of output columns whose taps fit one interleaved window.
void horizontal_rows(Interleaved& in, const PairedWeights& pw, std::uint8_t* const out[kRowBlock], bool simd,
                     std::vector<std::uint8_t>& px) {
  const bool avx2 = simd && cpu_has_avx2_kernel();
  for (std::int64_t i0 = 0, i1; i0 < pw.size(); i0 = i1) {
    const std::int64_t limit = std::max(kWindow, pw.end(i0) - pw.start[i0]);
    for (i1 = i0 + 1; i1 < pw.size() && pw.end(i1) - pw.start[i0] <= limit;) ++i1;
    std::int64_t x0;
    const std::uint8_t* block = in.window(pw.start[i0], pw.end(i1 - 1), x0);
    px.resize(static_cast<std::size_t>((i1 - i0) * kLanes + 1));  // + 1: the last 4-byte move below reads it
#ifdef PYVL_HAVE_AVX2_KERNEL
    if (avx2)
      horizontal_columns_avx2(block, x0, pw, i0, i1, px.data());
    else
#endif
      horizontal_columns_scalar(block, x0, pw, i0, i1, px.data());
    // 4-byte moves (the 4th byte is overwritten by the next pixel), except the row's last pixel: 3 bytes.
    const std::int64_t last = std::min(i1, pw.size() - 1);
    for (int r = 0; r < kRowBlock; ++r) {
      if (!out[r]) continue;
      const std::uint8_t* from = &px[3 * r];
      for (std::int64_t i = i0; i < last; ++i, from += kLanes) {
        std::uint32_t v;
        std::memcpy(&v, from, 4);
        std::memcpy(out[r] + 3 * i, &v, 4);
      }
      if (last < i1) std::memcpy(out[r] + 3 * last, from, 3);
    }
  }
}

// Vertical pass (Pillow's ImagingResampleVertical_8bpc) of output row `row`: the first n bytes of rows of `in`
// (`stride` bytes apart, the first is source row `in_first`); runs of kVerticalRun values at a time. Each byte
// is filtered on its own, so the channels' layout does not matter.
PYVL_MULTIVERSION
void vertical_row_scalar(const std::uint8_t* in, std::int64_t stride, std::int64_t in_first, std::int64_t n,
                         const Axis& ax, std::int64_t row, std::uint8_t* out) {
  const int* k = &ax.weights[row * ax.ksize];
  const std::uint8_t* base = in + (ax.first[row] - in_first) * stride;
  int acc[kVerticalRun];
  for (std::int64_t c0 = 0; c0 < n; c0 += kVerticalRun) {
    const std::int64_t m = std::min(kVerticalRun, n - c0);
    for (std::int64_t i = 0; i < m; ++i) acc[i] = kHalf;
    for (std::int64_t y = 0; y < ax.count[row]; ++y) {
      const std::uint8_t* src = base + y * stride + c0;
      const int ky = k[y];
      for (std::int64_t i = 0; i < m; ++i) acc[i] += src[i] * ky;
    }
    for (std::int64_t i = 0; i < m; ++i) out[c0 + i] = clip8(acc[i]);
  }
}

#ifdef PYVL_HAVE_AVX2_KERNEL
// The same with AVX2, 32 values of the row per step with the sums in registers: the rows are taken in pairs
// (an odd last one paired with itself at weight 0), their bytes interleaved and zero-extended to int16 pairs,
// and _mm256_madd_epi16 with the pair's (hi, hi') and (lo, lo') weight halves gives exact int32 partial sums,
// as in the horizontal pass. The last n % 32 values are summed one by one.
__attribute__((target("avx2"))) void vertical_row_avx2(const std::uint8_t* in, std::int64_t stride,
                                                       std::int64_t in_first, std::int64_t n, const Axis& ax,
                                                       std::int64_t row, std::uint8_t* out) {
  const std::int64_t count = ax.count[row];
  const int* k = &ax.weights[row * ax.ksize];
  const std::uint8_t* base = in + (ax.first[row] - in_first) * stride;
  const auto halves = [](int ka, int kb, int shift, int mask) {  // two int16 weight halves as one int32
    return static_cast<std::int32_t>(static_cast<std::uint16_t>((ka >> shift) & mask) |
                                     (static_cast<std::uint32_t>((kb >> shift) & mask) << 16));
  };
  const __m256i zero = _mm256_setzero_si256(), half = _mm256_set1_epi32(kHalf);
  std::int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    __m256i hi[4], lo[4];
    for (int g = 0; g < 4; ++g) hi[g] = lo[g] = zero;
    for (std::int64_t y = 0; y < count; y += 2) {
      const bool pair = y + 1 < count;
      const int ka = k[y], kb = pair ? k[y + 1] : 0;
      const __m256i wh = _mm256_set1_epi32(halves(ka, kb, kSplitBits, 0xFFFF));
      const __m256i wl = _mm256_set1_epi32(halves(ka, kb, 0, (1 << kSplitBits) - 1));
      const std::uint8_t* pa = base + y * stride + c;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa));
      const __m256i b = pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa + stride)) : a;
      // Per 128-bit lane: ab_lo holds values 0-7 (16-23) as byte pairs, ab_hi values 8-15 (24-31).
      const __m256i ab_lo = _mm256_unpacklo_epi8(a, b), ab_hi = _mm256_unpackhi_epi8(a, b);
      const __m256i v[4] = {_mm256_unpacklo_epi8(ab_lo, zero), _mm256_unpackhi_epi8(ab_lo, zero),
                            _mm256_unpacklo_epi8(ab_hi, zero), _mm256_unpackhi_epi8(ab_hi, zero)};
      for (int g = 0; g < 4; ++g) {  // v[g]: values 4g..4g+3 and 16+4g..16+4g+3
        hi[g] = _mm256_add_epi32(hi[g], _mm256_madd_epi16(v[g], wh));
        lo[g] = _mm256_add_epi32(lo[g], _mm256_madd_epi16(v[g], wl));
      }
    }
    __m256i s[4];
    for (int g = 0; g < 4; ++g)  // clip8: >> 22, then the saturating packs clamp to 0..255
      s[g] = _mm256_srai_epi32(
          _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(hi[g], kSplitBits), lo[g]), half), kPrecisionBits);
    // Per lane, packs gives int16 values (0-7 | 16-23) and (8-15 | 24-31); packus then restores the order 0-31.
    const __m256i u8 = _mm256_packus_epi16(_mm256_packs_epi32(s[0], s[1]), _mm256_packs_epi32(s[2], s[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), u8);
  }
  for (; c < n; ++c) {
    int acc = kHalf;
    for (std::int64_t y = 0; y < count; ++y) acc += base[y * stride + c] * k[y];
    out[c] = clip8(acc);
  }
}
#endif

void vertical_row(const std::uint8_t* in, std::int64_t stride, std::int64_t in_first, std::int64_t n,
                  const Axis& ax, std::int64_t row, std::uint8_t* out, bool simd) {
#ifdef PYVL_HAVE_AVX2_KERNEL
  if (simd && cpu_has_avx2_kernel()) return vertical_row_avx2(in, stride, in_first, n, ax, row, out);
#endif
  vertical_row_scalar(in, stride, in_first, n, ax, row, out);
}

// The bytes a row of `width` pixels `pixel_bytes` apart spans: the last pixel's 4th byte, if any, is not its.
std::int64_t row_extent(std::int64_t width, int pixel_bytes) { return (width - 1) * pixel_bytes + 3; }

// One resize of the source (the grid or the thumbnail), its passes in the order of the chosen Pillow.
struct Target {
  std::int64_t in_w, out_w, out_h;
  int in_pixel;  // bytes from one source pixel to the next (3 or 4)
  bool vertical_first;
  Axis vertical;
  PairedWeights horizontal;
  // h-first: source rows [rows_begin, rows_end) resized in x, packed RGB; v-first: (out_h, in_w) pixels laid out
  // as the source's (in_pixel bytes each: the vertical pass filters a 4th byte too rather than repack the row).
  Bytes tmp;

  Target(std::int64_t h, std::int64_t w, int pixel_bytes, std::int64_t oh, std::int64_t ow, int pass_order)
      : in_w(w), out_w(ow), out_h(oh), in_pixel(pixel_bytes),
        vertical_first(resample::vertical_first(h, w, oh, ow, pass_order)), vertical(h, oh), horizontal(Axis(w, ow)),
        tmp(new_bytes(vertical_first ? oh * w * pixel_bytes
                                     : (vertical.rows_end() - vertical.rows_begin()) * ow * 3)) {}

  // h-first, first pass: the source rows [y, y + n) (interleaved in `in`) resized in x, those this target uses.
  void horizontal_source_block(Interleaved& in, std::int64_t y, int n, bool simd,
                               std::vector<std::uint8_t>& px) const {
    std::uint8_t* out[kRowBlock] = {};
    for (int r = 0; r < n; ++r)
      if (y + r >= vertical.rows_begin() && y + r < vertical.rows_end())
        out[r] = &tmp[(y + r - vertical.rows_begin()) * out_w * 3];
    if (std::any_of(out, out + kRowBlock, [](const std::uint8_t* p) { return p != nullptr; }))
      horizontal_rows(in, horizontal, out, simd, px);
  }
  // v-first, first pass: output row r resized in y straight from the source.
  void vertical_source_row(const std::uint8_t* src, std::int64_t row_stride, std::int64_t r, bool simd) const {
    vertical_row(src, row_stride, 0, row_extent(in_w, in_pixel), vertical, r, &tmp[r * in_w * in_pixel], simd);
  }
  // Second pass: finished uint8 output rows [r, r + n), n <= kRowBlock, into `lines` (n x out_w x 3).
  void finish_rows(std::int64_t r, int n, bool simd, std::vector<std::uint8_t>& px, std::uint8_t* lines) const {
    if (vertical_first) {
      Interleaved in(&tmp[r * in_w * in_pixel], in_w * in_pixel, n, in_w, in_pixel);
      std::uint8_t* out[kRowBlock] = {};
      for (int i = 0; i < n; ++i) out[i] = lines + i * out_w * 3;
      horizontal_rows(in, horizontal, out, simd, px);
    } else {
      for (int i = 0; i < n; ++i)
        vertical_row(tmp.get(), out_w * 3, vertical.rows_begin(), out_w * 3, vertical, r + i, lines + i * out_w * 3,
                     simd);
    }
  }
};

// First pass of the targets: the h-first ones share one sweep over the source in blocks of 16 rows.
void first_pass(const std::vector<Target*>& targets, const std::uint8_t* src, std::int64_t w, std::int64_t row_stride,
                int pixel_bytes, bool simd, int num_threads) {
  std::int64_t y0 = LLONG_MAX, y1 = 0;
  for (const Target* t : targets)
    if (!t->vertical_first) y0 = std::min(y0, t->vertical.rows_begin()), y1 = std::max(y1, t->vertical.rows_end());
  if (y1 > y0) {
    const std::int64_t blocks = (y1 - y0 + kRowBlock - 1) / kRowBlock;
    parallel_for(blocks, resolve_threads(num_threads, blocks, 2), [&](std::int64_t b, std::int64_t e) {
      std::vector<std::uint8_t> px;
      for (std::int64_t i = b; i < e; ++i) {
        const std::int64_t y = y0 + i * kRowBlock;
        const int n = static_cast<int>(std::min<std::int64_t>(kRowBlock, y1 - y));
        Interleaved in(src + y * row_stride, row_stride, n, w, pixel_bytes);
        for (const Target* t : targets)
          if (!t->vertical_first) t->horizontal_source_block(in, y, n, simd, px);
      }
    });
  }
  for (const Target* t : targets) {
    if (!t->vertical_first) continue;
    parallel_for(t->out_h, resolve_threads(num_threads, t->out_h, 16), [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t r = b; r < e; ++r) t->vertical_source_row(src, row_stride, r, simd);
    });
  }
}

// Second pass over every output row of the targets in blocks of 16: emit(target index, row, uint8 row).
template <class Emit>
void second_pass(const std::vector<Target*>& targets, bool simd, int num_threads, const Emit& emit) {
  std::vector<std::pair<int, std::int64_t>> jobs;  // (target, first row of a block)
  std::int64_t widest = 0;
  for (int t = 0; t < static_cast<int>(targets.size()); ++t) {
    widest = std::max(widest, targets[t]->out_w);
    for (std::int64_t r = 0; r < targets[t]->out_h; r += kRowBlock) jobs.emplace_back(t, r);
  }
  const std::int64_t n_jobs = static_cast<std::int64_t>(jobs.size());
  parallel_for(n_jobs, resolve_threads(num_threads, n_jobs, 1), [&](std::int64_t b, std::int64_t e) {
    std::vector<std::uint8_t> px, lines(static_cast<std::size_t>(kRowBlock * widest * 3));
    for (std::int64_t j = b; j < e; ++j) {
      const auto [t, r] = jobs[j];
      const Target& target = *targets[t];
      const int n = static_cast<int>(std::min<std::int64_t>(kRowBlock, target.out_h - r));
      target.finish_rows(r, n, simd, px, lines.data());
      for (int i = 0; i < n; ++i) emit(t, r + i, &lines[i * target.out_w * 3]);
    }
  });
}

// The last step: n RGB pixels -> the three planes of a tile row (r, r + plane, r + 2 * plane), each value
// looked up in the per-channel float table (the reference's float32 arithmetic, computed once per value).
void normalise_run_scalar(const std::uint8_t* px, std::int64_t n, const float (*table)[256], float* r,
                          std::int64_t plane) {
  float* g = r + plane;
  float* b = g + plane;
  for (std::int64_t i = 0; i < n; ++i) {
    r[i] = table[0][px[3 * i]];
    g[i] = table[1][px[3 * i + 1]];
    b[i] = table[2][px[3 * i + 2]];
  }
}

#ifdef PYVL_HAVE_AVX2_KERNEL
// The same 8 pixels at a time: two 12-byte groups (pixels 0-3, 4-7) in the two 128-bit lanes, one byte shuffle
// per channel zero-extends its 8 values to int32 indices, a gather reads the table, one store per plane.
__attribute__((target("avx2"))) void normalise_run_avx2(const std::uint8_t* px, std::int64_t n,
                                                        const float (*table)[256], float* r, std::int64_t plane) {
  const __m256i pick[3] = {
      _mm256_setr_epi8(0, -1, -1, -1, 3, -1, -1, -1, 6, -1, -1, -1, 9, -1, -1, -1,  //
                       0, -1, -1, -1, 3, -1, -1, -1, 6, -1, -1, -1, 9, -1, -1, -1),
      _mm256_setr_epi8(1, -1, -1, -1, 4, -1, -1, -1, 7, -1, -1, -1, 10, -1, -1, -1,  //
                       1, -1, -1, -1, 4, -1, -1, -1, 7, -1, -1, -1, 10, -1, -1, -1),
      _mm256_setr_epi8(2, -1, -1, -1, 5, -1, -1, -1, 8, -1, -1, -1, 11, -1, -1, -1,  //
                       2, -1, -1, -1, 5, -1, -1, -1, 8, -1, -1, -1, 11, -1, -1, -1)};
  std::int64_t i = 0;
  for (; 3 * i + 28 <= 3 * n; i += 8) {  // the second 16-byte load ends at byte 3i + 28
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(px + 3 * i));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(px + 3 * i + 12));
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    for (int c = 0; c < 3; ++c) {
      const __m256 v = _mm256_i32gather_ps(table[c], _mm256_shuffle_epi8(both, pick[c]), 4);
      _mm256_storeu_ps(r + c * plane + i, v);
    }
  }
  normalise_run_scalar(px + 3 * i, n - i, table, r + i, plane);
}
#endif

void normalise_run(const std::uint8_t* px, std::int64_t n, const float (*table)[256], float* r, std::int64_t plane,
                   bool avx2) {
#ifdef PYVL_HAVE_AVX2_KERNEL
  if (avx2) return normalise_run_avx2(px, n, table, r, plane);
#endif
  (void)avx2;
  normalise_run_scalar(px, n, table, r, plane);
}

}  // namespace

bool cpu_has_avx2() { return cpu_has_avx2_kernel(); }

void resize_bicubic_cpu(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                        int pixel_stride, std::int64_t out_h, std::int64_t out_w, std::uint8_t* dst, int pass_order,
                        bool simd, int num_threads) {
  resample::check_sides(h, w, out_h, out_w, "resize_bicubic_cpu");
  resample::check_pass_order(pass_order, "resize_bicubic_cpu");
  Target t(h, w, pixel_stride, out_h, out_w, pass_order);
  const std::vector<Target*> targets{&t};
  first_pass(targets, src, w, row_stride, pixel_stride, simd, num_threads);
  second_pass(targets, simd, num_threads, [&](int, std::int64_t r, const std::uint8_t* line) {
    std::copy_n(line, out_w * 3, dst + r * out_w * 3);
  });
}

void resize_tiles_cpu(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                      int pixel_stride, std::int64_t cols, std::int64_t rows, std::int64_t tile, bool thumbnail,
                      const float mean[3], const float stdev[3], float* dst, int pass_order, bool simd,
                      int num_threads) {
  check(cols <= resample::kMaxSide && rows <= resample::kMaxSide && tile <= resample::kMaxSide,
        "resize_tiles_cpu: cols, rows and tile must be at most ", resample::kMaxSide);
  resample::check_sides(h, w, rows * tile, cols * tile, "resize_tiles_cpu");
  resample::check_pass_order(pass_order, "resize_tiles_cpu");
  float table[3][256];  // the reference's float32 (u / 255 - mean) / std, for every uint8 value
  for (int c = 0; c < 3; ++c)
    for (int u = 0; u < 256; ++u) table[c][u] = (static_cast<float>(u) / 255.0f - mean[c]) / stdev[c];

  Target grid(h, w, pixel_stride, rows * tile, cols * tile, pass_order);
  std::vector<Target> thumb;
  if (thumbnail) thumb.emplace_back(h, w, pixel_stride, tile, tile, pass_order);
  std::vector<Target*> targets{&grid};
  if (thumbnail) targets.push_back(&thumb[0]);
  first_pass(targets, src, w, row_stride, pixel_stride, simd, num_threads);

  const std::int64_t plane = tile * tile;
  advise_huge_pages(dst, (rows * cols + (thumbnail ? 1 : 0)) * 3 * plane * static_cast<std::int64_t>(sizeof(float)));
  const bool avx2 = simd && cpu_has_avx2_kernel();
  second_pass(targets, simd, num_threads, [&](int t, std::int64_t row, const std::uint8_t* line) {
    const std::int64_t first_tile = t == 1 ? rows * cols : (row / tile) * cols, y = row % tile;
    for (std::int64_t x = 0, k = 0; x < targets[t]->out_w; x += tile, ++k)  // tiles row-major, the thumbnail last
      normalise_run(line + 3 * x, tile, table, dst + (first_tile + k) * 3 * plane + y * tile, plane, avx2);
  });
}

}  // namespace pyvl
