// pyvl._C: the one list of native functions.
//
// The module links no libtorch. Every function takes raw data pointers (integers, from
// tensor.data_ptr() or ndarray.ctypes.data), sizes, an output dtype code where there is a choice, and for
// CUDA ops the stream handle (torch.cuda.current_stream().cuda_stream). The checked Python wrappers are
// in pyvl/ops/native.py; the checks here only guard against crashing on nonsense.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "common.h"
#include "resample_coeffs.h"

namespace py = pybind11;
using Channels = std::array<float, 3>;

namespace {

[[noreturn, maybe_unused]] void no_cuda() {
  throw std::runtime_error("pyvl._C was built without CUDA (no CUDA compiler at build time); "
                           "reinstall pyvl with nvcc on PATH, or with PYVL_CUDA=ON to make that an error");
}

// A source of h rows, `row_stride` bytes apart, of w pixels `pixel_stride` bytes apart (R, G, B first).
void check_image(std::uintptr_t src, std::int64_t h, std::int64_t w, std::int64_t row_stride, int pixel_stride,
                 const char* op) {
  pyvl::check_pointer(src, op);
  pyvl::check_positive(h, "source height");
  pyvl::check_positive(w, "source width");
  pyvl::check(pixel_stride == 3 || pixel_stride == 4, op, ": pixel_stride must be 3 (RGB) or 4 (RGBX), got ",
              pixel_stride);
  pyvl::check(row_stride >= pixel_stride * w, op, ": row_stride ", row_stride, " is smaller than ", pixel_stride,
              " * width ", pixel_stride * w);
}

void resize_bicubic_cpu(std::uintptr_t src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                        std::uintptr_t dst, std::int64_t out_h, std::int64_t out_w, int num_threads,
                        int pass_order, bool simd, int pixel_stride) {
  check_image(src, h, w, row_stride, pixel_stride, "resize_bicubic_cpu: src");
  pyvl::check_pointer(dst, "resize_bicubic_cpu: dst");
  pyvl::check_positive(out_h, "resize_bicubic_cpu: out_h");
  pyvl::check_positive(out_w, "resize_bicubic_cpu: out_w");
  pyvl::resize_bicubic_cpu(reinterpret_cast<const std::uint8_t*>(src), h, w, row_stride, pixel_stride, out_h, out_w,
                           reinterpret_cast<std::uint8_t*>(dst), pass_order, simd, num_threads);
}

void resize_tiles_cpu(std::uintptr_t src, std::int64_t h, std::int64_t w, std::int64_t row_stride, std::uintptr_t dst,
                      std::int64_t cols, std::int64_t rows, std::int64_t tile, bool thumbnail, const Channels& mean,
                      const Channels& stdev, int num_threads, int pass_order, bool simd, int pixel_stride) {
  check_image(src, h, w, row_stride, pixel_stride, "resize_tiles_cpu: src");
  pyvl::check_pointer(dst, "resize_tiles_cpu: dst");
  pyvl::check_positive(cols, "resize_tiles_cpu: cols");
  pyvl::check_positive(rows, "resize_tiles_cpu: rows");
  pyvl::check_positive(tile, "resize_tiles_cpu: tile");
  pyvl::resize_tiles_cpu(reinterpret_cast<const std::uint8_t*>(src), h, w, row_stride, pixel_stride, cols, rows, tile,
                         thumbnail, mean.data(), stdev.data(), reinterpret_cast<float*>(dst), pass_order, simd,
                         num_threads);
}

void check_grid(std::int64_t cols, std::int64_t rows, std::int64_t tile, const char* op) {
  pyvl::check(cols > 0 && rows > 0 && tile > 0, op, ": cols, rows and tile must be > 0, got ", cols, ", ", rows,
              ", ", tile);
}

std::pair<std::int64_t, std::int64_t> resize_tiles_cuda_workspace(std::int64_t h, std::int64_t w, std::int64_t cols,
                                                                  std::int64_t rows, std::int64_t tile,
                                                                  bool thumbnail, int pass_order) {
#ifdef PYVL_WITH_CUDA
  check_grid(cols, rows, tile, "resize_tiles_cuda_workspace");
  const auto sizes = pyvl::resize_tiles_cuda_workspace(h, w, cols, rows, tile, thumbnail, pass_order);
  return {sizes.coefficient_bytes, sizes.intermediate_bytes};
#else
  no_cuda();
#endif
}

void resize_tiles_cuda_coefficients(std::int64_t h, std::int64_t w, std::int64_t cols, std::int64_t rows,
                                    std::int64_t tile, bool thumbnail, std::uintptr_t dst, std::int64_t nbytes,
                                    int pass_order) {
#ifdef PYVL_WITH_CUDA
  pyvl::check_pointer(dst, "resize_tiles_cuda_coefficients: dst");
  check_grid(cols, rows, tile, "resize_tiles_cuda_coefficients");
  pyvl::resize_tiles_cuda_coefficients(h, w, cols, rows, tile, thumbnail, pass_order, reinterpret_cast<void*>(dst),
                                       nbytes);
#else
  no_cuda();
#endif
}

void resize_tiles_cuda(std::uintptr_t src, std::int64_t h, std::int64_t w, std::int64_t row_stride,
                       std::uintptr_t dst, int dtype, std::int64_t cols, std::int64_t rows, std::int64_t tile,
                       bool thumbnail, const Channels& mean, const Channels& stdev, std::uintptr_t coefficients,
                       std::int64_t coefficient_bytes, std::uintptr_t intermediate, std::int64_t intermediate_bytes,
                       std::uintptr_t stream, int pass_order, int pixel_stride) {
#ifdef PYVL_WITH_CUDA
  check_image(src, h, w, row_stride, pixel_stride, "resize_tiles_cuda: src");
  pyvl::check_pointer(dst, "resize_tiles_cuda: dst");
  pyvl::check_pointer(coefficients, "resize_tiles_cuda: coefficients");
  pyvl::check_pointer(intermediate, "resize_tiles_cuda: intermediate");
  check_grid(cols, rows, tile, "resize_tiles_cuda");
  pyvl::resize_tiles_cuda(reinterpret_cast<const std::uint8_t*>(src), h, w, row_stride, pixel_stride,
                          reinterpret_cast<void*>(dst), dtype, cols, rows, tile, thumbnail, pass_order, mean.data(),
                          stdev.data(), reinterpret_cast<const void*>(coefficients), coefficient_bytes,
                          reinterpret_cast<void*>(intermediate), intermediate_bytes, stream);
#else
  no_cuda();
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyvl native ops (raw pointers, no libtorch); use the checked wrappers in pyvl.ops.native";
  // Every other C++ exception is translated by pybind11 (std::bad_alloc -> MemoryError, std::invalid_argument ->
  // ValueError, any other std::exception -> RuntimeError, anything else -> RuntimeError "unknown exception").
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pyvl::AllocationTooLarge& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });
  m.attr("FLOAT32") = static_cast<int>(pyvl::kFloat32);
  m.attr("BFLOAT16") = static_cast<int>(pyvl::kBFloat16);
  // pass_order values: which Pillow's order of the two resize passes to reproduce (resample::PassOrder).
  m.attr("PASS_ORDER_PILLOW_12_1") = static_cast<int>(pyvl::resample::kHorizontalFirst);  // Pillow <= 12.1
  m.attr("PASS_ORDER_PILLOW_12_2") = static_cast<int>(pyvl::resample::kTallVerticalFirst);  // 12.2, 12.3
  m.attr("PASS_ORDER_PILLOW_13") = static_cast<int>(pyvl::resample::kShrinkVerticalFirst);  // 13.x

  m.def("has_cuda", [] {
#ifdef PYVL_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this module.");
  m.def("cpu_has_avx2", &pyvl::cpu_has_avx2, "True when the CPU kernels run their AVX2 code (simd=True).");

  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("resize_bicubic_cpu", &resize_bicubic_cpu, release_gil, py::arg("src"), py::arg("h"), py::arg("w"),
        py::arg("row_stride"), py::arg("dst"), py::arg("out_h"), py::arg("out_w"), py::arg("num_threads") = 0,
        py::kw_only(), py::arg("pass_order"), py::arg("simd") = true, py::arg("pixel_stride") = 3,
        "RGB uint8 [h,w,3] -> uint8 [out_h,out_w,3], bit-identical to PIL resize(BICUBIC) of the Pillow whose "
        "pass_order (PASS_ORDER_PILLOW_12_1, _12_2 or _13) is given; simd=False forces the portable code; "
        "source pixels pixel_stride = 3 (RGB) or 4 (RGBX, the 4th byte ignored) bytes apart.");
  m.def("resize_tiles_cpu", &resize_tiles_cpu, release_gil, py::arg("src"), py::arg("h"), py::arg("w"),
        py::arg("row_stride"), py::arg("dst"), py::arg("cols"), py::arg("rows"), py::arg("tile"),
        py::arg("thumbnail"), py::arg("mean"), py::arg("std"), py::arg("num_threads") = 0, py::kw_only(),
        py::arg("pass_order"), py::arg("simd") = true, py::arg("pixel_stride") = 3,
        "RGB uint8 image -> float32 [cols*rows(+1),3,tile,tile]: Pillow-exact bicubic grid + thumbnail, normalised "
        "(pass_order, simd and pixel_stride as in resize_bicubic_cpu).");
  m.def("resize_tiles_cuda_workspace", &resize_tiles_cuda_workspace, py::arg("h"), py::arg("w"), py::arg("cols"),
        py::arg("rows"), py::arg("tile"), py::arg("thumbnail"), py::kw_only(),
        py::arg("pass_order"),
        "(coefficient_bytes, intermediate_bytes): the two device buffers resize_tiles_cuda needs.");
  m.def("resize_tiles_cuda_coefficients", &resize_tiles_cuda_coefficients, release_gil, py::arg("h"), py::arg("w"),
        py::arg("cols"), py::arg("rows"), py::arg("tile"), py::arg("thumbnail"), py::arg("dst"), py::arg("nbytes"),
        py::kw_only(), py::arg("pass_order"),
        "Write resize_tiles_cuda's bicubic weights (Pillow's fixed point) into host memory at dst.");
  m.def("resize_tiles_cuda", &resize_tiles_cuda, release_gil, py::arg("src"), py::arg("h"), py::arg("w"),
        py::arg("row_stride"), py::arg("dst"), py::arg("dtype"), py::arg("cols"), py::arg("rows"), py::arg("tile"),
        py::arg("thumbnail"), py::arg("mean"), py::arg("std"), py::arg("coefficients"),
        py::arg("coefficient_bytes"), py::arg("intermediate"), py::arg("intermediate_bytes"), py::arg("stream"),
        py::kw_only(), py::arg("pass_order"), py::arg("pixel_stride") = 3,
        "CUDA resize_tiles on device pointers (dst FLOAT32 or BFLOAT16 [N,3,tile,tile]), enqueued on `stream`; "
        "`coefficients` holds a device copy of what resize_tiles_cuda_coefficients wrote; source pixels "
        "pixel_stride = 3 or 4 bytes apart as in resize_bicubic_cpu.");
}
