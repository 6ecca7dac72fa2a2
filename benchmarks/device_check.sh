#!/usr/bin/env bash
# The one prepared GPU run: probe, environment, build, GPU tests, benchmarks, then a summary table
# printed last whatever failed before it. First, on the dev machine, the fallback extension:
#     bash benchmarks/build_gpu_wheel.sh
# then, from the repository root on the lent machine:
#     run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=510)
# 510 s leave room, inside the 15-minute lease, for the machine's start and a shorter rerun on the warm machine
# (DEVICE_CHECK_STEP_BUDGETS picks the steps). With less device time left, pass DEVICE_CHECK_BUDGET_S=<timeout_s -
# 30> so the summary still comes.
#
# A hard deadline: DEVICE_CHECK_BUDGET_S (default 480 s) for the whole run. Each step runs under `timeout` of
# min(its budget, time left - RESERVE_S); a step left under 3 s is "skipped". DEVICE_CHECK_STEP_BUDGETS="id=s ..."
# overrides budgets (e.g. "sweep=90 e2e_v15_hf=0"; under 3 s skips the step). No `set -e`: every step carries on.
# The exit status is 0 whenever the summary was printed (read the table), 143 when interrupted.
#
# Every benchmark prints its result as JSON lines while it measures (pyvl.bench.report), so a step killed at its
# limit keeps every row it printed: benchmarks/device_summary.py rebuilds each result ("complete": false and the
# step's status when it was cut short). Files in $OUT (default /tmp/pyvl_device_out), never more than these six:
#   device_check.log  everything       build.log   the pip/CMake/nvcc output
#   tests.xml         JUnit, the per-process reports merged
#   bench.json        {"kernels", "preprocess_cuda"}   sweep.json  block-config sweep
#   e2e.json          {"v15", "v15_awq", "mini", "v15_hf", "engine_v15", "load_v15", "tp_v15"}
#
# Steps in order, with the estimate on an H200 (16 cores) and the budget, seconds:
#   probe             GPU, Python.h, xdist, pytest-timeout: no torch    est   2  budget  10
#   env               environment report (imports torch); gates nothing est  10  budget  25
#   build             pyvl._C: CUDA from source, .whl/'s, CPU-only      est  60  budget  85
#   tests_kernels     Triton kernels at real shapes, -n 8               est  45  budget  60
#   bench_kernels     pyvl bench kernels --rep-ms 50 (regs/spills/smem) est  45  budget  55
#   e2e_v15           pyvl alone at V1-5 size, random weights           est  50  budget  75
#   e2e_v15_awq       the same, 4-bit decoder linears, 1 tile: decode   est  35  budget  50
#   engine_v15        engine reuse and batching at V1-5 size            est  60  budget  90
#   bench_preprocess  CUDA preprocessing vs F.interpolate, floor        est  10  budget  20
#   tests_preprocess  CUDA resize + normalise vs the CPU kernel         est  15  budget  30
#   tests_image       image, golden (fp32, TF32 off), backend, engine   est  20  budget  30
#   e2e_mini          pyvl alone at Mini-InternVL-2B size               est  20  budget  25
#   load_v15          load time, V1-5 shapes (16 GB), extrapolated     est  30  budget  45
#   tp_v15            TP=2 beside TP=1 at V1-5 size: TTFT, decode       est  70  budget 120  (only with >= 2 GPUs)
#   sweep             block configs, ViT + decode attention, last       est  45  budget  60
#   e2e_v15_hf        HF transformers at V1-5 size                      est  60  budget  90  (only with >= 100 s left)
#   (summary reserve 8)  estimates without HF: 447 s; budgets without HF: 660 s, so when steps overrun it is the
#   deadline that cuts the run short from its end (the sweep first), never the summary.
#
# The pyvl every step imports is a tree in the temporary folder (benchmarks/device_tree.py, on PYTHONPATH): the
# checkout's pyvl/ with kernels/ as pyvl/kernels, as the wheel maps them, plus the pyvl._C that the build step
# found: built from source with CUDA (sm_90a), else taken alone from a prebuilt wheel in .whl/ (its Python files
# may be stale, the checkout's are not), else built CPU-only. Without any _C the Triton kernels still run, and
# the summary says so loudly; it does as loudly when a GPU run's e2e/engine result says its ops resolved to the
# plain-torch "reference" rather than to the kernels.
#
# Dry run: with DEVICE_CHECK_DRY_RUN=1, or when nvidia-smi lists no GPU. No CUDA build (the CPU build's _C goes
# into the tree), pytest runs one fast CPU selection per process, the kernel benchmarks run with --smoke under
# TRITON_INTERPRET=1, the model benchmarks with --preset tiny --device cpu appended (argparse keeps the last
# value), each of these with a budget of its own (STAND_IN_BUDGET_S), and the two that need CUDA
# (bench_preprocess, e2e_v15_hf) are recorded as skipped when they say so. tp_v15 runs only where at least two
# GPUs are visible, and is recorded as skipped elsewhere (a dry run too: tests/test_parallel_cli.py runs its
# code on the tiny preset over gloo).
# tests/test_device_check.py runs it so in CI. DEVICE_CHECK_PYTHON picks the interpreter (default python3).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/pyvl_device_out}
budget=${DEVICE_CHECK_BUDGET_S:-480}
py=${DEVICE_CHECK_PYTHON:-python3}
RESERVE_S=8  # kill-after grace (5 s) + the summary
STAND_IN_BUDGET_S=120  # a dry run's CPU stand-in: the tiny preset or the interpreter on a CI box, not an H200
# How a GPU-only benchmark says it cannot run on this machine (a dry run records that as skipped, not FAILED).
NEEDS_GPU='needs (a )?CUDA|not compiled with CUDA|no CUDA GPUs|NVIDIA driver|CUDA only|transformers is not installed'
STEPS="probe env build tests_kernels bench_kernels e2e_v15 e2e_v15_awq engine_v15 bench_preprocess tests_preprocess"
STEPS="$STEPS tests_image e2e_mini load_v15 tp_v15 sweep e2e_v15_hf"
mkdir -p "$out"
work=$(mktemp -d)
tree=$work/src
log="$out/device_check.log"
: >"$log"
echo "the build step did not run (no time left)" >"$out/build.log"
: >"$work/steps.tsv"
mkdir "$work/junit"
deadline=$((SECONDS + budget))
current=""
child=""
began=0
json_step=0
may_need_gpu=0
dry=0 gpu=0 python_h=0 xdist=0 pytimeout=0
mode_note="GPU run"
build_in_use=""
# Every Python runs from $work with PYTHONSAFEPATH=1: neither `python -c` nor `python -m` may put the checkout
# (whose pyvl/ has neither kernels nor _C) ahead of the tree.
export PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1  # the image's python3 may be "externally managed"
cd "$work" || exit 1

say() { echo "$*" | tee -a "$log"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$work/steps.tsv"; }

finish() {
  trap - EXIT TERM INT
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
  if [ -n "$current" ]; then
    record "$current" timeout $((SECONDS - began)) "interrupted: the script was stopped"
    append_log "$current"
  fi
  WORK=$work OUT_DIR=$out STEPS=$STEPS DRY=$dry MODE=$mode_note BUILD=$build_in_use ELAPSED=$SECONDS \
    BUDGET=$budget timeout 10 "$py" -S "$repo/benchmarks/device_summary.py" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "summary helper failed; raw steps:"; cat "$work/steps.tsv"; } | tee -a "$log"
  rm -rf "$work"
}
append_log() {
  { echo "--- $1: stdout"; cat "$work/$1.out" 2>/dev/null; echo "--- $1: stderr"; cat "$work/$1.err" 2>/dev/null
  } >>"$log"
}

# budget_of ID DEFAULT: DEFAULT, or the override of ID in DEVICE_CHECK_STEP_BUDGETS ("id=seconds ...").
budget_of() {
  local pairs pair
  read -ra pairs <<<"${DEVICE_CHECK_STEP_BUDGETS:-}"
  for pair in "${pairs[@]}"; do
    if [ "${pair%%=*}" = "$1" ] && [[ ${pair#*=} =~ ^[0-9]+$ ]]; then echo "${pair#*=}"; return; fi
  done
  echo "$2"
}

# run_step ID BUDGET SIGNAL CMD...: CMD under `timeout` in the background, so that a TERM to this script is
# handled at once (bash defers traps while a foreground child runs). Output goes to $work/ID.out and .err.
run_step() {
  local id=$1 step_budget sig=$3 left t rc status note=""
  step_budget=$(budget_of "$id" "$2")
  shift 3
  left=$((deadline - SECONDS - RESERVE_S))
  t=$((step_budget < left ? step_budget : left))
  if [ "$t" -lt 3 ]; then
    note="no time left before the deadline"
    [ "$step_budget" -lt 3 ] && note="its budget is ${step_budget} s (DEVICE_CHECK_STEP_BUDGETS)"
    record "$id" skipped 0 "$note"
    say "=== $id: skipped, $note"
    return 1
  fi
  say "=== $id (limit ${t} s, $(date +%T))"
  current=$id
  began=$SECONDS
  STEP_LIMIT_S=$t timeout -s "$sig" -k 5 "$t" "$@" >"$work/$id.out" 2>"$work/$id.err" </dev/null &
  child=$!
  wait "$child"
  rc=$?
  child=""
  current=""
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout note="killed at its ${t} s limit" ;;
    *) status=FAILED note="exit status $rc" ;;
  esac
  if [ "$status" = FAILED ] && [ "$may_need_gpu" = 1 ] && grep -qiE "$NEEDS_GPU" "$work/$id.err"; then
    status=skipped note="needs CUDA or transformers (dry run)"
  fi
  record "$id" "$status" $((SECONDS - began)) "$note"
  append_log "$id"
  # The console gets the last lines only (the device tool returns the last 12,000 characters); the log has all.
  [ "$json_step" = 1 ] || tail -n 6 "$work/$id.out" | cut -c1-200 | sed 's/^/    /'
  tail -n 3 "$work/$id.err" | cut -c1-200 | sed 's/^/    ! /'
  say "    -> $status after $((SECONDS - began)) s${note:+ ($note)}"
  [ "$status" = ok ]
}

has_gpu() { timeout 8 nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }

# The flags that gate the builds and pytest's options, from a Python that never imports torch: cold, torch's
# import and CUDA's start can take longer than the step's budget.
probe() {
  local gpu=0
  has_gpu && gpu=1
  "$py" - "$gpu" <<'EOF'
import importlib.util, os, sys, sysconfig
include = sysconfig.get_paths()["include"]
flags = {"gpu": sys.argv[1] == "1", "pythonh": os.path.exists(os.path.join(include, "Python.h")),
         "xdist": importlib.util.find_spec("xdist") is not None,  # finds, does not import
         "pytimeout": importlib.util.find_spec("pytest_timeout") is not None}
print(f"python {sys.version.split()[0]} at {sys.executable}; Python.h looked for in {include}")
print(f"SUMMARY: python {sys.version.split()[0]}; " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in flags.items()))
print("FLAGS " + " ".join(f"{k}={int(v)}" for k, v in flags.items()))
EOF
}

# read_flags: gpu, python_h, xdist, pytimeout from the probe's FLAGS line; without one, nvidia-smi alone says gpu.
read_flags() {
  local flags pair
  flags=$(sed -n 's/^FLAGS //p' "$work/probe.out" 2>/dev/null)
  if [ -z "$flags" ] && has_gpu; then flags=gpu=1; fi
  for pair in $flags; do
    case $pair in gpu=1) gpu=1 ;; pythonh=1) python_h=1 ;; xdist=1) xdist=1 ;; pytimeout=1) pytimeout=1 ;; esac
  done
}

env_report() {
  echo "== host: $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB RAM"}')," \
    "$(df -h /tmp | awk 'NR==2 {print $4 " free on /tmp"}')"
  echo "== nvidia-smi"
  timeout 20 nvidia-smi --format=csv \
    --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,power.limit,temperature.gpu \
    2>&1 || echo "nvidia-smi: not working"
  echo "== nvcc"
  if command -v nvcc >/dev/null; then echo "on PATH: $(command -v nvcc)"; nvcc --version | tail -n 2
  else echo "not on PATH${cuda_bin_note}"; fi
  echo "== cmake: $(command -v cmake >/dev/null && cmake --version | head -n 1 || echo missing);" \
    "ninja: $(ninja --version 2>/dev/null || echo missing)"
  echo "== python"
  "$py" - <<'EOF'
import importlib.metadata as md, sys
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"
print(f"python {sys.version.split()[0]} at {sys.executable}")
for dist in ("triton", "numpy", "pillow", "safetensors", "sentencepiece", "scikit-build-core", "pybind11", "pytest",
             "pytest-xdist", "pytest-timeout", "transformers", "pip"):
    print(f"{dist}: {version(dist)}")
cuda, gpu = False, "none"
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, torch.cuda.is_available: {cuda}")
    if cuda:
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs)"
        print(f"device 0: {gpu}")
except Exception as exc:  # report and carry on: the summary says what is missing
    print(f"torch: {type(exc).__name__}: {exc}")
print(f"SUMMARY: {gpu}; torch {version('torch')} (CUDA available: {cuda}), triton {version('triton')}")
EOF
}

tree_tool() { "$py" "$repo/benchmarks/device_tree.py" "$@"; }

# tree_check WANT: what the steps will import from the tree: pyvl, its kernels, and a _C as WANT says (cuda, cpu,
# none). A dry run lets a developer's editable pyvl shadow the tree (its import hook runs before PYTHONPATH).
tree_check() {
  local allow=()
  [ "$dry" = 1 ] && allow=(--allow-shadowed)
  tree_tool check "$tree" --want "$1" "${allow[@]}"
}

# use_extension WANT SOURCE: SOURCE's _C (a built .so, or a wheel's) into the tree, kept only if it passes.
use_extension() {
  tree_tool extension "$tree" "$2" && tree_check "$1" && return 0
  rm -f "$tree"/pyvl/_C*.so
  return 1
}

# source_build NAME PYVL_CUDA SECONDS: pip builds the checkout into its own --target, $work/built-NAME.
source_build() {
  echo "== $1 build (PYVL_CUDA=$2, limit $3 s)" >>"$out/build.log"
  PYVL_CUDA=$2 PYVL_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout "$3" "$py" -m pip install -v \
    --no-index --no-deps --no-build-isolation --target "$work/built-$1" \
    --config-settings=build-dir="$work/build-$1" "$repo" >>"$out/build.log" 2>&1
}

# The build step: a pyvl._C for the tree, first success wins: CUDA from source, the prebuilt wheel's, CPU-only
# from source. --no-index throughout: the device machine has no network.
build_pyvl() {
  local tag wheel want=cuda
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  [ "$dry" = 1 ] && want=cpu
  : >"$out/build.log"
  if [ "$dry" = 1 ]; then echo "cuda build: skipped (dry run)"
  elif ! command -v nvcc >/dev/null; then echo "cuda build: skipped (no nvcc on PATH nor in /usr/local/cuda/bin)"
  elif [ "$python_h" != 1 ]; then echo "cuda build: skipped (no Python.h for $py)"
  # The CUDA build leaves the fallbacks 30 s.
  elif source_build cuda ON $((STEP_LIMIT_S - 30)) && use_extension cuda "$work"/built-cuda/pyvl/_C*.so; then
    echo "SUMMARY: CUDA build from source (sm_90a)"; return 0
  else echo "cuda build: FAILED, see build.log"; fi
  wheel=$(ls "$repo"/.whl/pyvl-*-"$tag"-*.whl 2>/dev/null | tail -n 1)
  if [ -z "$wheel" ]; then echo "prebuilt wheel: none for $tag in .whl/"
  elif use_extension "$want" "$wheel"; then
    echo "SUMMARY: the checkout's Python with the _C of $(basename "$wheel")"; return 0
  else echo "prebuilt wheel: FAILED"; fi
  if [ "$python_h" != 1 ]; then echo "cpu build: skipped (no Python.h for $py)"
  elif source_build cpu OFF "$STEP_LIMIT_S" && use_extension cpu "$work"/built-cpu/pyvl/_C*.so; then
    echo "SUMMARY: CPU-only build (PYVL_CUDA=OFF)"
    [ "$dry" = 1 ] || echo "ALERT: pyvl._C was built without CUDA: CUDA preprocessing is untested"
    return 0
  else echo "cpu build: FAILED, see build.log"; fi
  tree_check none  # the Triton kernels import without _C
  echo "SUMMARY: no build: the checkout's Python without pyvl._C"
  return 1
}

# pytest_step ID FILES K_DRY WORKERS PER_TEST_S BUDGET: one pytest process with its own JUnit report; on the
# GPU with WORKERS processes where pytest-xdist is there (-k K_DRY in a dry run). SIGINT at the limit, so pytest
# still writes the report of what ran.
pytest_step() {
  local id=$1 files=$2 k_dry=$3 workers=$4 per_test_s=$5 args=()
  [ "$xdist" = 1 ] && [ "$dry" = 0 ] && args+=(-n "$workers")
  [ "$pytimeout" = 1 ] && args+=("--timeout=$per_test_s")
  [ "$dry" = 1 ] && args+=(-k "$k_dry")
  local paths=()
  for f in $files; do paths+=("$repo/tests/$f"); done
  run_step "$id" "$6" INT "$py" -m pytest -q -p no:cacheprovider -rfEs --rootdir "$repo" \
    --junitxml "$work/junit/$id.xml" "${args[@]}" "${paths[@]}"
}

# bench_step ID BUDGET STAND_IN ARGS...: `python ARGS`, whose stdout is JSON lines (pyvl.bench.report). A dry run
# runs the CPU stand-in, with STAND_IN_BUDGET_S: "tiny" appends --preset tiny --device cpu (and "tiny-e2e" one
# repeat, "tiny-engine" also a small photo: the CPU's minutes are CI's), "smoke" appends --smoke under the Triton
# interpreter; "-" runs the GPU command itself, recorded as skipped when it says it needs CUDA.
bench_step() {
  local id=$1 step_budget=$2 stand_in=$3 json_step=1 may_need_gpu=0 cmd  # json_step, may_need_gpu: run_step's
  shift 3
  cmd=("$py" "$@")
  if [ "$dry" = 1 ]; then
    case $stand_in in
      tiny) cmd+=(--preset tiny --device cpu) step_budget=$STAND_IN_BUDGET_S ;;
      tiny-e2e) cmd+=(--preset tiny --device cpu --repeat 1) step_budget=$STAND_IN_BUDGET_S ;;
      tiny-awq-e2e) cmd+=(--preset tiny-awq --device cpu --repeat 1) step_budget=$STAND_IN_BUDGET_S ;;
      tiny-engine) cmd+=(--preset tiny --device cpu --repeat 1 --photo 896x448) step_budget=$STAND_IN_BUDGET_S ;;
      smoke) cmd=(env TRITON_INTERPRET=1 "${cmd[@]}" --smoke) step_budget=$STAND_IN_BUDGET_S ;;
      *) may_need_gpu=1 ;;
    esac
  fi
  run_step "$id" "$step_budget" TERM "${cmd[@]}"
}

trap finish EXIT
trap 'exit 143' TERM INT

# nvcc is often installed but not on PATH.
cuda_bin_note=""
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
  cuda_bin_note=" (found /usr/local/cuda/bin/nvcc: added to PATH)"
fi
say "device check: budget ${budget} s, OUT=$out, python $py, repo $repo"
export repo work out py tree cuda_bin_note
export -f has_gpu probe env_report
run_step probe 10 TERM bash -c probe
read_flags
dry=$((1 - gpu))
if [ "${DEVICE_CHECK_DRY_RUN:-0}" = 1 ]; then dry=1 mode_note="dry run (DEVICE_CHECK_DRY_RUN=1)"
elif [ "$dry" = 1 ]; then mode_note="dry run (nvidia-smi lists no GPU)"
else unset TRITON_INTERPRET; fi  # the kernels must run compiled on the GPU
say "mode: $mode_note"
run_step env 25 TERM bash -c env_report

export dry python_h
export -f tree_tool tree_check use_extension source_build build_pyvl
timeout 20 "$py" "$repo/benchmarks/device_tree.py" assemble "$repo" "$tree" 2>&1 | tee -a "$log"
# pyvl's dependencies the GPU image lacks (blake3) travel as wheels in .whl/ (build_gpu_wheel.sh fetches them)
timeout 20 "$py" -S "$repo/benchmarks/device_tree.py" dependencies "$tree" "$repo/.whl" 2>&1 | tee -a "$log"
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
run_step build 85 TERM bash -c build_pyvl
build_in_use=$(sed -n 's/^SUMMARY: //p' "$work/build.out" 2>/dev/null | tail -n 1)

kernel_tests="test_vit_attention.py test_rms_norm.py test_apply_rotary.py test_silu_mul.py"
kernel_tests="$kernel_tests test_pixel_shuffle.py test_paged_attention.py test_store_kv.py test_w4a16.py"
e2e_flags=(--random-weights --no-hf --device cuda --kv-cache-gb 2 --jsonl)
pytest_step tests_kernels "$kernel_tests" test_rejects_bad_inputs 8 60 60
bench_step bench_kernels 55 smoke -m pyvl bench kernels --rep-ms 50 --jsonl
bench_step e2e_v15 75 tiny-e2e -m pyvl bench e2e --preset internvl-chat-v1-5 "${e2e_flags[@]}"
bench_step e2e_v15_awq 50 tiny-awq-e2e -m pyvl bench e2e --preset internvl-chat-v1-5-awq --tiles 1 "${e2e_flags[@]}"
bench_step engine_v15 90 tiny-engine -m pyvl bench engine --preset internvl-chat-v1-5 --random-weights --device cuda \
  --repeat 2 --jsonl
bench_step bench_preprocess 20 - -m pyvl bench preprocess --device cuda --rep-ms 50 --jsonl
pytest_step tests_preprocess "test_native_cuda_resize.py test_native.py test_resize_tiles.py" test_bad_grids 8 60 30
pytest_step tests_image "test_image.py test_golden.py test_backend_triton.py test_engine.py test_engine_runner.py" \
  test_grid_table 4 60 30
bench_step e2e_mini 25 tiny-e2e -m pyvl bench e2e --preset mini-internvl-chat-2b-v1-5 "${e2e_flags[@]}"
bench_step load_v15 45 tiny "$repo/benchmarks/bench_load.py" --preset internvl-chat-v1-5 --device cuda --max-gb 16 \
  --jsonl
gpus=$(timeout 8 nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ "$dry" = 0 ] && [ "$gpus" -ge 2 ]; then
  bench_step tp_v15 120 - -m pyvl bench tp --preset internvl-chat-v1-5 --random-weights --tensor-parallel-size 2 \
    --device cuda --jsonl
else
  record tp_v15 skipped 0 "needs 2 GPUs, $gpus visible"
fi
bench_step sweep 60 smoke -m pyvl bench sweep --rep-ms 50 --jsonl
if [ $((deadline - SECONDS - RESERVE_S)) -ge 100 ]; then
  bench_step e2e_v15_hf 90 - -m pyvl bench e2e --preset internvl-chat-v1-5 --random-weights --hf-only --device cuda \
    --jsonl
else
  record e2e_v15_hf skipped 0 "only $((deadline - SECONDS - RESERVE_S)) s left (needs 100)"
fi
exit 0
