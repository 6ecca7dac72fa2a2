"""benchmarks/device_check.sh in dry-run mode, so the one prepared GPU run cannot rot between GPU runs: every step
runs (the kernel benchmarks with --smoke under the Triton interpreter, the model benchmarks on the tiny preset on
the CPU; the two that need CUDA answer so and are recorded as skipped), its files, their formats, the summary, the
deadline, a step killed at its limit, and a probe that never imports torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "device_check.sh"
FILES = {"device_check.log", "tests.xml", "bench.json", "build.log", "sweep.json", "e2e.json"}
STEPS = [
    "probe",
    "env",
    "build",
    "tests_kernels",
    "bench_kernels",
    "e2e_v15",
    "e2e_v15_awq",
    "engine_v15",
    "bench_preprocess",
    "tests_preprocess",
    "tests_image",
    "e2e_mini",
    "load_v15",
    "tp_v15",
    "sweep",
    "e2e_v15_hf",
]
TEST_STEPS = ("tests_kernels", "tests_preprocess", "tests_image")
KERNEL_OPS = {
    "vit_attention",
    "paged_prefill_attention",
    "paged_decode_attention",
    "rms_norm",
    "rms_norm (+residual)",
    "silu_mul",
    "apply_rotary",
    "pixel_shuffle",
    "w4a16_linear",
}

pytestmark = [
    pytest.mark.slow,  # the full dry run builds pyvl's CPU extension and runs every step (~2 minutes on 2 cores)
    pytest.mark.skipif(
        shutil.which("bash") is None or shutil.which("timeout") is None,
        reason="the script needs bash and coreutils' timeout",
    ),
]


def run_dry(out: Path, python: str = sys.executable, **env) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OUT": str(out), "DEVICE_CHECK_DRY_RUN": "1", "DEVICE_CHECK_PYTHON": python, **env}
    began = time.monotonic()
    wall = int(env.get("DEVICE_CHECK_BUDGET_S", 480)) + 120
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=wall)
    return proc, time.monotonic() - began


def only(*steps: str, **budgets: int) -> str:
    """DEVICE_CHECK_STEP_BUDGETS that skips every step but ``steps`` (and gives ``budgets`` to those named)."""
    return " ".join(f"{s}={budgets.get(s, 0 if s not in steps else 600)}" for s in STEPS)


def summary(stdout: str) -> dict[str, list[str]]:
    """{step: [status, seconds, figures...]} from the table, which must be the last thing printed and list each
    step once, in order."""
    lines = stdout.rstrip("\n").splitlines()
    title = max(i for i, line in enumerate(lines) if line.startswith("=== device check summary"))
    head = next(i for i in range(title + 1, len(lines)) if not lines[i].startswith("!!! "))
    assert lines[head].split()[:3] == ["step", "status", "s"]
    rows = [line.split(maxsplit=3) for line in lines[head + 1 :]]
    assert [row[0] for row in rows] == STEPS, f"the summary is not last or misses steps:\n{stdout[-3000:]}"
    return {row[0]: row[1:] for row in rows}


def statuses(stdout: str) -> dict[str, str]:
    return {step: row[0] for step, row in summary(stdout).items()}


def check_files(out: Path) -> ET.Element:
    assert {p.name for p in out.iterdir()} == FILES
    assert set(json.loads((out / "bench.json").read_text())) == {"kernels", "preprocess_cuda"}
    assert set(json.loads((out / "e2e.json").read_text())) == {
        "v15",
        "v15_awq",
        "mini",
        "v15_hf",
        "engine_v15",
        "load_v15",
        "tp_v15",
    }
    assert isinstance(json.loads((out / "sweep.json").read_text()), dict)
    return ET.parse(out / "tests.xml").getroot()


def results(out: Path) -> dict[str, dict]:
    """Each benchmark step's entry in the JSON files."""
    bench, e2e = (json.loads((out / name).read_text()) for name in ("bench.json", "e2e.json"))
    return {
        "bench_kernels": bench["kernels"],
        "bench_preprocess": bench["preprocess_cuda"],
        "sweep": json.loads((out / "sweep.json").read_text()),
        "e2e_v15": e2e["v15"],
        "e2e_v15_awq": e2e["v15_awq"],
        "e2e_mini": e2e["mini"],
        "e2e_v15_hf": e2e["v15_hf"],
        "engine_v15": e2e["engine_v15"],
        "load_v15": e2e["load_v15"],
        "tp_v15": e2e["tp_v15"],
    }


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    # Every step is meant to run: a deadline well past the device's 480 s, so a loaded CI box cuts none of them
    proc, _ = run_dry(out, DEVICE_CHECK_BUDGET_S="1500")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc, out


def test_dry_run_probes_builds_and_tests(dry_run):
    proc, out = dry_run
    status = statuses(proc.stdout)
    assert {s: status[s] for s in ("probe", "env", "build", *TEST_STEPS)} == dict.fromkeys(
        ("probe", "env", "build", *TEST_STEPS), "ok"
    ), proc.stdout[-3000:]
    log = (out / "device_check.log").read_text()
    assert "cuda build: skipped (dry run)" in log and "\nFLAGS gpu=0 pythonh=" in log
    assert "SUMMARY: CPU-only build (PYVL_CUDA=OFF)" in log  # its _C went into the tree
    assert "assembled " in log and "pyvl.kernels from " in log


def test_dry_run_smokes_the_kernel_benchmarks(dry_run):
    proc, out = dry_run
    status, got = statuses(proc.stdout), results(out)
    assert (status["bench_kernels"], status["sweep"]) == ("ok", "ok"), proc.stdout[-3000:]
    kernels, sweep = got["bench_kernels"], got["sweep"]
    assert kernels["complete"] and kernels["status"] == "ok" and kernels["setup"]["shapes"] == "smoke"
    assert {r["op"] for r in kernels["rows"]} == KERNEL_OPS
    assert all("without a benchmark case" in n for n in kernels["notes"]), kernels["notes"]  # no case failed
    assert sweep["complete"] and sweep["setup"]["shapes"] == "smoke" and sweep["notes"] == []
    assert {r["op"] for r in sweep["rows"]} == {"vit_attention", "paged_decode_attention"}
    assert all(r["status"] == "ok" for r in sweep["rows"]), [r["status"] for r in sweep["rows"]]
    table = summary(proc.stdout)
    assert "vit_attention" in table["bench_kernels"][-1] and "configurations, 0 failed" in table["sweep"][-1]


def test_dry_run_runs_the_model_benchmarks_on_the_tiny_preset(dry_run):
    """Needs the e2e (--kv-cache-gb, --jsonl), engine (--preset, --random-weights, --jsonl) and bench_load.py
    (--preset, --device, --jsonl) flags; each prints a pyvl.bench.report stream."""
    proc, out = dry_run
    status, got = statuses(proc.stdout), results(out)
    steps = ("e2e_v15", "e2e_v15_awq", "engine_v15", "e2e_mini", "load_v15")
    assert {s: status[s] for s in steps} == dict.fromkeys(steps, "ok"), proc.stdout[-3000:]
    for step in steps:
        assert got[step]["complete"] and got[step]["rows"], step
    for step, preset in (("e2e_v15", "tiny"), ("e2e_v15_awq", "tiny-awq"), ("e2e_mini", "tiny")):
        keys = {row["key"] for row in got[step]["rows"]}
        assert {"prefill", "ttft", "decode", "peak_memory"} <= keys, keys
        assert got[step]["setup"]["preset"] == preset
    assert "vision_13" in {row["key"] for row in got["e2e_v15"]["rows"]}
    assert all("key" in row for row in got["engine_v15"]["rows"])
    assert any("load_s" in row for row in got["load_v15"]["rows"])


def test_dry_run_skips_what_needs_cuda(dry_run):
    proc, out = dry_run
    status, got = statuses(proc.stdout), results(out)
    for step in ("bench_preprocess", "e2e_v15_hf"):
        assert status[step] == "skipped", proc.stdout[-3000:]
        assert got[step]["status"] == "skipped" and "CUDA" in got[step]["error"] and not got[step]["complete"]


def test_dry_run_records_the_two_gpu_step_as_skipped(dry_run):
    proc, out = dry_run
    tp = results(out)["tp_v15"]
    assert statuses(proc.stdout)["tp_v15"] == "skipped"
    assert (tp["status"], tp["note"], tp["rows"]) == ("skipped", "needs 2 GPUs, 0 visible", [])


def test_dry_run_files_and_merged_junit(dry_run):
    proc, out = dry_run
    root = check_files(out)
    suites = {suite.get("name"): suite for suite in root.iter("testsuite")}
    assert set(suites) == set(TEST_STEPS)
    for name, suite in suites.items():
        cases = list(suite.iter("testcase"))
        assert cases and all(c.find("failure") is None and c.find("error") is None for c in cases), name
    assert (out / "build.log").read_text().strip(), "the build wrote no log"


def test_deadline_cuts_steps_and_still_prints_the_summary(tmp_path):
    budget = 12  # the probe, env and the build's start get what is left before the summary's reserve
    proc, elapsed = run_dry(tmp_path, DEVICE_CHECK_BUDGET_S=str(budget))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert elapsed < budget + 10
    status = statuses(proc.stdout)
    assert set(status.values()) <= {"ok", "timeout", "skipped"}
    assert status["build"] in ("timeout", "skipped")  # a CPU build takes longer than the 4 s it could get
    assert all(status[s] == "skipped" for s in STEPS[3:]), status
    root = check_files(tmp_path)
    assert {suite.get("name") for suite in root.iter("testsuite")} == set(TEST_STEPS)


def test_a_step_killed_at_its_limit_keeps_the_rows_it_printed(tmp_path):
    # A stand-in interpreter: the sweep prints two rows, then hangs until the script kills it; all else is real.
    rows = [json.dumps({"row": {"op": "vit_attention", "config": f"c{i}", "status": "ok"}}) for i in range(2)]
    fake_sweep = "import time; print({!r}, flush=True); time.sleep(600)".format("\n".join(rows))
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\ncase "$*" in *"pyvl bench sweep"*) exec "{sys.executable}" -c "$SWEEP" ;; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    out = tmp_path / "out"
    proc, _ = run_dry(
        out, str(python), SWEEP=fake_sweep, DEVICE_CHECK_STEP_BUDGETS=only("probe", "sweep", sweep=4)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    table = summary(proc.stdout)
    assert table["sweep"][0] == "timeout" and "INCOMPLETE (2 rows)" in table["sweep"][-1], proc.stdout[-2000:]
    assert table["build"][0] == "skipped" and "DEVICE_CHECK_STEP_BUDGETS" in table["build"][-1]
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["config"] for r in sweep["rows"]] == ["c0", "c1"]
    assert (sweep["complete"], sweep["status"], sweep["note"]) == (
        False,
        "timeout",
        "killed at its 4 s limit",
    )
    assert "!!! no pyvl._C in the tree" in proc.stdout  # the build was skipped: the steps ran without one


def test_the_probe_never_imports_torch(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('the fake torch of test_device_check was imported')\n"
    )
    out = tmp_path / "out"
    proc, _ = run_dry(out, PYTHONPATH=str(tmp_path / "fake"), DEVICE_CHECK_STEP_BUDGETS=only("probe", "env"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    table = summary(proc.stdout)
    assert table["probe"][0] == "ok" and "pythonh" in table["probe"][-1], proc.stdout[-2000:]
    log = (out / "device_check.log").read_text()
    assert "\nFLAGS gpu=0 pythonh=" in log
    assert (
        "torch: ImportError: the fake torch of test_device_check was imported" in log
    )  # env saw the fake one
