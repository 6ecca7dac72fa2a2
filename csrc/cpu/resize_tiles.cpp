// Pillow-exact bicubic resize, fused with tiling and normalisation (the CPU side of pyvl's preprocessing).
//
// The original pipeline: PIL resize(RGB, (T*cols, T*rows), BICUBIC) -> crop row-major TxT tiles ->
// PIL resize(original, (T, T)) thumbnail -> ToTensor -> Normalize. Pillow's 8-bit resampler is separable: one
// pass into a uint8 image, then the other, each with fixed-point weights of 22 fractional bits, rounding
// (+ 1 << 21), an arithmetic shift and a clamp to 0..255. We redo exactly that arithmetic, so every uint8
// pixel is bit-identical, but vectorised: Pillow computes one pixel at a time, we compute 16 rows x 3 channels
// per weight (horizontal pass) or a whole row per weight (vertical pass). The horizontal passes of the grid
// and the thumbnail share one sweep over the source, and the last pass writes normalised floats straight
// into the [N, 3, T, T] tile tensor.
#include <climits>
#include <cstring>
#include <cmath>

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

constexpr int kRowBlock = 16;            // source rows resized in x together
constexpr int kLanes = kRowBlock * 3;    // values sharing one horizontal weight

// Interleave up to 16 RGB rows column by column: block[x][r][c], so the rows' pixels at one x are contiguous.
// Missing rows (a short last block) repeat the last one: their lanes are computed but never stored.
void interleave_rows(const std::uint8_t* in, std::int64_t stride, int n_rows, std::int64_t width,
                     std::vector<std::uint8_t>& block) {
  block.resize(width * kLanes + 1);  // +1: the 4-byte moves below spill one byte past the last pixel
  const std::uint8_t* rows[kRowBlock];
  for (int r = 0; r < kRowBlock; ++r) rows[r] = in + std::min(r, n_rows - 1) * stride;
  for (std::int64_t x = 0; x + 1 < width; ++x) {  // 4-byte moves (the 4th byte is overwritten by the next)
    std::uint8_t* dst = &block[x * kLanes];
    for (int r = 0; r < kRowBlock; ++r) {
      std::uint32_t v;
      std::memcpy(&v, rows[r] + 3 * x, 4);
      std::memcpy(dst + 3 * r, &v, 4);
    }
  }
  for (int r = 0; r < kRowBlock; ++r)  // the last pixel: exactly 3 bytes, never reading past the row
    std::memcpy(&block[(width - 1) * kLanes + 3 * r], rows[r] + 3 * (width - 1), 3);
}

// Horizontal pass (Pillow's ImagingResampleHorizontal_8bpc) of an interleaved block of n_rows rows: output
// row r goes to out + r * out_stride.
PYVL_MULTIVERSION
void horizontal_block(const std::uint8_t* block, int n_rows, const Axis& ax, std::uint8_t* out,
                      std::int64_t out_stride) {
  int acc[kLanes];
  for (std::int64_t i = 0; i < ax.size(); ++i) {
    for (int l = 0; l < kLanes; ++l) acc[l] = kHalf;
    const int* k = &ax.weights[i * ax.ksize];
    const std::uint8_t* p = block + ax.first[i] * kLanes;
    for (std::int64_t t = 0; t < ax.count[i]; ++t, p += kLanes) {
      const int kt = k[t];
      for (int l = 0; l < kLanes; ++l) acc[l] += p[l] * kt;
    }
    std::uint8_t px[kLanes];
    for (int l = 0; l < kLanes; ++l) px[l] = clip8(acc[l]);  // vectorised clamp, then 3-byte stores per row
    for (int r = 0; r < n_rows; ++r) std::memcpy(out + r * out_stride + 3 * i, px + 3 * r, 3);
  }
}

// Vertical pass (Pillow's ImagingResampleVertical_8bpc) of output row `row`: rows of `in` are `stride` bytes
// apart and the first is source row `in_first`; `acc` is scratch of width*3 ints.
PYVL_MULTIVERSION
void vertical_row(const std::uint8_t* in, std::int64_t stride, std::int64_t in_first, std::int64_t width,
                  const Axis& ax, std::int64_t row, int* acc, std::uint8_t* out) {
  const std::int64_t n = width * 3;
  for (std::int64_t i = 0; i < n; ++i) acc[i] = kHalf;
  const int* k = &ax.weights[row * ax.ksize];
  for (std::int64_t y = 0; y < ax.count[row]; ++y) {
    const std::uint8_t* src = in + (ax.first[row] + y - in_first) * stride;
    const int ky = k[y];
    for (std::int64_t i = 0; i < n; ++i) acc[i] += src[i] * ky;
  }
  for (std::int64_t i = 0; i < n; ++i) out[i] = clip8(acc[i]);
}

// One resize of the source (the grid or the thumbnail), its passes in Pillow's order (resample::vertical_first).
struct Target {
  std::int64_t in_w, out_w, out_h;
  Axis horizontal, vertical;
  bool vertical_first;
  std::vector<std::uint8_t> tmp;  // h-first: source rows [rows_begin, rows_end) resized in x; v-first: (out_h, in_w)

  Target(std::int64_t h, std::int64_t w, std::int64_t oh, std::int64_t ow)
      : in_w(w), out_w(ow), out_h(oh), horizontal(w, ow), vertical(h, oh),
        vertical_first(resample::vertical_first(h, w, oh, ow)),
        tmp(vertical_first ? oh * w * 3 : (vertical.rows_end() - vertical.rows_begin()) * ow * 3) {}

  // h-first, first pass: the interleaved source rows [y, y + n) resized in x, those this target uses.
  void horizontal_source_block(const std::uint8_t* block, std::int64_t y, int n) {
    const std::int64_t lo = std::max(y, vertical.rows_begin()), hi = std::min(y + n, vertical.rows_end());
    if (lo >= hi) return;
    if (lo == y && hi == y + n) {  // the usual case: every row of the block is used, write in place
      horizontal_block(block, n, horizontal, &tmp[(y - vertical.rows_begin()) * out_w * 3], out_w * 3);
      return;
    }
    // Edge blocks: rows outside [lo, hi) are computed too (they share the vectors) but not stored.
    std::vector<std::uint8_t> rows(n * out_w * 3);
    horizontal_block(block, n, horizontal, rows.data(), out_w * 3);
    for (std::int64_t r = lo; r < hi; ++r)
      std::copy_n(&rows[(r - y) * out_w * 3], out_w * 3, &tmp[(r - vertical.rows_begin()) * out_w * 3]);
  }
  // v-first, first pass: output row r resized in y straight from the source.
  void vertical_source_row(const std::uint8_t* src, std::int64_t row_stride, std::int64_t r, int* acc) {
    vertical_row(src, row_stride, 0, in_w, vertical, r, acc, &tmp[r * in_w * 3]);
  }
  // Second pass: finished uint8 output rows [r, r + n), n <= kRowBlock, into `lines` (n x out_w x 3).
  void finish_rows(std::int64_t r, int n, std::vector<int>& acc, std::vector<std::uint8_t>& block,
                   std::uint8_t* lines) const {
    if (vertical_first) {
      interleave_rows(&tmp[r * in_w * 3], in_w * 3, n, in_w, block);
      horizontal_block(block.data(), n, horizontal, lines, out_w * 3);
    } else {
      for (int i = 0; i < n; ++i)
        vertical_row(tmp.data(), out_w * 3, vertical.rows_begin(), out_w, vertical, r + i, acc.data(),
                     lines + i * out_w * 3);
    }
  }
};

// First pass of the targets: the h-first ones share one sweep over the source in blocks of 16 rows.
void first_pass(const std::vector<Target*>& targets, const std::uint8_t* src, std::int64_t w, std::int64_t row_stride,
                int num_threads) {
  std::int64_t y0 = LLONG_MAX, y1 = 0;
  for (const Target* t : targets)
    if (!t->vertical_first) y0 = std::min(y0, t->vertical.rows_begin()), y1 = std::max(y1, t->vertical.rows_end());
  if (y1 > y0) {
    const std::int64_t blocks = (y1 - y0 + kRowBlock - 1) / kRowBlock;
    parallel_for(blocks, resolve_threads(num_threads, blocks, 2), [&](std::int64_t b, std::int64_t e) {
      std::vector<std::uint8_t> block;
      for (std::int64_t i = b; i < e; ++i) {
        const std::int64_t y = y0 + i * kRowBlock;
        const int n = static_cast<int>(std::min<std::int64_t>(kRowBlock, y1 - y));
        interleave_rows(src + y * row_stride, row_stride, n, w, block);
        for (Target* t : targets)
          if (!t->vertical_first) t->horizontal_source_block(block.data(), y, n);
      }
    });
  }
  for (Target* t : targets) {
    if (!t->vertical_first) continue;
    parallel_for(t->out_h, resolve_threads(num_threads, t->out_h, 16), [&](std::int64_t b, std::int64_t e) {
      std::vector<int> acc(w * 3);
      for (std::int64_t r = b; r < e; ++r) t->vertical_source_row(src, row_stride, r, acc.data());
    });
  }
}

// Second pass over every output row of the targets in blocks of 16: emit(target index, row, uint8 row).
template <class Emit>
void second_pass(const std::vector<Target*>& targets, std::int64_t in_w, int num_threads, const Emit& emit) {
  std::vector<std::pair<int, std::int64_t>> jobs;  // (target, first row of a block)
  for (int t = 0; t < static_cast<int>(targets.size()); ++t)
    for (std::int64_t r = 0; r < targets[t]->out_h; r += kRowBlock) jobs.emplace_back(t, r);
  const std::int64_t n_jobs = static_cast<std::int64_t>(jobs.size());
  parallel_for(n_jobs, resolve_threads(num_threads, n_jobs, 1), [&](std::int64_t b, std::int64_t e) {
    std::int64_t widest = in_w;
    for (const Target* t : targets) widest = std::max(widest, t->out_w);
    std::vector<int> acc(widest * 3);
    std::vector<std::uint8_t> block, lines(kRowBlock * widest * 3);
    for (std::int64_t j = b; j < e; ++j) {
      const auto [t, r] = jobs[j];
      const Target& target = *targets[t];
      const int n = static_cast<int>(std::min<std::int64_t>(kRowBlock, target.out_h - r));
      target.finish_rows(r, n, acc, block, lines.data());
      for (int i = 0; i < n; ++i) emit(t, r + i, &lines[i * target.out_w * 3]);
    }
  });
}

}  // namespace

void resize_bicubic_cpu(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                        std::int64_t out_h, std::int64_t out_w, std::uint8_t* dst, int num_threads) {
  Target t(h, w, out_h, out_w);
  const std::vector<Target*> targets{&t};
  first_pass(targets, src, w, row_stride, num_threads);
  second_pass(targets, w, num_threads, [&](int, std::int64_t r, const std::uint8_t* line) {
    std::copy_n(line, out_w * 3, dst + r * out_w * 3);
  });
}

void resize_tiles_cpu(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                      std::int64_t cols, std::int64_t rows, std::int64_t tile, bool thumbnail,
                      const float mean[3], const float stdev[3], float* dst, int num_threads) {
  float table[3][256];  // the reference's float32 (u / 255 - mean) / std, for every uint8 value
  for (int c = 0; c < 3; ++c)
    for (int u = 0; u < 256; ++u) table[c][u] = (static_cast<float>(u) / 255.0f - mean[c]) / stdev[c];

  Target grid(h, w, rows * tile, cols * tile);
  std::vector<Target> thumb;
  if (thumbnail) thumb.emplace_back(h, w, tile, tile);
  std::vector<Target*> targets{&grid};
  if (thumbnail) targets.push_back(&thumb[0]);
  first_pass(targets, src, w, row_stride, num_threads);

  const std::int64_t plane = tile * tile;
  second_pass(targets, w, num_threads, [&](int t, std::int64_t row, const std::uint8_t* line) {
    const std::int64_t first_tile = t == 1 ? rows * cols : (row / tile) * cols, y = row % tile;
    for (std::int64_t x = 0; x < targets[t]->out_w; ++x) {  // tiles row-major, the thumbnail last
      float* out = dst + (first_tile + x / tile) * 3 * plane + y * tile + x % tile;
      out[0] = table[0][line[3 * x]];
      out[plane] = table[1][line[3 * x + 1]];
      out[2 * plane] = table[2][line[3 * x + 2]];
    }
  });
}

}  // namespace pyvl
