"""Seeded fuzz test of the loader: mutated golden checkpoints, loaded in a subprocess (a crash or hang fails).

Every mutant (see tests/fuzz_loader_worker.py) must be refused with a PyvlError or load a model whose outputs
equal the unmutated model's, unless the mutant is marked as a valid model pyvl cannot tell from the original
(same-size float relabel, equal-size tensors swapped, a valid config value, a key left to its default).
PYVL_FUZZ_N (default 200; about 15-40 s on a 2-core box) sets the number of mutants, PYVL_FUZZ_SEED the seed
(default fixed; printed on failure). One worker process runs them in order; if it dies or stops answering,
the mutant it was on counts as a crash or hang and a fresh worker carries on with the next.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

WORKER = Path(__file__).parent / "fuzz_loader_worker.py"
STARTUP_S = 120  # first answer: imports and two baseline loads on a busy 2-core machine
PER_MUTANT_S = 30


def _reader(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def run_fuzz(seed: int, n: int) -> list[dict]:
    results, i = [], 0
    while i < n:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(seed), str(i), str(n - i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
        timeout = STARTUP_S
        while i < n:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                results.append({"i": i, "outcome": "hang", "error": f"no answer within {timeout} s"})
                proc.kill()
                break
            if line is None:
                proc.wait()
                results.append(
                    {
                        "i": i,
                        "outcome": "crash",
                        "error": f"worker exited {proc.returncode}: {proc.stderr.read()[-800:]}",
                    }
                )
                break
            record = json.loads(line)
            assert record["i"] == i, record
            results.append(record)
            i, timeout = i + 1, PER_MUTANT_S
        else:
            proc.wait(timeout=60)
        i = results[-1]["i"] + 1
    return results


def failures(results: list[dict]) -> list[dict]:
    bad = []
    for r in results:
        if r["outcome"] in ("crash", "hang", "error", "compute_error"):
            bad.append(r)
        elif r["outcome"] == "changed" and not r["may_change"]:
            bad.append(r)
        elif r["outcome"] in ("same", "changed") and r["must_refuse"]:
            bad.append(r)
    return bad


def test_fuzzed_checkpoints_are_refused_or_load_unchanged():
    seed = int(os.environ.get("PYVL_FUZZ_SEED", "20261201"))
    n = int(os.environ.get("PYVL_FUZZ_N", "200"))
    results = run_fuzz(seed, n)
    counts = collections.Counter(r["outcome"] for r in results)
    bad = failures(results)
    report = "\n".join(json.dumps(r) for r in bad[:20])
    assert not bad, (
        f"PYVL_FUZZ_SEED={seed} PYVL_FUZZ_N={n}: {len(bad)} failures, outcomes {dict(counts)}\n{report}"
    )
    assert len(results) == n
    # The mix must exercise both sides: most mutants refused, some loading unchanged.
    assert counts["refused"] > n // 2 and counts["same"] > 0, counts


if __name__ == "__main__":  # python tests/test_fuzz_loader.py SEED N -> counts as JSON
    seed, n = int(sys.argv[1]), int(sys.argv[2])
    res = run_fuzz(seed, n)
    summary = {
        "seed": seed,
        "n": n,
        "outcomes": dict(collections.Counter(r["outcome"] for r in res)),
        "changed_allowed": sum(r["outcome"] == "changed" and r.get("may_change", False) for r in res),
        "failures": failures(res),
    }
    print(json.dumps(summary, indent=1))
