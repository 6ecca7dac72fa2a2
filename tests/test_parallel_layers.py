"""The collectives and the sharded model, with the ranks as threads of this process (gloo over a shared in-memory
store): each rank's vision features, prefill logits and decode logits against the single-process model, on
checkpoints whose heads, FFN and vocabulary split unevenly; and a rank reads only its slices of the files.

Every thread is joined with a timeout and every collective has one (a failing rank cannot hang the test).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import GOLDEN
from parallel_models import tp_config, uneven_groups_config, write_checkpoint

import pyvl.parallel.load as shard_load
from pyvl.config import load_config
from pyvl.engine.runner import DecodeRow, ModelRunner
from pyvl.kv_cache import BLOCK_SIZE, PagedKVCache
from pyvl.loader import load_model
from pyvl.ops import resolve_ops
from pyvl.parallel.comm import Comm
from pyvl.parallel.load import load_shard
from pyvl.parallel.plan import ShardPlan

REL_TOL = 1e-4  # the bound: TP=N logits within 1e-4 relative of TP=1
JOIN_S = 120


def run_ranks(world: int, fn, timeout: timedelta = timedelta(seconds=60)) -> list:
    """fn(comm) on ``world`` threads, one rank each; their results in rank order (a rank's error re-raised)."""
    store = dist.HashStore()
    results: list = [None] * world
    errors: list = [None] * world

    def rank_main(rank: int) -> None:
        try:
            results[rank] = fn(Comm(store, rank, world, torch.device("cpu"), timeout))
        except BaseException as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "a rank did not finish"
    for err in errors:
        if err is not None:
            raise err
    return results


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_collectives():
    def body(comm: Comm):
        r = comm.rank
        total = comm.all_reduce(torch.full((2, 3), float(r + 1)))
        # uneven last-dimension slices: rank r holds r + 1 columns valued r
        gathered = comm.all_gather_last(torch.full((2, r + 1), float(r)), (1, 2, 3))
        broadcast = comm.broadcast(torch.full((4,), float(r)))
        if r == 0:
            comm.send(("cmd", (7, [torch.arange(5.0), (2, torch.ones(2, 2, dtype=torch.int32))], "x")))
            message = None
        else:
            message = comm.receive()
        return total, gathered, broadcast, message

    results = run_ranks(3, body)
    for rank, (total, gathered, broadcast, message) in enumerate(results):
        assert (total == 6).all()
        assert gathered.tolist() == [[0, 1, 1, 2, 2, 2]] * 2
        assert (broadcast == 0).all()
        if rank:
            name, (seven, (values, (two, ones)), x) = message
            assert (name, seven, two, x) == ("cmd", 7, 2, "x")
            assert values.tolist() == [0, 1, 2, 3, 4] and ones.dtype == torch.int32 and ones.sum() == 4


def test_a_rank_that_never_answers_fails_the_call_instead_of_hanging():
    def body(comm: Comm):
        if comm.rank == 0:
            with pytest.raises(RuntimeError):
                comm.all_reduce(torch.ones(3))  # rank 1 never joins this call: the 1 s timeout ends it
        return comm.rank

    assert run_ranks(2, body, timeout=timedelta(seconds=1)) == [0, 1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        "tp": write_checkpoint(root / "tp", tp_config()),
        "uneven": write_checkpoint(root / "uneven", uneven_groups_config()),
        "golden-v15": GOLDEN / "v15" / "checkpoint",
    }


def forward_all(model, tiles: torch.Tensor, ids: list[int], img_id: int):
    """Features of ``tiles``; logits of every position of a prompt with those features spliced at its first
    <IMG_CONTEXT> run (ids), through the engine's runner; then logits of two batched decode steps."""
    llm = model.cfg.llm
    n_kv = model.language_model.model.layers[0].attention.n_kv
    cache = PagedKVCache(llm.num_hidden_layers, 16, n_kv, llm.head_dim, torch.float32, "cpu")
    runner = ModelRunner(model, cache, max_num_seqs=2, max_blocks=16, cuda_graphs=False)
    rows = runner.encode_image(tiles)
    offset = ids.index(img_id)
    table = list(range(-(-len(ids) // BLOCK_SIZE) + 1))
    prefill = runner.prefill(
        ids, 0, [(offset, rows)], table, list(range(len(ids))), len(ids), every_position=True
    )
    step = [DecodeRow(ids[-1], len(ids), table, len(ids), len(ids) + 1)]
    decode = runner.decode(step + [DecodeRow(5, 0, [15], 15 * BLOCK_SIZE, 1)])  # a second row, its own block
    return rows, prefill, decode


@pytest.mark.parametrize("name, world", [("tp", 2), ("tp", 3), ("uneven", 2), ("golden-v15", 3)])
def test_each_rank_computes_what_one_process_computes(checkpoints, name, world):
    folder = checkpoints[name]
    cfg = load_config(folder)
    ops = resolve_ops("reference", "cpu")
    tiles = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    img_id = 1002  # <IMG_CONTEXT> in the demo and golden tokenizers
    ids = [1, 5, 9, 1000] + [img_id] * 2 * cfg.num_image_token + [1001, 33, 17, 92, 998]
    expected = forward_all(
        load_model(cfg, ops, folder, torch.device("cpu"), torch.float32), tiles, ids, img_id
    )

    def body(comm: Comm):
        plan = ShardPlan.for_rank(cfg, comm.rank, comm.world)
        model = load_shard(cfg, ops, folder, plan, comm, torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            return forward_all(model, tiles, ids, img_id)

    for rank, outputs in enumerate(run_ranks(world, body)):
        for what, got, want in zip(("features", "prefill logits", "decode logits"), outputs, expected):
            assert got.shape == want.shape, f"rank {rank} {what}"
            assert rel_err(got, want) <= REL_TOL, f"rank {rank} {what}: {rel_err(got, want):.2e}"
        assert outputs[1].argmax(-1).tolist() == expected[1].argmax(-1).tolist()


def test_a_rank_reads_only_its_slices(checkpoints, monkeypatch):
    """The bytes read from the files are exactly the bytes the plan says the rank holds: no tensor is read whole
    to be cut afterwards (the replicated ones excepted, which the rank holds whole)."""
    folder = checkpoints["tp"]
    cfg = load_config(folder)
    read = []
    real_open = shard_load.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_slice(self, name):
            view = self.file.get_slice(name)

            class Slice:
                def __getitem__(self, index):
                    part = view[index]
                    read.append(part.numel() * part.element_size())
                    return part

            return Slice()

    monkeypatch.setattr(shard_load, "safe_open", Recording)
    plan = ShardPlan.for_rank(cfg, 1, 3)
    load_shard(cfg, resolve_ops("reference", "cpu"), folder, plan, None, torch.device("cpu"), torch.float32)
    assert sum(read) == plan.nbytes(cfg, torch.bfloat16)  # the files are bf16
    assert sum(read) < 0.6 * ShardPlan.for_rank(cfg, 0, 1).nbytes(cfg, torch.bfloat16)
