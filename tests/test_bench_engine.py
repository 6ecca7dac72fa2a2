"""``pyvl bench engine`` on the CPU: a preset's random weights or a folder, every row streamed as JSON lines,
one engine per setting on shared weights, and the arguments it refuses. Figures are only checked to exist."""

from __future__ import annotations

import io
import json

import pytest

from pyvl.bench import engine
from pyvl.bench.report import Report, collect
from pyvl.cli import main

KINDS = ["PNG path", "JPEG path", "PNG bytes", "JPEG bytes", "PIL.Image", "tiles tensor"]
ROWS = (
    ["cached_followup"]
    + [f"followup: {k}" for k in KINDS]
    + ["streams_8", "streams_16", "host_b1", "host_b8", "host_b16", "turn2", "decode_long"]
)


@pytest.fixture(scope="module")
def streamed():
    out = io.StringIO()
    result = engine.run(
        preset="tiny",
        device="cpu",
        repeat=1,
        photo=(896, 448),
        new_tokens=3,
        kv_cache_gb=0.05,
        long_context=600,
        report=Report(out),
    )
    return result, out.getvalue().splitlines()


def test_every_row_is_measured_and_streamed(streamed):
    result, lines = streamed
    assert [r["key"] for r in result["rows"]] == ROWS and result["notes"] == []
    for row in result["rows"]:
        assert row["baseline"] > 0 and row["engine"] > 0 and row["ratio"] > 0, row
        if row["key"].startswith("followup"):
            assert row["extra ms"] == pytest.approx(row["engine"] - row["baseline"], abs=0.02)
            assert "3 tiles vs 1" in row["figure"]
    assert "3-tile image" in result["rows"][0]["figure"]  # 2 tiles + thumbnail
    assert "600 tokens in the context" in result["rows"][-1]["figure"]
    assert (
        result["setup"]["random_weights"]
        and result["setup"]["graphs"]["eager_reason"] == "no CUDA graphs on cpu"
    )
    rebuilt = collect(lines)
    assert rebuilt.pop("complete") and rebuilt == result


def test_turn2_is_emitted_before_its_baseline_is_known(streamed):
    _, lines = streamed
    turn2 = [json.loads(line)["row"] for line in lines if '"turn2"' in line]
    assert [r["baseline"] is None for r in turn2] == [True, False]  # the engine side first, then completed
    assert turn2[0]["engine"] == turn2[1]["engine"]


def test_a_failed_figure_is_a_note_and_the_others_stay(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine, "_turn2_ms", broken)
    result = engine.run(
        preset="tiny",
        device="cpu",
        repeat=1,
        photo=(448, 448),
        new_tokens=2,
        kv_cache_gb=0.05,
        long_context=300,
    )
    assert "turn2" not in [r["key"] for r in result["rows"]] and len(result["rows"]) == len(ROWS) - 1
    assert result["notes"] == ["turn2 failed: RuntimeError: out of memory"]


def test_cli_flags(capsys):
    assert main(["bench", "engine", "--random-weights", "--model", "x"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["bench", "engine", "--preset", "tiny", "--random-weights", "--kv-cache-gb", "-1"]) == 2
    assert "positive KV pool" in capsys.readouterr().err
