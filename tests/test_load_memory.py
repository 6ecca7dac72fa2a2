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
    out = subprocess.run(
        [sys.executable, str(BENCH), "--dtype", dtype, "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # One full copy of the weights, plus at most one tensor in flight and allocator slack.
    assert result["peak_rss_growth_MiB"] <= 1.25 * result["params_MiB"] + 16, result
    assert result["params_MiB"] >= result["checkpoint_MiB"] * (2 if dtype == "float32" else 1) * 0.99


def _load_bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_preset_checkpoint_is_written_in_the_released_format_and_loaded(tmp_path):
    from pyvl.bench.report import collect

    out = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "tiny", "--jsonl"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    result = collect(out.splitlines())
    (row,) = result["rows"]
    assert result["complete"] and result["setup"]["layers"] == result["setup"]["full_layers"] == 4
    assert row["key"] == "load" and row["params_MiB"] == row["checkpoint_MiB"] > 0 and row["load_s"] > 0
    assert "full_size_load_s_extrapolated" not in row


def test_a_preset_too_big_for_the_limit_keeps_the_layers_that_fit():
    from pyvl.bench.presets import preset_dict

    bench = _load_bench_module()
    full = preset_dict("internvl-chat-v1-5")
    assert round(bench._checkpoint_bytes(full) / 1e9, 1) == 51.0  # 25.5 B parameters in bf16
    cfg, layers = bench._fit_layers(full, 20e9)
    assert bench._checkpoint_bytes(cfg) <= 20e9 < bench._checkpoint_bytes(bench._fit_layers(full, 1e15)[0])
    more = dict(cfg, llm_config=dict(cfg["llm_config"], num_hidden_layers=layers + 1))
    assert bench._checkpoint_bytes(more) > 20e9
    assert bench._fit_layers(full, 1e12) == (full, 48)


def test_shards_hold_exactly_the_tensors_the_header_names(tmp_path):
    from safetensors import safe_open

    bench = _load_bench_module()
    pool = memoryview(bytes(range(256)) * 3)  # shorter than a tensor: the bytes cycle
    bench._write_shard(tmp_path / "s.safetensors", [("a", (3, 100)), ("b", (7,))], pool)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.get_tensor("a").shape == (3, 100) and f.get_tensor("b").shape == (7,)
        raw = f.get_tensor("a").view(__import__("torch").uint8).flatten().tolist()
    assert raw == list(bytes(range(256)) * 3)[:600]
