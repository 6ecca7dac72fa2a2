"""Host memory while loading: the weights exist once. Runs benchmarks/bench_load.py in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_load.py"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_rss_while_loading_stays_near_one_copy(dtype):
    out = subprocess.run([sys.executable, str(BENCH), "--dtype", dtype, "--json"], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # One full copy of the weights, plus at most one tensor in flight and allocator slack.
    assert result["peak_rss_growth_MiB"] <= 1.25 * result["params_MiB"] + 16, result
    assert result["params_MiB"] >= result["checkpoint_MiB"] * (2 if dtype == "float32" else 1) * 0.99
