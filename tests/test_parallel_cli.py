"""Tensor parallelism on the command line: ``pyvl info --tensor-parallel-size`` (what each rank holds, from the
plan alone), ``pyvl chat --tensor-parallel-size`` (the same answer as one process), and ``pyvl bench tp`` on the
tiny preset over gloo (the code path device_check.sh runs on two GPUs)."""

from __future__ import annotations

import json

import torch
from conftest import GOLDEN
from parallel_models import worker_children

from pyvl.cli import main
from pyvl.config import load_config
from pyvl.parallel import ShardPlan

V15 = GOLDEN / "v15" / "checkpoint"


def test_info_says_what_each_rank_holds(capsys):
    assert main(["info", str(V15), "--json", "--tensor-parallel-size", "3"]) == 0
    tp = json.loads(capsys.readouterr().out)["tensor_parallel"]
    cfg = load_config(V15)
    whole = ShardPlan.for_rank(cfg, 0, 1).nbytes(cfg, torch.bfloat16)
    assert tp["size"] == 3 and [r["rank"] for r in tp["ranks"]] == [0, 1, 2]
    for rank in tp["ranks"]:
        plan = ShardPlan.for_rank(cfg, rank["rank"], 3)
        assert rank["weights_bf16_bytes"] == plan.nbytes(cfg, torch.bfloat16)
        assert rank["share_of_weights"] == round(rank["weights_bf16_bytes"] / whole, 4)
        assert rank["kv_heads"] == list(plan.llm.kv_heads)
    assert [r["query_heads"] for r in tp["ranks"]] == ["0..1", "2..2", "3..3"]  # 4 heads: 2 + 1 + 1
    assert [r["vocab"] for r in tp["ranks"]] == ["0..336", "337..672", "673..1008"]
    assert main(["info", str(V15), "--tensor-parallel-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[-2:]] == ["tp rank 0", "tp rank 1"]
    assert main(["info", str(V15), "--tensor-parallel-size", "5"]) == 2  # more ranks than heads
    assert "InternViT has 4 attention heads" in capsys.readouterr().err
    assert worker_children() == []


def test_chat_answers_as_one_process(capsys):
    args = [
        "chat",
        "--model",
        str(V15),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--max-new-tokens",
        "5",
        "Hi",
    ]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert main(args + ["--tensor-parallel-size", "2"]) == 0
    assert capsys.readouterr().out == alone
    assert worker_children() == []  # the CLI's model went with the command


def test_bench_tp_on_the_tiny_preset(capsys):
    argv = ["bench", "tp", "--preset", "tiny", "--random-weights", "--device", "cpu", "--json"]
    argv += ["--tiles", "1", "--decode-tokens", "2", "--repeat", "1"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["setup"]["sizes"] == [1, 2] and result["notes"] == []
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == {"ttft", "decode", "weights"}
    assert all(rows[k]["tp1"] > 0 and rows[k]["tp2"] > 0 for k in rows)
    assert rows["weights"]["tp2"] < rows["weights"]["tp1"]
    assert main(["bench", "tp", "--preset", "tiny", "--random-weights", "--tensor-parallel-size", "1"]) == 2
    assert worker_children() == []
