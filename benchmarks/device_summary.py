"""The end of benchmarks/device_check.sh (its EXIT trap runs this with ``python -S``): every result rebuilt from
what the steps printed, the files written to $OUT, the summary table printed last.

Each benchmark printed its result as JSON lines (pyvl.bench.report) while it measured; ``collect`` rebuilds it,
complete or cut short: a step killed at its limit keeps every row it printed, with "complete": false and its
status. Files in $OUT (the script writes device_check.log and build.log itself):

    bench.json  {"kernels", "preprocess_cuda"}                      sweep.json  the block-config sweep
    e2e.json    {"v15", "v15_awq", "mini", "v15_hf", "engine_v15", "load_v15", "tp_v15"}
    tests.xml   the JUnit reports merged

Every entry of the JSON files is {"rows", "notes", "complete", "status", ...the result's own fields}, plus
"note" (why it was skipped or stopped) and "error" (the last lines of stderr) where there is one.

Reads, from the environment: WORK (the script's temporary folder: steps.tsv with id, status, seconds, note per
line; <id>.out and <id>.err per step; junit/<id>.xml; the tree src/ the steps imported pyvl from), OUT_DIR,
STEPS (the ids in order), DRY (1 in a dry run), MODE, BUILD, ELAPSED, BUDGET. Standard library only, and
pyvl/bench/report.py is loaded by its path: importing pyvl would import torch.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

REPORT_PY = Path(__file__).resolve().parent.parent / "pyvl" / "bench" / "report.py"
TEST_STEPS = ("tests_kernels", "tests_preprocess", "tests_image")
JSON_FILES = {  # file -> {key: step}; sweep.json holds the sweep's result itself
    "bench.json": {"kernels": "bench_kernels", "preprocess_cuda": "bench_preprocess"},
    "e2e.json": {
        "v15": "e2e_v15",
        "v15_awq": "e2e_v15_awq",
        "mini": "e2e_mini",
        "v15_hf": "e2e_v15_hf",
        "engine_v15": "engine_v15",
        "load_v15": "load_v15",
        "tp_v15": "tp_v15",
    },
}
BENCH_STEPS = ("sweep", *(step for steps in JSON_FILES.values() for step in steps.values()))
MODEL_STEPS = (
    "e2e_v15",
    "e2e_v15_awq",
    "e2e_mini",
    "e2e_v15_hf",
    "engine_v15",
)  # their setup.ops says what served each op
E2E_KEYS = ("vision_13", "prefill", "ttft", "decode", "peak_memory")
ENGINE_KEYS = (
    "cached_followup",
    "followup: PNG path",
    "turn2",
    "streams_8",
    "streams_16",
    "host_b1",
    "decode_long",
)
NOT_REACHED = ("skipped", "0", "not reached")


def load_collect():
    spec = importlib.util.spec_from_file_location("pyvl_bench_report", REPORT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.collect


class Run:
    """The steps' records and output files in WORK."""

    def __init__(self, work: Path):
        self.work = work
        self.steps: dict[str, list[str]] = {}
        for line in (work / "steps.tsv").read_text(encoding="utf-8").splitlines():
            sid, status, secs, note = line.split("\t")
            self.steps[sid] = [status, secs, note]

    def step(self, sid: str) -> list[str]:
        return self.steps.get(sid, list(NOT_REACHED))

    def text(self, sid: str, ext: str) -> str:
        try:
            return (self.work / f"{sid}.{ext}").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def mark_failed(self, sid: str, note: str) -> None:
        self.steps[sid][0], self.steps[sid][2] = "FAILED", note


def bench_result(run: Run, sid: str, collect) -> dict:
    """The step's result from its JSON lines, whatever they reached, with its status and why it stopped."""
    result = collect(run.text(sid, "out").splitlines())
    status, _, note = run.step(sid)
    if status == "ok" and not result["complete"]:
        run.mark_failed(sid, 'exit status 0 but no {"done": true} line on stdout')
        status, _, note = run.step(sid)
    result["status"] = status
    if note:
        result["note"] = note
    error = run.text(sid, "err").strip().splitlines()[-15:]
    if status != "ok" and error:
        result["error"] = "\n".join(error)
    return result


def write_json_files(out: Path, results: dict) -> None:
    def write(name: str, obj) -> None:
        (out / name).write_text(json.dumps(obj, indent=1), encoding="utf-8")

    for name, keys in JSON_FILES.items():
        write(name, {key: results[sid] for key, sid in keys.items()})
    write("sweep.json", results["sweep"])


def merge_junit(run: Run, out: Path) -> dict[str, dict[str, int]]:
    """tests.xml: every pytest process's suites under one root (a process without a report gets one error or
    skipped case); returns the passed / failed / skipped counts per step."""
    merged, counts = ET.Element("testsuites"), {}
    for sid in TEST_STEPS:
        try:
            root = ET.parse(run.work / "junit" / f"{sid}.xml").getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
        except (OSError, ET.ParseError):
            status, _, note = run.step(sid)
            suite = ET.Element("testsuite", name=sid, tests="1")
            case = ET.SubElement(suite, "testcase", classname=sid, name="pytest_process")
            ET.SubElement(
                case, "skipped" if status == "skipped" else "error", message=f"no report: {status} {note}"
            )
            suites = [suite]
        c = counts.setdefault(sid, {"passed": 0, "failed": 0, "skipped": 0})
        for suite in suites:
            suite.set("name", sid)
            merged.append(suite)
            for case in suite.iter("testcase"):
                kind = next(
                    (k for k in ("failure", "error", "skipped") if case.find(k) is not None), "passed"
                )
                c["failed" if kind in ("failure", "error") else kind] += 1
    ET.ElementTree(merged).write(out / "tests.xml", encoding="utf-8", xml_declaration=True)
    return counts


# The key figures column: the figures the project is judged by, where the rows hold them.


def _keyed(rows: list[dict], keys) -> list[str]:
    by_key = {row.get("key"): row for row in rows}
    shown = []
    for key in keys:
        if key in by_key:
            row = by_key[key]
            value = next((row[k] for k in ("pyvl", "engine", "value") if row.get(k) is not None), "-")
            text = f"{key} {value}" + (f" {row['unit']}" if row.get("unit") else "")
            if row.get("hf") is not None:
                text += f" (hf {row['hf']})"
            elif row.get("ratio") is not None:
                text += f" ({row['ratio']}x)"
            shown.append(text)
    return shown


def _rate(row: dict) -> str:
    return f"{row.get('shape')} {row.get('rate')} {row.get('unit', '')}".rstrip()


def kernel_figures(rows: list[dict]) -> list[str]:
    """The first (largest) ViT attention row and each decode length's HBM-bound row (graph, N K/V copies)."""
    vit = [f"vit_attention {_rate(r)}" for r in rows if r.get("op") == "vit_attention"][:1]
    decode = [
        _rate(r) for r in rows if r.get("op") == "paged_decode_attention" and "copies" in str(r.get("timing"))
    ]
    return vit + decode


def preprocess_figures(rows: list[dict]) -> list[str]:
    """The 4K photo to bf16 tiles, the row with the issue's target."""
    return [
        f"{r['image']} {r['dtype']} kernel {r.get('kernel_ms')} ms (target {r.get('target') or '-'})"
        for r in rows
        if r.get("image") == "3840x2160" and r.get("dtype") == "bfloat16"
    ]


def sweep_figures(rows: list[dict]) -> list[str]:
    bad = sum(1 for r in rows if r.get("status") != "ok")
    return [f"{len(rows)} configurations, {bad} failed or not compiled"]


def load_figures(rows: list[dict]) -> list[str]:
    return [f"load_s {r['load_s']}" for r in rows if "load_s" in r][:1]


def tp_figures(rows: list[dict]) -> list[str]:
    """TP=1 -> TP=N of each row, with the ratio (TP=N's speed-up, or its share of the weights)."""
    shown = []
    for row in rows:
        sizes = [k for k in row if k.startswith("tp")]
        if len(sizes) == 2:
            values = " -> ".join(f"{row[k]}" for k in sizes)
            shown.append(f"{row.get('key')} {values} {row.get('unit', '')} ({row.get('ratio')}x)")
    return shown


def e2e_figures(rows: list[dict]) -> list[str]:
    return _keyed(rows, E2E_KEYS)


def engine_figures(rows: list[dict]) -> list[str]:
    return _keyed(rows, ENGINE_KEYS)


FIGURES = {
    "bench_kernels": kernel_figures,
    "bench_preprocess": preprocess_figures,
    "sweep": sweep_figures,
    "e2e_v15": e2e_figures,
    "e2e_v15_awq": e2e_figures,
    "e2e_mini": e2e_figures,
    "e2e_v15_hf": e2e_figures,
    "engine_v15": engine_figures,
    "load_v15": load_figures,
    "tp_v15": tp_figures,
}


def bench_figures(sid: str, result: dict) -> str:
    rows = [r for r in result["rows"] if isinstance(r, dict)]
    if not rows:
        return (result.get("error") or "no rows").splitlines()[-1][:100]
    shown = ", ".join(FIGURES[sid](rows)) or f"{len(rows)} rows"
    return shown if result["complete"] else f"INCOMPLETE ({len(rows)} rows): {shown}"


def summary_lines(run: Run, sid: str) -> list[str]:
    return [line[9:] for line in run.text(sid, "out").splitlines() if line.startswith("SUMMARY: ")]


def alerts(run: Run, results: dict, dry: bool) -> list[str]:
    """What must not be missed: the steps' ALERT lines, a tree without pyvl._C, and (GPU runs) a model
    benchmark whose ops fell back to the plain-torch reference."""
    found = [
        line[7:]
        for sid in run.steps
        if sid not in BENCH_STEPS
        for line in run.text(sid, "out").splitlines()
        if line.startswith("ALERT: ")
    ]
    tree = run.work / "src" / "pyvl"
    if tree.is_dir() and not glob.glob(str(tree / "_C*.so")):
        found.append(
            "no pyvl._C in the tree the steps imported (no build, no wheel): the Triton kernels ran, "
            "CUDA preprocessing and the native resize did not"
        )
    for sid in () if dry else MODEL_STEPS:
        setup = results[sid].get("setup")
        ops = setup.get("ops") if isinstance(setup, dict) else None
        reference = (
            sorted(op for op, backend in ops.items() if backend == "reference")
            if isinstance(ops, dict)
            else []
        )
        if reference:
            found.append(f"{sid} ran the REFERENCE ops for: {', '.join(reference)}")
    return found


def print_table(run: Run, results: dict, counts: dict, found: list[str]) -> None:
    env = os.environ
    print()
    print(
        f"=== device check summary: {env['MODE']}; build in use: {env['BUILD'] or 'none'}; "
        f"{env['ELAPSED']} s of {env['BUDGET']} s"
    )
    for line in found:
        print(f"!!! {line}")
    print(f"{'step':<17} {'status':<8} {'s':>4}  key figures / note")
    for sid in env["STEPS"].split():
        status, secs, note = run.step(sid)
        if sid in counts and status != "skipped":
            c = counts[sid]
            shown = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
        elif sid in results:
            shown = "" if status == "skipped" else bench_figures(sid, results[sid])
        else:
            shown = "; ".join(summary_lines(run, sid))[:120]
        print(f"{sid:<17} {status:<8} {secs:>4}  {'; '.join(x for x in (shown, note) if x)}")


def main() -> int:
    work, out = Path(os.environ["WORK"]), Path(os.environ["OUT_DIR"])
    run, collect = Run(work), load_collect()
    results = {sid: bench_result(run, sid, collect) for sid in BENCH_STEPS}
    write_json_files(out, results)
    counts = merge_junit(run, out)
    print_table(run, results, counts, alerts(run, results, os.environ.get("DRY") == "1"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
