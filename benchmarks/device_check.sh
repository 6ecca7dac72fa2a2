#!/usr/bin/env bash
# The one prepared GPU run (DEVELOPERS.md, "Machines"): build pyvl with CUDA, run the GPU tests, run the
# benchmarks, print a short table. Run it from the repository root on the lent machine:
#     device run: bash benchmarks/device_check.sh        (timeout_s ~ 420, leaving room for one rerun)
# Everything it prints also lands in $OUT (the device tool brings that folder back). Expect about 8 minutes on an
# H100/H200 (the V1-5-size e2e run, pyvl then HF, is the longest step); SKIP_E2E=1 drops the e2e runs.
set -uo pipefail
repo=$(pwd)
out=${OUT:-/tmp/pyvl_device_out}
mkdir -p "$out"
step() { echo; echo "=== $1 ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"

step "build (PYVL_CUDA=ON, no network: --no-build-isolation)"
PYVL_CUDA=ON timeout 300 python3 -m pip install --no-build-isolation --no-deps -q . >"$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
python3 -c "import pyvl._C as c; assert c.has_cuda(), 'built without CUDA'; print('pyvl._C has CUDA')"

# Tests import the installed package (PYTHONSAFEPATH keeps the checkout's pyvl/ off sys.path).
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
step "GPU tests (kernels against their references at real shapes, preprocessing against the CPU kernel)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_native.py tests/test_native_cuda_resize.py tests/test_pixel_shuffle.py tests/test_image.py \
  tests/test_vit_attention.py tests/test_causal_attention.py tests/test_rms_norm.py \
  tests/test_apply_rotary.py tests/test_silu_mul.py tests/test_backend_triton.py 2>&1 | tee "$out/gpu_tests.log" | tail -25

step "benchmarks"
timeout 150 python3 -m pyvl bench kernels 2>&1 | tee "$out/bench_kernels.txt"
timeout 60 python3 benchmarks/bench_pixel_shuffle.py 2>&1 | tee "$out/bench_pixel_shuffle.txt"
[ "${SKIP_E2E:-0}" = 1 ] || timeout 240 python3 -m pyvl bench e2e --preset internvl-chat-v1-5 --random-weights 2>&1 | tee "$out/bench_e2e_v15.txt"
[ "${SKIP_E2E:-0}" = 1 ] || timeout 90 python3 -m pyvl bench e2e --preset mini-internvl-chat-2b-v1-5 --random-weights --no-hf 2>&1 \
  | tee "$out/bench_e2e_mini.txt"
timeout 120 python3 -m pyvl bench preprocess --repeat 3 2>&1 | tee "$out/bench_preprocess_cpu.txt"

step "summary (copy into benchmarks/RESULTS.md with the card and date)"
grep -h -E "passed|failed" "$out/gpu_tests.log" | tail -1
cat "$out"/bench_*.txt 2>/dev/null | grep -v "^$" | head -60
