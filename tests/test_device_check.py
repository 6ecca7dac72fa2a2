"""benchmarks/device_check.sh in dry-run mode (CUDA steps skipped, everything else exercised), so the one
prepared GPU run cannot rot between GPU runs: its files, their formats, the summary and the deadline."""

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
STEPS = ["env", "build", "tests_kernels", "bench_kernels", "e2e_v15", "tests_preprocess", "bench_preprocess",
         "e2e_mini", "tests_image", "sweep", "e2e_v15_hf"]
TEST_STEPS = ("tests_kernels", "tests_preprocess", "tests_image")
BENCH_STEPS = ("bench_kernels", "e2e_v15", "bench_preprocess", "e2e_mini", "sweep", "e2e_v15_hf")

pytestmark = [
    pytest.mark.slow,  # builds pyvl's CPU extension into a temporary folder (~20 s of the ~60 s)
    pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                       reason="the script needs bash and coreutils' timeout"),
]


def run_dry(out: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OUT": str(out), "DEVICE_CHECK_DRY_RUN": "1", "DEVICE_CHECK_PYTHON": sys.executable, **env}
    began = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - began


def summary(stdout: str) -> dict[str, str]:
    """{step: status} from the table, which must be the last thing printed and list each step once, in order."""
    lines = stdout.rstrip("\n").splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("=== device check summary"))
    assert lines[head + 1].split()[:3] == ["step", "status", "s"]
    rows = [line.split() for line in lines[head + 2:]]
    assert [row[0] for row in rows] == STEPS, f"the summary is not last or misses steps:\n{stdout[-3000:]}"
    return {row[0]: row[1] for row in rows}


def check_files(out: Path) -> ET.Element:
    assert {p.name for p in out.iterdir()} == FILES
    assert set(json.loads((out / "bench.json").read_text())) == {"kernels", "preprocess_cuda"}
    assert set(json.loads((out / "e2e.json").read_text())) == {"v15", "mini", "v15_hf"}
    assert isinstance(json.loads((out / "sweep.json").read_text()), dict)
    return ET.parse(out / "tests.xml").getroot()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    proc, _ = run_dry(out)
    return proc, out


def test_dry_run_exercises_every_step(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    status = summary(proc.stdout)
    assert {s: status[s] for s in ("env", "build", *TEST_STEPS)} == dict.fromkeys(("env", "build", *TEST_STEPS), "ok")
    # Every bench command ran and refused for want of CUDA (or of transformers, for the HF one): recorded as
    # skipped, with its last lines kept as the error.
    assert {s: status[s] for s in BENCH_STEPS} == dict.fromkeys(BENCH_STEPS, "skipped")
    bench, e2e = (json.loads((out / name).read_text()) for name in ("bench.json", "e2e.json"))
    for entry in [bench["kernels"], bench["preprocess_cuda"], e2e["v15"], e2e["mini"],
                  json.loads((out / "sweep.json").read_text())]:
        assert "CUDA" in entry["error"]
    assert e2e["v15_hf"]["error"]
    assert "cuda build: skipped (dry run)" in (out / "device_check.log").read_text()


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
    budget = 12  # env gets what is left before the summary's reserve; nothing after it fits
    proc, elapsed = run_dry(tmp_path, DEVICE_CHECK_BUDGET_S=str(budget))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert elapsed < budget + 10
    status = summary(proc.stdout)
    assert set(status.values()) <= {"ok", "timeout", "skipped"}
    assert all(status[s] == "skipped" for s in STEPS[2:]), status
    root = check_files(tmp_path)
    assert {suite.get("name") for suite in root.iter("testsuite")} == set(TEST_STEPS)
