// Shared by every native op: argument checks, the dtype codes, a CPU parallel-for, and the declarations
// of the ops themselves (defined in csrc/cpu/<op>.cpp and kernels/cuda/<op>.cu, bound in bindings.cpp).
//
// Plain C++17 with no pybind11 or CUDA headers, so nvcc compiles it cheaply. Checks throw
// std::invalid_argument, which pybind11 turns into a Python ValueError carrying the message.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

namespace pyvl {

// Output dtype codes; pyvl/ops/native.py holds the same table.
enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

// An allocation refused before it is tried (it would exceed a limit, e.g. Pillow's own): bindings.cpp turns
// it into a Python MemoryError carrying the message, as pybind11 does with std::bad_alloc.
struct AllocationTooLarge : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

// check(cond, "what", value, ...) throws std::invalid_argument("what value ...") when cond is false.
template <class... Args>
void check(bool cond, const Args&... message) {
  if (!cond) throw std::invalid_argument(concat(message...));
}

inline void check_pointer(std::uintptr_t ptr, const char* name) {
  check(ptr != 0, name, " is a null data pointer");
}

inline void check_positive(std::int64_t value, const char* name) {
  check(value > 0, name, " must be > 0, got ", value);
}

// CPUs this process may run on: the affinity mask on Linux (containers and taskset restrict it, while
// std::thread::hardware_concurrency counts every CPU of the host), else hardware_concurrency.
inline int available_cpus() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// Number of threads to use for `items` independent pieces of work: num_threads > 0 is honoured (capped at
// items); 0 means available_cpus(), but at least `min_items_per_thread` items each, since starting
// a thread costs tens of microseconds.
inline int resolve_threads(int num_threads, std::int64_t items, std::int64_t min_items_per_thread) {
  check(num_threads >= 0, "num_threads must be >= 0 (0 = all cores), got ", num_threads);
  std::int64_t n = num_threads;
  if (n == 0) {
    n = available_cpus();
    n = std::min(n, std::max<std::int64_t>(1, items / std::max<std::int64_t>(1, min_items_per_thread)));
  }
  return static_cast<int>(std::max<std::int64_t>(1, std::min(n, items)));
}

// Run fn(begin, end) over [0, items) split into `threads` contiguous chunks; the calling thread takes the
// first chunk, and also every chunk whose thread could not be started. fn may throw (std::bad_alloc
// included): every chunk still runs, every started thread is joined, then the first exception is rethrown
// here, on the calling thread (an exception escaping a std::thread, or a joinable std::thread destroyed
// during unwinding, would call std::terminate).
template <class Fn>
void parallel_for(std::int64_t items, int threads, const Fn& fn) {
  const auto chunk = [&](int i) { return items * i / threads; };
  std::mutex mutex;
  std::exception_ptr first_error;
  const auto run = [&](std::int64_t begin, std::int64_t end) noexcept {
    try {
      fn(begin, end);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex);
      if (!first_error) first_error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  int unstarted = 1;  // chunks [unstarted, threads) have no thread yet
  try {
    pool.reserve(threads - 1);
    for (; unstarted < threads; ++unstarted) pool.emplace_back(run, chunk(unstarted), chunk(unstarted + 1));
  } catch (...) {  // no memory or no more threads: the calling thread runs the rest
  }
  run(chunk(0), chunk(1));
  for (int i = unstarted; i < threads; ++i) run(chunk(i), chunk(i + 1));
  for (auto& t : pool) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

// resize_bicubic: RGB uint8 [h, w, 3] (rows `row_stride` bytes apart, pixels `pixel_stride` = 3 or 4 bytes apart,
// R, G, B first: packed RGB, or RGBX / RGBA with the 4th byte ignored) -> dst uint8 [out_h, out_w, 3], exactly
// PIL.Image.resize((out_w, out_h), Image.BICUBIC) (8-bit fixed point, uint8 between the two passes) of the
// Pillow whose pass-order rule `pass_order` names (resample::PassOrder). `simd` false forces the
// portable code where the CPU has AVX2 (the results are identical; tests compare them).
void resize_bicubic_cpu(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                        int pixel_stride, std::int64_t out_h, std::int64_t out_w, std::uint8_t* dst, int pass_order,
                        bool simd, int num_threads);
// resize_tiles: RGB uint8 source (laid out as resize_bicubic's) -> float32 [cols*rows (+1), 3, tile, tile]: the
// bicubic resize to (cols*tile, rows*tile) cut into row-major tiles, then (when `thumbnail`) the source resized
// to (tile, tile) last, every pixel normalised to (u / 255 - mean[c]) / stdev[c] in float32 with IEEE division
// (no reciprocal, no FMA), as torchvision's ToTensor + Normalize. One read of the source for both resizes.
void resize_tiles_cpu(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                      int pixel_stride, std::int64_t cols, std::int64_t rows, std::int64_t tile, bool thumbnail,
                      const float mean[3], const float stdev[3], float* dst, int pass_order, bool simd,
                      int num_threads);
// Whether this CPU runs the AVX2 horizontal pass (x86-64 with AVX2).
bool cpu_has_avx2();

// resize_tiles on CUDA (kernels/cuda/resize_tiles.cu): the same tiles as resize_tiles_cpu, dst dtype kFloat32
// or kBFloat16 (the float32 value rounded to nearest even). The caller provides two device buffers of the
// sizes resize_tiles_cuda_workspace gives (all three calls with the same sizes and pass_order): `coefficients`, holding a copy of what
// resize_tiles_cuda_coefficients wrote into host memory, and `intermediate` (the uint8 image between the
// passes). `src` is device memory laid out as resize_tiles_cpu's; enqueued on `stream`, asynchronous.
struct ResizeTilesWorkspace {
  std::int64_t coefficient_bytes, intermediate_bytes;
};
ResizeTilesWorkspace resize_tiles_cuda_workspace(std::int64_t h, std::int64_t w, std::int64_t cols,
                                                 std::int64_t rows, std::int64_t tile, bool thumbnail,
                                                 int pass_order);
void resize_tiles_cuda_coefficients(std::int64_t h, std::int64_t w, std::int64_t cols, std::int64_t rows,
                                    std::int64_t tile, bool thumbnail, int pass_order, void* host_dst,
                                    std::int64_t nbytes);
void resize_tiles_cuda(const std::uint8_t* src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                       int pixel_stride, void* dst, int dtype, std::int64_t cols, std::int64_t rows, std::int64_t tile,
                       bool thumbnail, int pass_order, const float mean[3], const float stdev[3],
                       const void* coefficients, std::int64_t coefficient_bytes, void* intermediate,
                       std::int64_t intermediate_bytes, std::uintptr_t stream);

}  // namespace pyvl
