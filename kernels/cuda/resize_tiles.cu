// resize_tiles on the GPU: RGB uint8 [h, w, 3] on the device (pixels 3 bytes apart, or 4: RGBX, the 4th byte
// ignored) -> [N, 3, T, T] float32 or bfloat16 tiles, the same operation as csrc/cpu/resize_tiles.cpp and
// bit-identical to it (so to Pillow + ToTensor + Normalize):
//
//   grid  = PIL resize(src, (cols*T, rows*T), BICUBIC), cut into row-major T x T tiles  -> tiles 0 .. cols*rows-1
//   thumb = PIL resize(src, (T, T), BICUBIC) when `thumbnail`                           -> tile  cols*rows (last)
//   out[n, c, y, x] = (u / 255 - mean[c]) / std[c]   float32 (IEEE, no FMA), then RNE to bf16
//
// Each resize is Pillow's two separable passes in the order of the Pillow named by `pass_order`
// (resample::vertical_first), with the fixed-
// point weights computed on the host by the same code as the CPU kernel (csrc/resample_coeffs.h) and the
// uint8 image between the passes kept in device memory:
//   pass 1 (h-first: horizontal over every source row; v-first: vertical into every output row) -> uint8 tmp
//   pass 2 (the other direction) -> normalised values written straight into the tile layout.
// Both targets go in one launch per pass. Integer accumulation is exact, so the order of the taps cannot
// change a result: the uint8 values equal Pillow's bit for bit.
//
// Launch: a 1-D grid; each block of kThreads threads takes kThreads consecutive output pixels (x) of one row
// of one target, one thread per pixel (3 channels), so the uint8 reads and writes of a warp are 96 contiguous
// bytes and each channel plane of the tiles is written in contiguous runs. When both targets' passes have
// the same number of rows (both h-first: the source rows), the blocks are ordered row by row across the two
// targets, so the thumbnail's read of a source row finds it in L2 right after the grid's read.
//
// Buffers are the caller's (the Python wrapper allocates them as torch tensors; nothing is allocated here):
// `coefficients` (device, resize_tiles_cuda_workspace().coefficient_bytes, filled by copying the host buffer
// that resize_tiles_cuda_coefficients() wrote) and `intermediate` (device, .intermediate_bytes).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>

#include "common.h"
#include "resample_coeffs.h"

namespace pyvl {
namespace {

using resample::clip8;
using resample::kHalf;

constexpr int kThreads = 128;           // output pixels of one row per block
constexpr std::int64_t kAlign = 256;    // byte alignment of every array in the workspace buffers
using resample::kMaxSide;  // image and output sides: keeps every pixel coordinate an int

struct Channels {
  float v[3];
};

// One axis' weights on the device: output i reads bounds[2i+1] inputs from input bounds[2i], with the
// weights[i * ksize + t] (Pillow's fixed point, resample::Axis).
struct DeviceAxis {
  const int* bounds;
  const int* weights;
  int ksize;
};

// One resize target (the grid or the thumbnail) and where its pixels go.
struct Job {
  DeviceAxis horizontal, vertical;
  int in_h, in_w, out_h, out_w;
  bool vertical_first;
  std::uint8_t* tmp;             // pass-1 result, packed RGB: h-first [in_h, out_w, 3], v-first [out_h, in_w, 3]
  int first_tile, tiles_across;  // output pixel (y, x) -> tile first_tile + (y / T) * tiles_across + x / T
};

// One pass over one or two jobs: job j has rows[j] rows of chunks[j] blocks each.
struct Pass {
  Job job[2];
  int rows[2], chunks[2];
  bool interleave;  // blocks ordered row by row across the jobs (rows[0] == rows[1]), else job 0 then job 1
};

struct Work {
  int job, row, x;
};

PYVL_HOST_DEVICE inline Work locate(const Pass& p, unsigned block, int thread) {
  int j = 0;
  unsigned row, chunk;
  if (p.interleave) {
    const unsigned per_row = static_cast<unsigned>(p.chunks[0] + p.chunks[1]);
    row = block / per_row;
    chunk = block % per_row;
    if (chunk >= static_cast<unsigned>(p.chunks[0])) j = 1, chunk -= p.chunks[0];
  } else {
    const unsigned first_job_blocks = static_cast<unsigned>(p.rows[0]) * static_cast<unsigned>(p.chunks[0]);
    if (block >= first_job_blocks) j = 1, block -= first_job_blocks;
    row = block / static_cast<unsigned>(p.chunks[j]);
    chunk = block % static_cast<unsigned>(p.chunks[j]);
  }
  return {j, static_cast<int>(row), static_cast<int>(chunk) * kThreads + thread};
}

template <class U>
PYVL_HOST_DEVICE inline U load(const U* p) {  // through the read-only data cache on the device
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Pillow's ImagingResampleHorizontal_8bpc for output pixel x of one RGB row whose pixels are `pixel` bytes apart
// (3: packed; 4: RGBX, the 4th byte ignored).
PYVL_HOST_DEVICE inline void filter_horizontal(const std::uint8_t* row, int pixel, const DeviceAxis& ax, int x,
                                               int acc[3]) {
  const int first = load(ax.bounds + 2 * x), count = load(ax.bounds + 2 * x + 1);
  const int* k = ax.weights + static_cast<std::int64_t>(x) * ax.ksize;
  const std::uint8_t* p = row + static_cast<std::int64_t>(first) * pixel;
  acc[0] = acc[1] = acc[2] = kHalf;
  for (int t = 0; t < count; ++t, p += pixel) {
    const int kt = load(k + t);
    acc[0] += load(p) * kt;
    acc[1] += load(p + 1) * kt;
    acc[2] += load(p + 2) * kt;
  }
}

// Pillow's ImagingResampleVertical_8bpc for output pixel (y, x); rows of `image` are `stride` bytes apart, pixels
// `pixel` bytes apart.
PYVL_HOST_DEVICE inline void filter_vertical(const std::uint8_t* image, std::int64_t stride, int pixel,
                                             const DeviceAxis& ax, int y, int x, int acc[3]) {
  const int first = load(ax.bounds + 2 * y), count = load(ax.bounds + 2 * y + 1);
  const int* k = ax.weights + static_cast<std::int64_t>(y) * ax.ksize;
  const std::uint8_t* p = image + first * stride + static_cast<std::int64_t>(pixel) * x;
  acc[0] = acc[1] = acc[2] = kHalf;
  for (int t = 0; t < count; ++t, p += stride) {
    const int kt = load(k + t);
    acc[0] += load(p) * kt;
    acc[1] += load(p + 1) * kt;
    acc[2] += load(p + 2) * kt;
  }
}

// (u / 255 - mean) / std in float32 with IEEE rounding, exactly as the CPU kernel's table.
PYVL_HOST_DEVICE inline float normalise(std::uint8_t u, float mean, float stdev) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(__fsub_rn(__fdiv_rn(static_cast<float>(u), 255.0f), mean), stdev);
#else
  return (static_cast<float>(u) / 255.0f - mean) / stdev;
#endif
}

PYVL_HOST_DEVICE inline void store(float* p, float x) { *p = x; }
PYVL_HOST_DEVICE inline void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Pass 1 for one pixel: the source filtered in the first direction, into the job's packed uint8 intermediate.
PYVL_HOST_DEVICE inline void first_pass_pixel(const Pass& p, const std::uint8_t* src, std::int64_t src_stride,
                                              int src_pixel, unsigned block, int thread) {
  const Work wk = locate(p, block, thread);
  const Job& job = p.job[wk.job];
  int acc[3];
  std::uint8_t* out;
  if (job.vertical_first) {  // output row wk.row, every source column
    if (wk.x >= job.in_w) return;
    filter_vertical(src, src_stride, src_pixel, job.vertical, wk.row, wk.x, acc);
    out = job.tmp + (static_cast<std::int64_t>(wk.row) * job.in_w + wk.x) * 3;
  } else {  // source row wk.row, every output column
    if (wk.x >= job.out_w) return;
    filter_horizontal(src + wk.row * src_stride, src_pixel, job.horizontal, wk.x, acc);
    out = job.tmp + (static_cast<std::int64_t>(wk.row) * job.out_w + wk.x) * 3;
  }
  out[0] = clip8(acc[0]);
  out[1] = clip8(acc[1]);
  out[2] = clip8(acc[2]);
}

// Pass 2 for one output pixel: the intermediate filtered in the other direction, normalised into its tile.
template <class T>
PYVL_HOST_DEVICE inline void second_pass_pixel(const Pass& p, T* dst, int tile, const Channels& mean,
                                               const Channels& stdev, unsigned block, int thread) {
  const Work wk = locate(p, block, thread);
  const Job& job = p.job[wk.job];
  if (wk.x >= job.out_w) return;
  int acc[3];
  if (job.vertical_first)
    filter_horizontal(job.tmp + static_cast<std::int64_t>(wk.row) * job.in_w * 3, 3, job.horizontal, wk.x, acc);
  else
    filter_vertical(job.tmp, static_cast<std::int64_t>(job.out_w) * 3, 3, job.vertical, wk.row, wk.x, acc);
  const std::int64_t plane = static_cast<std::int64_t>(tile) * tile;
  const int n = job.first_tile + (wk.row / tile) * job.tiles_across + wk.x / tile;
  T* out = dst + n * 3 * plane + static_cast<std::int64_t>(wk.row % tile) * tile + wk.x % tile;  // [n, 0, y, x]
  store(out, normalise(clip8(acc[0]), mean.v[0], stdev.v[0]));
  store(out + plane, normalise(clip8(acc[1]), mean.v[1], stdev.v[1]));
  store(out + 2 * plane, normalise(clip8(acc[2]), mean.v[2], stdev.v[2]));
}

__global__ void __launch_bounds__(kThreads)
first_pass_kernel(const __grid_constant__ Pass p, const std::uint8_t* src, std::int64_t src_stride, int src_pixel) {
  first_pass_pixel(p, src, src_stride, src_pixel, blockIdx.x, static_cast<int>(threadIdx.x));
}

template <class T>
__global__ void __launch_bounds__(kThreads)
second_pass_kernel(const __grid_constant__ Pass p, T* dst, int tile, Channels mean, Channels stdev) {
  second_pass_pixel(p, dst, tile, mean, stdev, blockIdx.x, static_cast<int>(threadIdx.x));
}

// Where each target's coefficients and intermediate live in the caller's two buffers (byte offsets).
struct TargetLayout {
  std::int64_t out_h, out_w;
  bool vertical_first;
  int h_taps, v_taps;
  std::int64_t h_bounds, h_weights, v_bounds, v_weights;  // in the coefficient buffer
  std::int64_t tmp;                                       // in the intermediate buffer
};

struct Layout {
  int targets;
  TargetLayout t[2];
  std::int64_t coefficient_bytes, intermediate_bytes;
};

Layout make_layout(std::int64_t h, std::int64_t w, std::int64_t cols, std::int64_t rows, std::int64_t tile,
                   bool thumbnail, int pass_order) {
  resample::check_pass_order(pass_order, "resize_tiles_cuda");
  check(h > 0 && w > 0 && h <= kMaxSide && w <= kMaxSide, "resize_tiles_cuda: source size ", w, "x", h,
        " is out of range (1..", kMaxSide, " per side)");
  check(cols > 0 && rows > 0 && tile > 0 && cols <= kMaxSide && rows <= kMaxSide && tile <= kMaxSide,
        "resize_tiles_cuda: cols, rows and tile must be in 1..", kMaxSide, ", got ", cols, ", ", rows, ", ", tile);
  check(cols * tile <= kMaxSide && rows * tile <= kMaxSide, "resize_tiles_cuda: output size ", cols * tile, "x",
        rows * tile, " is out of range (1..", kMaxSide, " per side)");
  check(cols * rows < INT_MAX, "resize_tiles_cuda: ", cols, " x ", rows, " tiles is more than one launch indexes");
  Layout layout{};
  layout.targets = thumbnail ? 2 : 1;
  const auto take = [](std::int64_t& end, std::int64_t bytes) {
    const std::int64_t at = end;
    end += (bytes + kAlign - 1) / kAlign * kAlign;
    return at;
  };
  for (int i = 0; i < layout.targets; ++i) {
    TargetLayout& t = layout.t[i];
    t.out_h = i == 0 ? rows * tile : tile;
    t.out_w = i == 0 ? cols * tile : tile;
    t.vertical_first = resample::vertical_first(h, w, t.out_h, t.out_w, pass_order);
    t.h_taps = resample::checked_taps(w, t.out_w);
    t.v_taps = resample::checked_taps(h, t.out_h);
    const std::int64_t word = sizeof(int);
    t.h_bounds = take(layout.coefficient_bytes, 2 * t.out_w * word);
    t.h_weights = take(layout.coefficient_bytes, t.out_w * t.h_taps * word);
    t.v_bounds = take(layout.coefficient_bytes, 2 * t.out_h * word);
    t.v_weights = take(layout.coefficient_bytes, t.out_h * t.v_taps * word);
    t.tmp = take(layout.intermediate_bytes, (t.vertical_first ? t.out_h * w : h * t.out_w) * 3);
  }
  return layout;
}

void write_axis(const resample::Axis& axis, int taps, char* base, std::int64_t bounds, std::int64_t weights) {
  check(axis.ksize == taps, "resize_tiles_cuda: internal error, ", axis.ksize, " taps computed, ", taps, " planned");
  auto* b = reinterpret_cast<int*>(base + bounds);
  for (std::int64_t i = 0; i < axis.size(); ++i) {
    b[2 * i] = static_cast<int>(axis.first[i]);
    b[2 * i + 1] = static_cast<int>(axis.count[i]);
  }
  std::copy(axis.weights.begin(), axis.weights.end(), reinterpret_cast<int*>(base + weights));
}

// Pass over up to two jobs, with `rows(job)` rows of `width(job)` pixels each.
template <class Rows, class Width>
Pass make_pass(const Job* jobs, int n, const Rows& rows, const Width& width, unsigned& launch_blocks) {
  Pass p{};
  std::int64_t blocks = 0;
  for (int j = 0; j < n; ++j) {
    p.job[j] = jobs[j];
    p.rows[j] = rows(jobs[j]);
    p.chunks[j] = (width(jobs[j]) + kThreads - 1) / kThreads;
    blocks += static_cast<std::int64_t>(p.rows[j]) * p.chunks[j];
  }
  p.interleave = n == 1 || p.rows[0] == p.rows[1];
  check(blocks <= INT_MAX, "resize_tiles_cuda: ", blocks, " blocks is more than one launch takes (", INT_MAX, ")");
  launch_blocks = static_cast<unsigned>(blocks);
  return p;
}

struct Passes {
  Pass first, second;
  unsigned first_blocks, second_blocks;
};

// The two launches' arguments: the jobs point into the caller's device buffers as `layout` places them.
Passes plan_passes(const Layout& layout, std::int64_t h, std::int64_t w, std::int64_t cols, std::int64_t rows,
                   const void* coefficients, void* intermediate) {
  const auto* coeff = static_cast<const char*>(coefficients);
  const auto axis = [&](std::int64_t bounds, std::int64_t weights, int taps) {
    return DeviceAxis{reinterpret_cast<const int*>(coeff + bounds), reinterpret_cast<const int*>(coeff + weights),
                      taps};
  };
  Job jobs[2] = {};
  for (int i = 0; i < layout.targets; ++i) {
    const TargetLayout& t = layout.t[i];
    Job& job = jobs[i];
    job.horizontal = axis(t.h_bounds, t.h_weights, t.h_taps);
    job.vertical = axis(t.v_bounds, t.v_weights, t.v_taps);
    job.in_h = static_cast<int>(h);
    job.in_w = static_cast<int>(w);
    job.out_h = static_cast<int>(t.out_h);
    job.out_w = static_cast<int>(t.out_w);
    job.vertical_first = t.vertical_first;
    job.tmp = static_cast<std::uint8_t*>(intermediate) + t.tmp;
    job.first_tile = i == 0 ? 0 : static_cast<int>(cols * rows);
    job.tiles_across = i == 0 ? static_cast<int>(cols) : 1;
  }
  Passes p{};
  // Pass 1: v-first fills the output rows at the source width, h-first the source rows at the output width.
  p.first = make_pass(
      jobs, layout.targets, [](const Job& j) { return j.vertical_first ? j.out_h : j.in_h; },
      [](const Job& j) { return j.vertical_first ? j.in_w : j.out_w; }, p.first_blocks);
  p.second = make_pass(
      jobs, layout.targets, [](const Job& j) { return j.out_h; }, [](const Job& j) { return j.out_w; },
      p.second_blocks);
  return p;
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(concat("resize_tiles_cuda: ", what, " launch failed: ", cudaGetErrorString(err)));
}

}  // namespace

ResizeTilesWorkspace resize_tiles_cuda_workspace(std::int64_t h, std::int64_t w, std::int64_t cols,
                                                 std::int64_t rows, std::int64_t tile, bool thumbnail,
                                                 int pass_order) {
  const Layout layout = make_layout(h, w, cols, rows, tile, thumbnail, pass_order);
  return {layout.coefficient_bytes, layout.intermediate_bytes};
}

void resize_tiles_cuda_coefficients(std::int64_t h, std::int64_t w, std::int64_t cols, std::int64_t rows,
                                    std::int64_t tile, bool thumbnail, int pass_order, void* host_dst,
                                    std::int64_t nbytes) {
  const Layout layout = make_layout(h, w, cols, rows, tile, thumbnail, pass_order);
  check(nbytes >= layout.coefficient_bytes, "resize_tiles_cuda_coefficients: the buffer has ", nbytes,
        " bytes, the coefficients need ", layout.coefficient_bytes);
  auto* base = static_cast<char*>(host_dst);
  std::fill(base, base + layout.coefficient_bytes, char{0});  // alignment padding too: no stale bytes uploaded
  for (int i = 0; i < layout.targets; ++i) {
    const TargetLayout& t = layout.t[i];
    write_axis(resample::Axis(w, t.out_w), t.h_taps, base, t.h_bounds, t.h_weights);
    write_axis(resample::Axis(h, t.out_h), t.v_taps, base, t.v_bounds, t.v_weights);
  }
}

void resize_tiles_cuda(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                       int pixel_stride, void* dst, int dtype, std::int64_t cols, std::int64_t rows, std::int64_t tile,
                       bool thumbnail, int pass_order, const float mean[3], const float stdev[3],
                       const void* coefficients, std::int64_t coefficient_bytes, void* intermediate,
                       std::int64_t intermediate_bytes, std::uintptr_t stream) {
  check(dtype == kFloat32 || dtype == kBFloat16, "resize_tiles_cuda: unknown output dtype code ", dtype);
  const Layout layout = make_layout(h, w, cols, rows, tile, thumbnail, pass_order);
  check(coefficient_bytes >= layout.coefficient_bytes, "resize_tiles_cuda: the coefficient buffer has ",
        coefficient_bytes, " bytes, ", layout.coefficient_bytes, " needed");
  check(intermediate_bytes >= layout.intermediate_bytes, "resize_tiles_cuda: the intermediate buffer has ",
        intermediate_bytes, " bytes, ", layout.intermediate_bytes, " needed");

  const Passes passes = plan_passes(layout, h, w, cols, rows, coefficients, intermediate);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  first_pass_kernel<<<passes.first_blocks, kThreads, 0, s>>>(passes.first, src, row_stride, pixel_stride);
  check_launch("first pass");
  const Channels m{{mean[0], mean[1], mean[2]}}, sd{{stdev[0], stdev[1], stdev[2]}};
  const int t = static_cast<int>(tile);
  if (dtype == kFloat32)
    second_pass_kernel<<<passes.second_blocks, kThreads, 0, s>>>(passes.second, static_cast<float*>(dst), t, m, sd);
  else
    second_pass_kernel<<<passes.second_blocks, kThreads, 0, s>>>(passes.second, static_cast<__nv_bfloat16*>(dst), t,
                                                                 m, sd);
  check_launch("second pass");
}

}  // namespace pyvl
