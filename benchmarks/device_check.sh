#!/usr/bin/env bash
# The one prepared GPU run (issue 7): environment, build, GPU tests, benchmarks, then a summary table printed
# last whatever failed before it. Run it from the repository root on the lent machine, with the fallback wheel:
#     run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=450)
# With less device time left than that, pass DEVICE_CHECK_BUDGET_S=<timeout_s - 30> so the summary still comes.
# (.whl/ comes from `bash benchmarks/build_gpu_wheel.sh` on the dev machine: CPython 3.12, CUDA for sm_90a. It holds
# pyvl's Python files too: rebuild it from the tree that runs; the summary flags a stale one.)
#
# A hard deadline: DEVICE_CHECK_BUDGET_S (default 420 s) for the whole run. Each step runs under `timeout` of
# min(its budget, time left - RESERVE_S); a step with no time left is "skipped". No `set -e`: every step carries
# on. The exit status is 0 whenever the summary was printed (read the table), 143 when interrupted.
#
# Files in $OUT (default /tmp/pyvl_device_out), never more than these six:
#   device_check.log  everything       build.log   the pip/CMake/nvcc output
#   tests.xml         JUnit, the per-process reports merged
#   bench.json        {"kernels", "preprocess_cuda"}   sweep.json  block-config sweep
#   e2e.json          {"v15", "mini", "v15_hf"}; a failed command's entry is {"error": "<last lines>"}
#
# Steps in order of value, with the estimate on an H200 (16 cores) and the budget, seconds:
#   env               environment report                            est   8  budget  20
#   build             PYVL_CUDA=ON, sm_90a; else .whl/, else OFF    est  60  budget  85
#   tests_kernels     Triton kernels at real shapes, -n 8           est  40  budget  60
#   bench_kernels     pyvl bench kernels (regs/spills/smem)         est  30  budget  45
#   e2e_v15           pyvl alone at V1-5 size, random weights       est  45  budget  75
#   tests_preprocess  CUDA resize + normalise vs the CPU kernel     est  15  budget  30
#   bench_preprocess  CUDA preprocessing vs F.interpolate, floor    est  10  budget  20
#   e2e_mini          pyvl alone at Mini-InternVL-2B size           est  20  budget  25
#   tests_image       image, golden (fp32, TF32 off), backend       est  20  budget  30
#   sweep             block configs, ViT + decode attention         est  20  budget  20
#   e2e_v15_hf        HF transformers at V1-5 size                  est  60  budget  90  (only with >= 100 s left)
#   (summary reserve 8)  estimates without HF: 268 s; budgets without HF: 410 s + 8 reserve.
#
# Dry run: with DEVICE_CHECK_DRY_RUN=1, or when there is no working nvidia-smi / torch.cuda, the CUDA build is
# skipped (the fallback chain still runs: wheel if one fits this Python, then PYVL_CUDA=OFF into a temporary
# --target, so the installed pyvl is untouched), pytest runs one fast CPU selection per process, the bench
# commands run and are recorded as skipped when they answer that they need CUDA. tests/test_device_check.py
# runs it so in CI. DEVICE_CHECK_PYTHON picks the interpreter (default python3).
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/pyvl_device_out}
budget=${DEVICE_CHECK_BUDGET_S:-420}
py=${DEVICE_CHECK_PYTHON:-python3}
RESERVE_S=8  # kill-after grace (5 s) + the summary
# How a bench command says it cannot run on this machine (a dry run records that as skipped, not FAILED).
NEEDS_GPU='needs (a )?CUDA|not compiled with CUDA|no CUDA GPUs|NVIDIA driver|CUDA only|transformers is not installed'
STEPS="env build tests_kernels bench_kernels e2e_v15 tests_preprocess bench_preprocess e2e_mini tests_image sweep"
STEPS="$STEPS e2e_v15_hf"
mkdir -p "$out"
work=$(mktemp -d)
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
# Every Python runs from $work with PYTHONSAFEPATH=1: neither `python -c` nor `python -m` may put the checkout
# (whose pyvl/ has no compiled _C) ahead of the installed package.
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
  WORK=$work OUT_DIR=$out STEPS=$STEPS MODE=$mode_note BUILD=$build_in_use ELAPSED=$SECONDS BUDGET=$budget \
    "$py" -S -c "$SUMMARY_PY" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "summary helper failed; raw steps:"; cat "$work/steps.tsv"; } | tee -a "$log"
  rm -rf "$work"
}
append_log() {
  { echo "--- $1: stdout"; cat "$work/$1.out" 2>/dev/null; echo "--- $1: stderr"; cat "$work/$1.err" 2>/dev/null
  } >>"$log"
}

# run_step ID BUDGET SIGNAL CMD...: CMD under `timeout` in the background, so that a TERM to this script is
# handled at once (bash defers traps while a foreground child runs). Output goes to $work/ID.out and .err.
run_step() {
  local id=$1 step_budget=$2 sig=$3 left t rc status note=""
  shift 3
  left=$((deadline - SECONDS - RESERVE_S))
  t=$((step_budget < left ? step_budget : left))
  if [ "$t" -lt 3 ]; then
    record "$id" skipped 0 "no time left before the deadline"
    say "=== $id: skipped, no time left"
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
  if [ "$status" = FAILED ] && [ "$dry" = 1 ] && [ "${id%%_*}" != tests ] \
    && grep -qiE "$NEEDS_GPU" "$work/$id.err" "$work/$id.out"; then
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
import importlib.metadata as md, importlib.util, os, sys, sysconfig
include = sysconfig.get_paths()["include"]
python_h = os.path.exists(os.path.join(include, "Python.h"))
print(f"python {sys.version.split()[0]} at {sys.executable}; Python.h in {include}: {'yes' if python_h else 'NO'}")
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"
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
print(f"SUMMARY: {gpu}; torch {version('torch')}, triton {version('triton')}, Python.h {'yes' if python_h else 'NO'}")
flag = lambda ok: int(bool(ok))  # noqa: E731
print(f"FLAGS cuda={flag(cuda)} xdist={flag(importlib.util.find_spec('xdist'))} "
      f"pytimeout={flag(importlib.util.find_spec('pytest_timeout'))} pythonh={flag(python_h)}")
EOF
}

# The build chain, first success wins: CUDA from source, the prebuilt wheel, CPU-only from source. A dry run
# installs into a temporary --target (the installed pyvl stays) and loads that _C by path to check it.
build_pyvl() {
  local tag wheel target=() attempt_s
  tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  [ "$dry" = 1 ] && target=(--target "$work/site")
  pip_install() {  # pip_install SECONDS ARGS...: --no-index, as the device machine has no network
    timeout "$1" "$py" -m pip install -v --no-index --no-deps --no-build-isolation "${target[@]}" "${@:2}" \
      >>"$out/build.log" 2>&1
  }
  check() {  # check WANT_CUDA: the _C that later steps will import has (or need not have) CUDA
    if [ "$dry" = 1 ]; then
      SITE=$work/site WANT=$1 "$py" -c 'import glob, importlib.util as u, os
spec = u.spec_from_file_location("pyvl._C", glob.glob(os.environ["SITE"] + "/pyvl/_C*.so")[0])
m = u.module_from_spec(spec); spec.loader.exec_module(m); print("built _C loads; has_cuda:", m.has_cuda())
assert m.has_cuda() or not int(os.environ["WANT"])'
    else
      REPO=$repo WANT=$1 "$py" -c 'import os, pyvl, pyvl._C as c
print("pyvl from", pyvl.__file__, "; has_cuda:", c.has_cuda())
assert not pyvl.__file__.startswith(os.environ["REPO"] + "/"), "the checkout shadows the installed pyvl"
assert c.has_cuda() or not int(os.environ["WANT"]), "built without CUDA"'
    fi
  }
  stale_python_files() {  # the wheel carries pyvl's Python files as they were when it was built
    [ "$dry" = 1 ] && return
    REPO=$repo "$py" -c 'import filecmp, os, pyvl
src, inst = os.path.join(os.environ["REPO"], "pyvl"), os.path.dirname(pyvl.__file__)
rel = [os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs if f.endswith(".py")]
same = lambda r: os.path.exists(os.path.join(inst, r)) and filecmp.cmp(os.path.join(src, r), os.path.join(inst, r), False)
stale = [r for r in rel if not same(r)]
print(f" (STALE: {len(stale)} Python files differ from the checkout, e.g. {stale[0]})" if stale else "")'
  }
  : >"$out/build.log"
  if [ "$dry" = 1 ]; then echo "cuda build: skipped (dry run)"
  elif ! command -v nvcc >/dev/null; then echo "cuda build: skipped (no nvcc on PATH nor in /usr/local/cuda/bin)"
  elif [ "$python_h" != 1 ]; then echo "cuda build: skipped (no Python.h for $py)"
  else
    attempt_s=$((STEP_LIMIT_S - 30))  # leave the fallbacks their time
    echo "== cuda build (limit ${attempt_s} s)" >>"$out/build.log"
    if PYVL_CUDA=ON PYVL_CUDA_ARCHS=90a CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      pip_install "$attempt_s" --config-settings=build-dir="$work/build-cuda" "$repo" && check 1; then
      echo "SUMMARY: CUDA build from source (sm_90a)"; return 0
    fi
    echo "cuda build: FAILED, see build.log"
  fi
  wheel=$(ls "$repo"/.whl/pyvl-*-"$tag"-*.whl 2>/dev/null | tail -n 1)
  if [ -z "$wheel" ]; then echo "prebuilt wheel: none for $tag in .whl/"
  else
    echo "== wheel $wheel" >>"$out/build.log"
    if pip_install "$STEP_LIMIT_S" --force-reinstall "$wheel" && check "$((1 - dry))"; then
      echo "SUMMARY: prebuilt wheel $(basename "$wheel")$(stale_python_files)"; return 0
    fi
    echo "prebuilt wheel: FAILED, see build.log"
  fi
  if [ "$python_h" != 1 ]; then echo "cpu build: skipped (no Python.h)"; echo "SUMMARY: no build"; return 1; fi
  echo "== cpu build" >>"$out/build.log"
  if PYVL_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip_install "$STEP_LIMIT_S" \
    --config-settings=build-dir="$work/build-cpu" "$repo" \
    && check 0; then
    echo "SUMMARY: CPU-only build (PYVL_CUDA=OFF): CUDA preprocessing untested"; return 0
  fi
  echo "SUMMARY: no build"; return 1
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

bench_step() {  # bench_step ID BUDGET ARGS...: `pyvl bench ARGS --json`, stdout is the JSON
  local id=$1 step_budget=$2 json_step=1  # run_step sees json_step: the console gets no JSON
  shift 2
  run_step "$id" "$step_budget" TERM "$py" -m pyvl bench "$@" --json
}

SUMMARY_PY=$(cat <<'EOF'
import json, os, xml.etree.ElementTree as ET
work, out = os.environ["WORK"], os.environ["OUT_DIR"]
steps = {}
for line in open(os.path.join(work, "steps.tsv"), encoding="utf-8"):
    sid, status, secs, note = line.rstrip("\n").split("\t")
    steps[sid] = [status, secs, note]

def text(sid, ext):
    try:
        return open(os.path.join(work, f"{sid}.{ext}"), encoding="utf-8", errors="replace").read()
    except OSError:
        return ""

def result(sid):
    """The step's JSON, or why there is none."""
    status, _, note = steps.get(sid, ["skipped", "", "not reached"])
    if status == "skipped" and not text(sid, "err"):
        return {"skipped": note}
    if status == "ok":
        try:
            return json.loads(text(sid, "out"))
        except ValueError:
            steps[sid][0], steps[sid][2] = "FAILED", "exit status 0 but no JSON on stdout"
    tail = (text(sid, "err") + text(sid, "out")).strip().splitlines()[-15:]
    return {"error": "\n".join(tail) or note, "status": steps[sid][0]}

def write(name, obj):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)

BENCH_STEPS = ("bench_kernels", "bench_preprocess", "sweep", "e2e_v15", "e2e_mini", "e2e_v15_hf")
results = {sid: result(sid) for sid in BENCH_STEPS}
write("bench.json", {"kernels": results["bench_kernels"], "preprocess_cuda": results["bench_preprocess"]})
write("sweep.json", results["sweep"])
write("e2e.json", {"v15": results["e2e_v15"], "mini": results["e2e_mini"], "v15_hf": results["e2e_v15_hf"]})

# tests.xml: every pytest process's suites under one root; a process without a report gets one error case.
merged, counts = ET.Element("testsuites"), {}
for sid in ("tests_kernels", "tests_preprocess", "tests_image"):
    path = os.path.join(work, "junit", f"{sid}.xml")
    suites = []
    try:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
    except (OSError, ET.ParseError):
        status, _, note = steps.get(sid, ["skipped", "", "not reached"])
        suite = ET.SubElement(ET.Element("x"), "testsuite", name=sid, tests="1")
        case = ET.SubElement(suite, "testcase", classname=sid, name="pytest_process")
        ET.SubElement(case, "skipped" if status == "skipped" else "error", message=f"no report: {status} {note}")
        suites = [suite]
    c = counts.setdefault(sid, {"passed": 0, "failed": 0, "skipped": 0})
    for suite in suites:
        suite.set("name", sid)
        merged.append(suite)
        for case in suite.iter("testcase"):
            kind = next((k for k in ("failure", "error", "skipped") if case.find(k) is not None), "passed")
            c["failed" if kind in ("failure", "error") else kind] += 1
ET.ElementTree(merged).write(os.path.join(out, "tests.xml"), encoding="utf-8", xml_declaration=True)

def figures(sid):
    status = steps.get(sid, ["skipped"])[0]
    if sid in counts and status != "skipped":
        c = counts[sid]
        return f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
    if sid in results:
        r = results[sid]
        if "error" in r or "skipped" in r:
            return (r.get("error") or r.get("skipped")).splitlines()[-1][:90]
        rows = r.get("rows") if isinstance(r, dict) else r
        keyed = {row.get("key"): row for row in rows or [] if isinstance(row, dict)}
        picks = [f"{k} {keyed[k].get('pyvl')}" + (f" (hf {keyed[k]['hf']})" if keyed[k].get("hf") is not None else "")
                 for k in ("vision_13", "prefill", "decode", "peak_memory") if k in keyed]
        if rows is None:
            return "keys: " + ", ".join(r)[:80]
        return ", ".join(picks) or f"{len(rows)} rows"
    lines = [l[9:] for l in text(sid, "out").splitlines() if l.startswith("SUMMARY: ")]
    return lines[-1][:90] if lines else ""

print()
print(f"=== device check summary: {os.environ['MODE']}; build in use: {os.environ['BUILD'] or 'none'}; "
      f"{os.environ['ELAPSED']} s of {os.environ['BUDGET']} s")
print(f"{'step':<17} {'status':<8} {'s':>4}  key figures / note")
for sid in os.environ["STEPS"].split():
    status, secs, note = steps.get(sid, ["skipped", "0", "not reached"])
    shown = figures(sid) if status in ("ok", "FAILED") or sid in counts else ""
    print(f"{sid:<17} {status:<8} {secs:>4}  {'; '.join(x for x in (shown, note) if x)}")
EOF
)

mode_note="GPU run"
build_in_use=""
trap finish EXIT
trap 'exit 143' TERM INT

# nvcc is often installed but not on PATH.
cuda_bin_note=""
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
  cuda_bin_note=" (found /usr/local/cuda/bin/nvcc: added to PATH)"
fi
say "device check: budget ${budget} s, OUT=$out, python $py, repo $repo"
dry=0 xdist=0 pytimeout=0 python_h=0
export repo work out py dry cuda_bin_note
export -f env_report
run_step env 20 TERM bash -c env_report
read -r _ cuda_f xdist_f timeout_f pythonh_f <<<"$(grep '^FLAGS ' "$work/env.out" 2>/dev/null)"
# No report (env cut short): ask nvidia-smi alone.
if [ -n "${cuda_f:-}" ]; then [ "$cuda_f" = cuda=1 ] || dry=1
else timeout 10 nvidia-smi -L >/dev/null 2>&1 || dry=1; fi
[ "${xdist_f:-}" = xdist=1 ] && xdist=1
[ "${timeout_f:-}" = pytimeout=1 ] && pytimeout=1
[ "${pythonh_f:-}" = pythonh=1 ] && python_h=1
if [ "${DEVICE_CHECK_DRY_RUN:-0}" = 1 ]; then dry=1 mode_note="dry run (DEVICE_CHECK_DRY_RUN=1)"
elif [ "$dry" = 1 ]; then mode_note="dry run (no CUDA device: torch.cuda.is_available() is not True)"
else unset TRITON_INTERPRET; fi  # the kernels must run compiled on the GPU
say "mode: $mode_note"

export dry python_h
export -f build_pyvl
run_step build 85 TERM bash -c build_pyvl
build_in_use=$(sed -n 's/^SUMMARY: //p' "$work/build.out" 2>/dev/null | tail -n 1)
if [ "$dry" = 1 ]; then
  build_in_use="installed pyvl (dry run; the build went to a temporary --target: ${build_in_use:-none})"
elif [ "$build_in_use" = "no build" ] || [ -z "$build_in_use" ]; then
  # Last resort: the checkout's own pyvl/ without _C still runs the Triton kernels and their tests.
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  build_in_use="none: the checkout's pyvl/ on PYTHONPATH, no _C"
fi

kernel_tests="test_vit_attention.py test_rms_norm.py test_apply_rotary.py test_silu_mul.py"
kernel_tests="$kernel_tests test_pixel_shuffle.py test_paged_attention.py test_store_kv.py"
pytest_step tests_kernels "$kernel_tests" test_rejects_bad_inputs 8 60 60
bench_step bench_kernels 45 kernels
bench_step e2e_v15 75 e2e --preset internvl-chat-v1-5 --random-weights --no-hf --device cuda
pytest_step tests_preprocess "test_native_cuda_resize.py test_native.py test_resize_tiles.py" test_bad_grids 8 60 30
bench_step bench_preprocess 20 preprocess --device cuda
bench_step e2e_mini 25 e2e --preset mini-internvl-chat-2b-v1-5 --random-weights --no-hf --device cuda
pytest_step tests_image "test_image.py test_golden.py test_backend_triton.py test_engine.py" test_grid_table 4 60 30
bench_step sweep 20 sweep
if [ $((deadline - SECONDS - RESERVE_S)) -ge 100 ]; then
  bench_step e2e_v15_hf 90 e2e --preset internvl-chat-v1-5 --random-weights --hf-only --device cuda
else
  record e2e_v15_hf skipped 0 "only $((deadline - SECONDS - RESERVE_S)) s left (needs 100)"
fi
exit 0
