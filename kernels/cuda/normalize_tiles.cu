// normalize_tiles on the GPU: uint8 NHWC tiles [n, h, w, 3] -> NCHW [n, 3, h, w] in float32 or bfloat16,
// out = (u / 255 - mean[c]) / std[c].
//
// One thread per output element, in output order, so the writes coalesce; each thread reads one byte at
// stride 3, which the L1 cache absorbs. The arithmetic uses the IEEE round-to-nearest intrinsics
// (__fdiv_rn, __fsub_rn) so nvcc can neither fuse nor approximate it: the float32 result equals the CPU
// torch reference bit for bit (torch on CUDA multiplies by 1/255 instead and differs in the last bit), and
// bfloat16 is that value rounded to nearest even, as torch's .to(torch.bfloat16) does.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.h"

namespace pyvl {
namespace {

struct Channels {
  float v[3];
};

__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <class T>
__global__ void normalize_tiles_kernel(const std::uint8_t* __restrict__ src, T* __restrict__ dst,
                                       std::int64_t plane, std::int64_t total, Channels mean, Channels stdev) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const std::int64_t pixel = i % plane;  // y * w + x inside the tile
    const std::int64_t tile_channel = i / plane;
    const int c = static_cast<int>(tile_channel % 3);
    const std::int64_t tile = tile_channel / 3;
    const float u = static_cast<float>(src[(tile * plane + pixel) * 3 + c]);
    store(dst + i, __fdiv_rn(__fsub_rn(__fdiv_rn(u, 255.0f), mean.v[c]), stdev.v[c]));
  }
}

}  // namespace

void normalize_tiles_cuda(const std::uint8_t* src, void* dst, int dtype, std::int64_t n, std::int64_t h,
                          std::int64_t w, const float mean[3], const float stdev[3], std::uintptr_t stream) {
  check(dtype == kFloat32 || dtype == kBFloat16, "normalize_tiles_cuda: unknown output dtype code ", dtype);
  const Channels m{{mean[0], mean[1], mean[2]}}, s{{stdev[0], stdev[1], stdev[2]}};
  const std::int64_t plane = h * w, total = n * 3 * plane;
  constexpr int kThreads = 256;
  // Grid-stride loop: enough blocks to fill any current GPU, and no grid-size limit to hit.
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kFloat32) {
    auto* out = static_cast<float*>(dst);
    normalize_tiles_kernel<<<blocks, kThreads, 0, cuda_stream>>>(src, out, plane, total, m, s);
  } else {
    auto* out = static_cast<__nv_bfloat16*>(dst);
    normalize_tiles_kernel<<<blocks, kThreads, 0, cuda_stream>>>(src, out, plane, total, m, s);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(concat("normalize_tiles_cuda: kernel launch failed: ", cudaGetErrorString(err)));
}

}  // namespace pyvl
