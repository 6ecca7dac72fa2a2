#!/usr/bin/env bash
# Build the fallback wheel whose compiled pyvl._C benchmarks/device_check.sh takes (alone: the Python files come
# from the checkout) when the GPU image cannot compile pyvl itself (no nvcc, no Python.h, a broken toolchain):
# CPython 3.12 (the GPU image's Python), CUDA kernels for sm_90a (H100/H200) only. Run it from the repository
# root on this dev machine:
#     bash benchmarks/build_gpu_wheel.sh            # a few minutes on 2 cores; PYTHON=... to pick another 3.12
# The wheel lands in .whl/ (git-ignored) and travels to the device machine with the device tool:
#     run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=510)
# It prints the highest GLIBC / GLIBCXX symbol versions the compiled _C needs: it loads on the GPU image (Ubuntu
# 24.04: glibc 2.39, GCC 14's libstdc++) when those are no newer. Built here 2026-12-01: GLIBC_2.34, GLIBCXX_3.4.29.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "build_gpu_wheel: $python is not CPython 3.12 (set PYTHON=...)" >&2; exit 1; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] \
  || { echo "build_gpu_wheel: no nvcc on PATH nor in /usr/local/cuda/bin" >&2; exit 1; }
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12"

mkdir -p .whl
rm -f .whl/pyvl-*-cp312-*.whl
# A build dir outside the checkout: a stale build/ from another Python or CUDA setting must not leak in.
PYVL_CUDA=ON PYVL_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$work/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation \
  --config-settings=build-dir="$work/build" -w .whl .
wheel=$(ls .whl/pyvl-*-cp312-*.whl)
# pyvl's dependencies the GPU image does not have, as cp312 wheels (device_check.sh unpacks them into its tree)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl blake3

# What the compiled extension needs of the target's C and C++ runtimes (the highest symbol versions it uses).
mkdir "$work/unpacked"
"$python" -m zipfile -e "$wheel" "$work/unpacked"
so=$(ls "$work"/unpacked/pyvl/_C*.so)
highest() { objdump -T "$so" | grep -o "$1_[0-9.]*" | sort -u -V | tail -1; }
echo "wheel: $wheel ($(du -k "$wheel" | cut -f1) kB)"
echo "$(basename "$so") needs at most $(highest GLIBC) and $(highest GLIBCXX)" \
  "(GPU image, Ubuntu 24.04: glibc 2.39, libstdc++ GLIBCXX_3.4.33)"
grep -q sm_90a "$so" && echo "it carries sm_90a device code" || echo "no sm_90a device code in it" >&2
