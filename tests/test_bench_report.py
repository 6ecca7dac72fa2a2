"""pyvl.bench.report (a result streamed as JSON lines, rebuilt by collect) and benchmarks/device_summary.py, which
rebuilds each step of the device check from those lines, cut short or not, and prints the table last."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvl.bench.report import Report, collect

SUMMARY = Path(__file__).parent.parent / "benchmarks" / "device_summary.py"


def streamed(pieces, done: bool = False) -> tuple[dict, list[str]]:
    """The result and the lines of a Report fed ``pieces`` (("set", key, value), ("row", row), ("note", text)),
    then ended with done() if ``done``."""
    stream = io.StringIO()
    report = Report(stream)
    for kind, *args in pieces:
        getattr(report, kind)(*args)
    result = report.done() if done else report.result
    return result, stream.getvalue().splitlines()


PIECES = [
    ("set", "setup", {"device": "H200"}),
    ("row", {"op": "a", "ms": 1.5}),
    ("note", "b failed"),
    ("row", {"op": "c", "ms": 2.0}),
    ("set", "ceilings", {"copy_GBps": 4300.0}),
]


def test_report_streams_each_piece_and_collect_rebuilds_the_result():
    result, lines = streamed(PIECES)
    assert len(lines) == len(PIECES)  # one line per piece, printed as it came
    assert json.loads(lines[1]) == {"row": {"op": "a", "ms": 1.5}}
    assert collect(lines) == {**result, "complete": False}
    finished, lines = streamed(PIECES, done=True)
    assert finished == result and json.loads(lines[-1]) == {"done": True}
    assert collect(lines) == {**result, "complete": True}
    assert Report().done() == {"rows": [], "notes": []}  # no stream: nothing printed, the result kept


def test_collect_keeps_the_rows_of_a_stream_cut_mid_line():
    _, lines = streamed(PIECES)
    cut = lines[:3] + [lines[3][:10]]  # killed while printing the second row
    got = collect(["[bench] a log line", *cut, "", "42"])
    assert got["rows"] == [{"op": "a", "ms": 1.5}] and got["notes"] == ["b failed"]
    assert got["setup"] == {"device": "H200"} and got["complete"] is False and "ceilings" not in got


def test_report_set_refuses_the_fields_it_builds():
    with pytest.raises(ValueError, match="row"):
        Report().set("rows", [])


# benchmarks/device_summary.py on a made-up temporary folder of the script.

STEPS = "probe build bench_kernels e2e_v15 engine_v15 bench_preprocess load_v15 sweep"


def make_work(
    tmp_path: Path, steps: list[tuple], outputs: dict[str, list[str]], extension: bool = True
) -> Path:
    work = tmp_path / "work"
    (work / "junit").mkdir(parents=True)
    (work / "src" / "pyvl").mkdir(parents=True)
    if extension:
        (work / "src" / "pyvl" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    (work / "steps.tsv").write_text("".join("\t".join(map(str, s)) + "\n" for s in steps))
    for name, lines in outputs.items():
        (work / name).write_text("".join(line + "\n" for line in lines))
    return work


def summarise(work: Path, out: Path, dry: bool) -> list[str]:
    out.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "WORK": str(work),
        "OUT_DIR": str(out),
        "STEPS": STEPS,
        "DRY": "1" if dry else "0",
        "MODE": "test",
        "BUILD": "a build",
        "ELAPSED": "100",
        "BUDGET": "480",
    }
    proc = subprocess.run(
        [sys.executable, "-S", str(SUMMARY)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def table(lines: list[str]) -> dict[str, str]:
    """{step: its row} of the table, which must be the last thing printed, one row per step in order."""
    head = next(i for i, line in enumerate(lines) if line.startswith("step "))
    rows = lines[head + 1 :]
    assert [row.split()[0] for row in rows] == STEPS.split()
    return {row.split()[0]: row for row in rows}


def e2e_lines(ops: dict) -> list[str]:
    rows = [
        {"key": "vision_13", "figure": "vision", "unit": "ms", "pyvl": 41.5, "hf": None, "hf/pyvl": None},
        {"key": "decode", "figure": "decode", "unit": "ms/token", "pyvl": 20.1, "hf": None, "hf/pyvl": None},
    ]
    return (
        [json.dumps({"set": "setup", "value": {"ops": ops}})]
        + [json.dumps({"row": r}) for r in rows]
        + [json.dumps({"done": True})]
    )


def test_summary_keeps_a_killed_steps_rows(tmp_path):
    _, sweep = streamed(
        [
            ("set", "setup", {"device": "H200"}),
            ("row", {"op": "vit", "status": "ok"}),
            ("row", {"op": "vit", "status": "error: out of resource"}),
            ("row", {"op": "decode"}),
        ]
    )
    cut = sweep[:3] + [sweep[3][:12]]  # killed while printing the third row
    steps = [
        ("probe", "ok", 1, ""),
        ("build", "ok", 60, ""),
        ("bench_kernels", "ok", 30, ""),
        ("sweep", "timeout", 60, "killed at its 60 s limit"),
    ]
    kernels = [json.dumps({"set": "setup", "value": {}}), json.dumps({"done": True})]
    work = make_work(
        tmp_path,
        steps,
        {
            "sweep.out": cut,
            "sweep.err": ["Terminated"],
            "bench_kernels.out": kernels,
            "probe.out": ["SUMMARY: python 3.12.3; gpu yes"],
        },
    )
    lines = summarise(work, tmp_path / "out", dry=False)
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["op"] for r in result["rows"]] == ["vit", "vit"]
    assert (result["complete"], result["status"], result["note"]) == (
        False,
        "timeout",
        "killed at its 60 s limit",
    )
    assert result["setup"] == {"device": "H200"} and result["error"] == "Terminated"
    rows = table(lines)
    assert (
        rows["sweep"].split()[1] == "timeout"
        and "INCOMPLETE (2 rows): 2 configurations, 1 failed" in rows["sweep"]
    )
    assert "python 3.12.3; gpu yes" in rows["probe"]
    e2e = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert set(e2e) == {"v15", "mini", "v15_hf", "engine_v15", "load_v15", "tp_v15", "v15_awq"}
    assert e2e["engine_v15"] == {
        "rows": [],
        "notes": [],
        "complete": False,
        "status": "skipped",
        "note": "not reached",
    }
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "bench.json",
        "sweep.json",
        "e2e.json",
        "tests.xml",
    }


def test_summary_fails_a_step_that_exits_0_without_its_done_line(tmp_path):
    steps = [("bench_kernels", "ok", 30, "")]
    work = make_work(tmp_path, steps, {"bench_kernels.out": ["a plain table, no JSON lines"]})
    rows = table(summarise(work, tmp_path / "out", dry=True))
    assert rows["bench_kernels"].split()[1] == "FAILED" and '{"done": true}' in rows["bench_kernels"]
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["kernels"]["status"] == "FAILED"


def test_summary_shows_key_figures_and_alerts_on_reference_ops_in_a_gpu_run(tmp_path):
    steps = [("build", "ok", 60, ""), ("e2e_v15", "ok", 50, ""), ("engine_v15", "ok", 50, "")]
    engine = [
        json.dumps({"set": "setup", "value": "an engine whose setup is no dict"}),
        json.dumps({"row": {"key": "turn2", "baseline": 30.0, "engine": 12.0, "ratio": 2.5}}),
        json.dumps({"row": {"key": "other", "engine": 1.0}}),
        json.dumps({"done": True}),
    ]
    outputs = {
        "e2e_v15.out": e2e_lines(
            {"rms_norm": "reference", "vit_attention": "reference", "silu_mul": "triton", "gelu": "torch"}
        ),
        "engine_v15.out": engine,
        "build.out": ["ALERT: pyvl._C was built without CUDA"],
    }
    work = make_work(tmp_path, steps, outputs)
    lines = summarise(work, tmp_path / "gpu", dry=False)
    alerts = [line for line in lines if line.startswith("!!! ")]
    assert alerts == [
        "!!! pyvl._C was built without CUDA",
        "!!! e2e_v15 ran the REFERENCE ops for: rms_norm, vit_attention",
    ]
    rows = table(lines)
    assert "vision_13 41.5 ms, decode 20.1 ms/token" in rows["e2e_v15"]
    assert "turn2 12.0 (2.5x)" in rows["engine_v15"] and "other" not in rows["engine_v15"]
    dry = [line for line in summarise(work, tmp_path / "dry", dry=True) if line.startswith("!!! ")]
    assert dry == ["!!! pyvl._C was built without CUDA"]  # on the CPU the reference ops are the expected ones


def test_summary_shows_the_kernel_preprocess_and_load_figures(tmp_path):
    kernels = [
        {
            "op": "vit_attention",
            "shape": "13x25x1025x128",
            "timing": "eager",
            "rate": 480.2,
            "unit": "TFLOP/s",
        },
        {
            "op": "vit_attention",
            "shape": "13x16x1025x64",
            "timing": "eager",
            "rate": 300.0,
            "unit": "TFLOP/s",
        },
        {
            "op": "paged_decode_attention",
            "shape": "decode 48/8 x 3400 x 128",
            "timing": "graph, hot L2",
            "rate": 9000.0,
            "unit": "GB/s",
        },
        {
            "op": "paged_decode_attention",
            "shape": "decode 48/8 x 3400 x 128",
            "timing": "graph, 9 K/V copies",
            "rate": 2100.5,
            "unit": "GB/s",
        },
    ]
    prep = [
        {"image": "3840x2160", "dtype": "bfloat16", "kernel_ms": 0.08, "target": "< 0.1 ms"},
        {"image": "3840x2160", "dtype": "float32", "kernel_ms": 0.1, "target": ""},
        {"image": "640x480", "dtype": "bfloat16", "kernel_ms": 0.01, "target": ""},
    ]
    stream = lambda rows: [json.dumps({"row": r}) for r in rows] + [json.dumps({"done": True})]  # noqa: E731
    steps = [("bench_kernels", "ok", 30, ""), ("bench_preprocess", "ok", 10, ""), ("load_v15", "ok", 20, "")]
    work = make_work(
        tmp_path,
        steps,
        {
            "bench_kernels.out": stream(kernels),
            "bench_preprocess.out": stream(prep),
            "load_v15.out": stream([{"load_s": 12.5, "peak_rss_growth_MiB": 3.0}]),
        },
    )
    rows = table(summarise(work, tmp_path / "out", dry=False))
    assert rows["bench_kernels"].endswith(
        "vit_attention 13x25x1025x128 480.2 TFLOP/s, decode 48/8 x 3400 x 128 2100.5 GB/s"
    )
    assert rows["bench_preprocess"].endswith("3840x2160 bfloat16 kernel 0.08 ms (target < 0.1 ms)")
    assert rows["load_v15"].endswith("load_s 12.5")


def test_summary_says_loudly_when_the_tree_had_no_extension(tmp_path):
    work = make_work(tmp_path, [("build", "FAILED", 60, "exit status 1")], {}, extension=False)
    alerts = [line for line in summarise(work, tmp_path / "out", dry=False) if line.startswith("!!! ")]
    assert len(alerts) == 1 and "no pyvl._C" in alerts[0]
