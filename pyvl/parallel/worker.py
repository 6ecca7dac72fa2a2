"""A tensor-parallel worker: rank r > 0 of a group rank 0 drives. It loads its shards, then runs every command
rank 0 sends on its own ModelRunner, so the collectives inside each forward meet rank 0's; it never samples.

Started by pyvl itself (``pyvl.load(..., tensor_parallel_size=N)`` spawns ``python -c BOOT``, see
pyvl.parallel.launch) or by torchrun (then ``pyvl.load`` on rank r > 0 calls :func:`run_worker` and exits).
A spawned worker ends with its model: on rank 0's "stop", when the command channel fails (rank 0 died or
aborted the group), or when its stdin (a pipe whose other end only rank 0's process holds) reaches end of file,
i.e. the moment rank 0's process exits or is killed, whatever the way.

Status goes through the store rank 0 watches: ``joined/<rank>`` once connected, ``loaded/<rank>`` once the
shards are in, or ``error/<rank>`` ("<ErrorType>\\n<message>") when anything before that fails.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ..engine.runner import ModelRunner
from ..kv_cache import PagedKVCache
from ..models.vlm import InternVLChatModel
from .comm import Comm
from .plan import ShardPlan
from .spec import ShardSpec

__all__ = ["BOOT", "main", "run_worker"]

# The spawned interpreter takes rank 0's sys.path, so it imports the very pyvl rank 0 runs (an editable install,
# a source tree on PYTHONPATH, ...) and never a stray one from its working directory.
BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from pyvl.parallel.worker import main; main()"
)


def _exit_with_parent() -> None:
    """End this process the moment rank 0's process is gone (stdin reaches end of file)."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        finally:
            os._exit(3)

    threading.Thread(target=watch, name="pyvl-parent-watch", daemon=True).start()


def main() -> None:
    """Entry of a spawned worker: argv[2] is rank 0's JSON message (spec, rank, world, store port)."""
    import json

    message = json.loads(sys.argv[2])
    _exit_with_parent()
    spec = ShardSpec(**message["spec"])
    rank, world = message["rank"], message["world"]
    # Each rank a share of the cores: N processes of all of them would fight over them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore(
        "127.0.0.1", message["port"], None, False, timeout=timedelta(seconds=message["startup_timeout_s"])
    )
    status = run_worker(spec, store, rank, world, local_rank=rank)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # no interpreter teardown: nothing of this process is left to save


def run_worker(spec: ShardSpec, store: dist.Store, rank: int, world: int, local_rank: int) -> int:
    """Join the group, load this rank's shards, serve rank 0's commands until it stops; the exit status."""
    try:
        device = spec.device(local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store.set(f"joined/{rank}", "")
        comm = Comm(store, rank, world, device, timedelta(seconds=spec.timeout_s))
        plan = ShardPlan.for_rank(spec.model_config(), rank, world)
        model = spec.load(plan, comm, device)
        store.set(f"loaded/{rank}", "")
    except Exception as exc:
        store.set(f"error/{rank}", f"{type(exc).__name__}\n{exc}")
        return 1
    try:
        with torch.inference_mode():
            serve_commands(comm, model, plan)
        return 0
    except Exception:  # rank 0 sees the group fail and says so; the details are for the log
        traceback.print_exc()
        return 1
    finally:
        comm.close()


def serve_commands(comm: Comm, model: InternVLChatModel, plan: ShardPlan) -> None:
    """Run rank 0's commands (pyvl.parallel.driver) on this rank's runner until "stop"."""
    runner = None
    while True:
        name, args = comm.receive()
        if name == "stop":
            return
        if name == "start":  # the engine's runner, with the pool rank 0 sized (the same blocks on every rank)
            num_blocks, max_num_seqs, max_blocks, cuda_graphs = args
            llm = model.cfg.llm
            cache = PagedKVCache(
                llm.num_hidden_layers,
                num_blocks,
                len(plan.llm.kv_heads),
                llm.head_dim,
                model.dtype,
                model.device,
            )
            runner = ModelRunner(model, cache, max_num_seqs, max_blocks, cuda_graphs)
        else:
            getattr(runner, name)(*args)
