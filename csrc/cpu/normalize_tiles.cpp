// normalize_tiles on the CPU: uint8 NHWC tiles -> float32 NCHW, out = (u / 255 - mean[c]) / std[c].
//
// The input has only 256 values per channel, so the 3 x 256 results are computed once into a table with
// exactly the reference's float32 operations (true division, compiled with -ffp-contract=off); the pass
// over the pixels is then a table lookup that de-interleaves RGB into three planes, bit-identical to
// torch's `x.float().div(255)` followed by `(x - mean) / std`.
#include "common.h"

namespace pyvl {

void normalize_tiles_cpu(const std::uint8_t* src, float* dst, std::int64_t n, std::int64_t h, std::int64_t w,
                         const float mean[3], const float stdev[3], int num_threads) {
  float table[3][256];
  for (int c = 0; c < 3; ++c)
    for (int u = 0; u < 256; ++u) table[c][u] = (static_cast<float>(u) / 255.0f - mean[c]) / stdev[c];

  const std::int64_t plane = h * w;
  // One work item = one image row of one tile (w pixels); rows never straddle tiles.
  const auto rows = [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      const std::int64_t tile = r / h, y = r % h;
      const std::uint8_t* in = src + r * w * 3;     // (w, 3) interleaved RGB
      float* out0 = dst + tile * 3 * plane + y * w;  // row y of the R plane of this tile
      float* out1 = out0 + plane;
      float* out2 = out1 + plane;
      for (std::int64_t x = 0; x < w; ++x) {
        out0[x] = table[0][in[3 * x]];
        out1[x] = table[1][in[3 * x + 1]];
        out2[x] = table[2][in[3 * x + 2]];
      }
    }
  };
  const std::int64_t total_rows = n * h;
  // Auto threading gives each thread >= ~64k pixels: below that, starting threads costs more than it saves.
  const std::int64_t min_rows = std::max<std::int64_t>(1, (1 << 16) / w);
  parallel_for(total_rows, resolve_threads(num_threads, total_rows, min_rows), rows);
}

}  // namespace pyvl
