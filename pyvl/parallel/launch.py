"""Rank 0's side of a tensor-parallel group: starting it, driving it one command at a time, and ending it.

``start`` (from ``pyvl.load(..., tensor_parallel_size=N)``): rank 0 opens a TCP store on the loopback, spawns
N - 1 workers (``python -c BOOT``, pyvl.parallel.worker: a fresh interpreter, so a caller's script is never
re-run in it), waits until each has joined, builds the groups, loads its own shards while they load theirs, and
waits until each has loaded or said why not (the error re-raised here, naming the rank). Under torchrun the
processes exist already: ``join`` does the same on the store torchrun set up, and ranks > 0 never return from
pyvl.load (:func:`serve_and_exit`).

``Cluster.run`` is how the engine's runner reaches the workers (pyvl.parallel.driver): under one lock, it sends
the command (name, arguments, tensors) and then runs the same call here, so that the collectives inside meet.
Any failure of a command leaves the ranks out of step for good: the group is torn down and this and every later
call raise :class:`~pyvl.errors.WorkerError`; a rank that dies or hangs fails the call within the collective
timeout, never later.

Ending: ``close`` (the model closed, the engine shut down) sends "stop" and waits briefly for the workers to
exit; a finalizer kills any worker still alive when the Cluster is garbage-collected or the interpreter exits;
and each spawned worker exits by itself when rank 0's process is gone (its stdin pipe closes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CheckpointError, ConfigError, WorkerError
from ..loader import check_checkpoint
from ..models.vlm import InternVLChatModel
from .comm import Comm
from .driver import DrivenRunner
from .plan import ShardPlan
from .spec import ShardSpec
from .worker import BOOT, run_worker

__all__ = ["Cluster", "start", "join", "serve_and_exit", "STARTUP_TIMEOUT_S", "LOAD_TIMEOUT_S"]

STARTUP_TIMEOUT_S = 120.0  # a worker's interpreter start, torch import and connection to the store
LOAD_TIMEOUT_S = 3600.0  # every rank's shards read (V1-5 from a slow disk), and rank 0's own
_STOP_WAIT_S = 10.0  # how long ``close`` waits for the workers to exit before it kills them
_ERRORS = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}


def _end_processes(procs: list[subprocess.Popen], wait_s: float) -> None:
    """Give the workers ``wait_s`` to exit by themselves, then kill what is left and reap it."""
    deadline = time.monotonic() + wait_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()


def _exit_note(proc: subprocess.Popen) -> str:
    code = proc.poll()
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


class Cluster:
    """Rank 0's handle on its group: ``comm``, ``plan`` (rank 0's shard), the worker processes when pyvl spawned
    them, the lock that keeps commands in order, and the model rank 0 loaded (``model``)."""

    def __init__(self, store: dist.Store, world: int, procs: list[subprocess.Popen]):
        self.store, self.world, self.procs = store, world, procs
        self.comm: Comm | None = None
        self.plan: ShardPlan | None = None
        self.model: InternVLChatModel | None = None
        self.kv_heads_max = 0  # the most KV heads any rank holds: what the pool's block count is sized by
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _end_processes, procs, 0.0)

    @property
    def local_kv_heads(self) -> int:
        """The KV heads rank 0's pool holds."""
        return len(self.plan.llm.kv_heads)

    def runner(self, model, cache, max_num_seqs: int, max_blocks: int, cuda_graphs: bool) -> DrivenRunner:
        """The engine's runner on this group: every model call also runs on the workers."""
        return DrivenRunner(self, model, cache, max_num_seqs, max_blocks, cuda_graphs)

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the workers pyvl spawned (none under torchrun)."""
        return [p.pid for p in self.procs]

    # ---- start-up -------------------------------------------------------------------------------------------
    def _wait_for(self, status: str, timeout_s: float) -> None:
        """Until every worker has posted ``status`` (raise the error one posted instead, or say which died)."""
        deadline = time.monotonic() + timeout_s
        pending = list(range(1, self.world))
        while pending:
            for rank in list(pending):
                if self.store.check([f"error/{rank}"]):
                    kind, _, message = self.store.get(f"error/{rank}").decode().partition("\n")
                    raise _ERRORS.get(kind, WorkerError)(f"tensor-parallel rank {rank}: {kind}: {message}")
                if self.store.check([f"{status}/{rank}"]):
                    pending.remove(rank)
                elif self.procs and self.procs[rank - 1].poll() is not None:
                    proc = self.procs[rank - 1]
                    raise WorkerError(
                        f"tensor-parallel rank {rank} (pid {proc.pid}) {_exit_note(proc)} before it "
                        f"{status}; its output above says why"
                    )
            if pending and time.monotonic() > deadline:
                raise WorkerError(
                    f"tensor-parallel ranks {pending} were not {status} after {timeout_s:.0f} s"
                )
            time.sleep(0.01)

    def _load(self, spec: ShardSpec, rank0_device: torch.device) -> None:
        cfg = spec.model_config()
        self._wait_for("joined", STARTUP_TIMEOUT_S)
        self.comm = Comm(self.store, 0, self.world, rank0_device, timedelta(seconds=spec.timeout_s))
        self.plan = ShardPlan.for_rank(cfg, 0, self.world)
        self.kv_heads_max = max(
            len(ShardPlan.for_rank(cfg, r, self.world).llm.kv_heads) for r in range(self.world)
        )
        self.model = spec.load(self.plan, self.comm, rank0_device)  # while the workers load theirs
        self._wait_for("loaded", LOAD_TIMEOUT_S)

    # ---- serving ------------------------------------------------------------------------------------------
    def run(self, name: str, args: tuple, local):
        """Send command ``name`` (args: picklable, tensors on rank 0's device) to every worker, then return
        ``local()``, the same call on rank 0; WorkerError when the group fails or has failed."""
        with self._lock:
            if self._failure is not None:
                raise WorkerError(self._failure)
            if self._closed:
                raise WorkerError("the tensor-parallel group was closed with its model")
            try:
                self.comm.send((name, args))
                return local()
            except Exception as exc:
                self._failure = self._describe_failure(name, exc)
                self._tear_down(stop=False)
                raise WorkerError(self._failure) from exc

    def _describe_failure(self, name: str, exc: Exception) -> str:
        # a dying process closes its sockets a moment before it can be reaped: give the culprit that moment
        deadline = time.monotonic() + 1.0
        while self.procs and all(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.01)
        dead = [
            f"rank {r} (pid {p.pid}) {_exit_note(p)}"
            for r, p in enumerate(self.procs, 1)
            if p.poll() is not None
        ]
        cause = "; ".join(dead) if dead else f"{type(exc).__name__}: {str(exc)[:300]}"
        return (
            f"the tensor-parallel group failed during {name!r} ({cause}); its ranks are out of step, so the "
            "model cannot be used any more: load it again"
        )

    # ---- the end ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers and leave the group (idempotent; later commands raise WorkerError)."""
        with self._lock:
            if not self._closed:
                self._tear_down(stop=self._failure is None)

    def _tear_down(self, stop: bool) -> None:
        self._closed = True
        if stop and self.comm is not None:
            try:
                self.comm.send(("stop", ()))
            except Exception:  # a worker already gone: the kill below still ends the rest
                stop = False
        _end_processes(self.procs, _STOP_WAIT_S if stop else 0.0)
        self._finalizer.detach()
        if self.comm is not None:
            self.comm.close()


def _spawn(spec: ShardSpec, rank: int, world: int, port: int) -> subprocess.Popen:
    message = {
        "spec": spec.to_json(),
        "rank": rank,
        "world": world,
        "port": port,
        "startup_timeout_s": STARTUP_TIMEOUT_S,
    }
    env = dict(os.environ)
    if spec.device_type == "cpu":  # CPU ranks share the cores: an idle OpenMP thread must sleep, not spin
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # stdin: a pipe only this process holds the other end of; the worker exits when it closes (see worker.py)
    return subprocess.Popen(
        [sys.executable, "-c", BOOT, json.dumps(sys.path), json.dumps(message)],
        stdin=subprocess.PIPE,
        env=env,
    )


def _check_devices(spec: ShardSpec, world: int) -> None:
    if spec.device_type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(
            f"tensor_parallel_size={world} needs {world} GPUs (one per rank), but {torch.cuda.device_count()} "
            "are visible"
        )


def start(spec: ShardSpec, world: int) -> Cluster:
    """Spawn ``world - 1`` workers and load every rank's shards; rank 0's model is ``Cluster.model``.

    Nothing is left behind on failure: the workers are ended before the error propagates."""
    cfg = spec.model_config()
    ShardPlan.for_rank(cfg, 0, world)  # what can fail without a worker fails before any is started
    _check_devices(spec, world)
    if spec.folder is not None:
        check_checkpoint(Path(spec.folder), cfg)
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=STARTUP_TIMEOUT_S), wait_for_workers=False
    )
    cluster = Cluster(store, world, [])
    try:
        for rank in range(1, world):
            cluster.procs.append(_spawn(spec, rank, world, store.port))
        cluster._load(spec, spec.device(0))
    except BaseException:
        cluster._tear_down(stop=False)
        raise
    return cluster


def _torchrun_store() -> tuple[dist.Store, int, int, int]:
    store, rank, world = next(dist.rendezvous("env://"))
    return dist.PrefixStore("pyvl", store), rank, world, int(os.environ.get("LOCAL_RANK", rank))


def join(spec: ShardSpec, world: int) -> Cluster:
    """Rank 0 under torchrun: the group is torchrun's processes (WORLD_SIZE must be ``world``)."""
    store, rank, size, local_rank = _torchrun_store()
    if size != world or rank != 0:
        raise ConfigError(f"torchrun started {size} processes, but tensor_parallel_size is {world}")
    cluster = Cluster(store, world, [])
    try:
        cluster._load(spec, spec.device(local_rank))
    except BaseException:
        cluster._tear_down(stop=False)
        raise
    return cluster


def serve_and_exit(spec: ShardSpec, world: int) -> None:
    """Ranks > 0 under torchrun: load this rank's shards, serve rank 0 until it stops, then exit the process."""
    store, rank, size, local_rank = _torchrun_store()
    if size != world:
        raise ConfigError(f"torchrun started {size} processes, but tensor_parallel_size is {world}")
    raise SystemExit(run_worker(spec, store, rank, world, local_rank))
