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

namespace py = pybind11;
using Channels = std::array<float, 3>;

namespace {

void check_tile_sizes(std::int64_t n, std::int64_t h, std::int64_t w) {
  pyvl::check_positive(n, "normalize_tiles: n (number of tiles)");
  pyvl::check_positive(h, "normalize_tiles: h (tile height)");
  pyvl::check_positive(w, "normalize_tiles: w (tile width)");
}

void normalize_tiles_cpu(std::uintptr_t src, std::uintptr_t dst, std::int64_t n, std::int64_t h, std::int64_t w,
                         const Channels& mean, const Channels& stdev, int num_threads) {
  pyvl::check_pointer(src, "normalize_tiles_cpu: src");
  pyvl::check_pointer(dst, "normalize_tiles_cpu: dst");
  check_tile_sizes(n, h, w);
  pyvl::normalize_tiles_cpu(reinterpret_cast<const std::uint8_t*>(src), reinterpret_cast<float*>(dst), n, h, w,
                            mean.data(), stdev.data(), num_threads);
}

void normalize_tiles_cuda(std::uintptr_t src, std::uintptr_t dst, int dtype, std::int64_t n, std::int64_t h,
                          std::int64_t w, const Channels& mean, const Channels& stdev, std::uintptr_t stream) {
#ifdef PYVL_WITH_CUDA
  pyvl::check_pointer(src, "normalize_tiles_cuda: src");
  pyvl::check_pointer(dst, "normalize_tiles_cuda: dst");
  check_tile_sizes(n, h, w);
  pyvl::normalize_tiles_cuda(reinterpret_cast<const std::uint8_t*>(src), reinterpret_cast<void*>(dst), dtype, n,
                             h, w, mean.data(), stdev.data(), stream);
#else
  throw std::runtime_error("pyvl._C was built without CUDA (no CUDA compiler at build time); "
                           "reinstall pyvl with nvcc on PATH, or with PYVL_CUDA=ON to make that an error");
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyvl native ops (raw pointers, no libtorch); use the checked wrappers in pyvl.ops.native";
  m.attr("FLOAT32") = static_cast<int>(pyvl::kFloat32);
  m.attr("BFLOAT16") = static_cast<int>(pyvl::kBFloat16);

  m.def("has_cuda", [] {
#ifdef PYVL_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this module.");

  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("normalize_tiles_cpu", &normalize_tiles_cpu, release_gil, py::arg("src"), py::arg("dst"), py::arg("n"),
        py::arg("h"), py::arg("w"), py::arg("mean"), py::arg("std"), py::arg("num_threads") = 0,
        "uint8 [n,h,w,3] at src -> float32 [n,3,h,w] at dst, (u/255 - mean[c]) / std[c]; 0 threads = auto.");
  m.def("normalize_tiles_cuda", &normalize_tiles_cuda, release_gil, py::arg("src"), py::arg("dst"),
        py::arg("dtype"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("mean"), py::arg("std"),
        py::arg("stream"),
        "CUDA normalize_tiles on device pointers, dst dtype FLOAT32 or BFLOAT16, enqueued on `stream`.");
}
