"""No worker outlives its model, and a broken group says so: workers end on close(), garbage collection, the
interpreter's exit and when the caller is killed; a worker killed or failing to load makes rank 0 raise a
PyvlError at once (no hang) and leaves no process behind; bad sizes are refused before any process starts.

Processes are looked for by pid (/proc), each wait is bounded, and every model is closed in a finally.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import GOLDEN
from parallel_models import wait_gone, worker_children

import pyvl
from pyvl.errors import CheckpointError, ConfigError, WorkerError

V15 = GOLDEN / "v15" / "checkpoint"
GEN = dict(max_new_tokens=4)


def load(n: int = 2, **kwargs) -> pyvl.InternVLChat:
    return pyvl.load(
        V15, device="cpu", dtype="float32", backend="reference", tensor_parallel_size=n, **kwargs
    )


def test_close_ends_the_workers_and_later_calls_fail_cleanly():
    model = load(3)
    pids = model.engine.cluster.worker_pids
    assert len(pids) == 2 and sorted(worker_children()) == sorted(pids)
    assert model.chat(None, "Hello", GEN)
    model.close()
    assert wait_gone(pids) == []
    with pytest.raises(pyvl.PyvlError, match="shut down"):
        model.chat(None, "Hello", GEN)
    model.close()  # idempotent


def test_garbage_collection_ends_the_workers():
    model = load()
    model.chat(None, "Hello", GEN)  # the engine thread and its exit hook exist too
    pids = model.engine.cluster.worker_pids
    del model
    gc.collect()
    assert wait_gone(pids) == []


def _script(body: str, timeout: float = 120) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import json, sys, time
        import pyvl
        model = pyvl.load({str(V15)!r}, device="cpu", dtype="float32", backend="reference", tensor_parallel_size=2)
        model.chat(None, "Hello", dict(max_new_tokens=2))
        print(json.dumps(model.engine.cluster.worker_pids), flush=True)
    """) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_the_workers_end_with_the_interpreter():
    proc = _script("")  # the script ends without closing its model
    pids = json.loads(proc.stdout.readline())
    assert proc.wait(120) == 0
    assert wait_gone(pids) == []


def test_the_workers_end_when_the_caller_is_killed():
    proc = _script("time.sleep(300)")
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 1 and wait_gone(pids, timeout=0) == pids
        os.kill(proc.pid, signal.SIGKILL)  # no atexit, no finalizer: only the workers' own watch
        proc.wait(30)
        assert wait_gone(pids) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_worker_fails_the_model_at_once_and_takes_the_others_with_it():
    model = load(3)
    try:
        pids = model.engine.cluster.worker_pids
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(WorkerError, match=rf"rank 1 \(pid {pids[0]}\) killed by SIGKILL.*load it again"):
            model.chat(None, "Hello", GEN)
        assert wait_gone(pids) == []
        with pytest.raises(WorkerError):  # and every later call
            model.logits([1, 2, 3])
    finally:
        model.close()


def test_a_worker_that_fails_to_load_is_reported_and_ended(tmp_path, monkeypatch):
    # Workers are new interpreters that inherit the environment: a sitecustomize on their PYTHONPATH breaks
    # their safetensors reads, so rank 1 fails while rank 0 (this process) loads fine.
    (tmp_path / "sitecustomize.py").write_text(
        "import safetensors\n"
        "def broken(*args, **kwargs):\n"
        "    raise OSError('disk on fire')\n"
        "safetensors.safe_open = broken\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(CheckpointError, match=r"tensor-parallel rank 1: CheckpointError: .*disk on fire"):
        load(2)
    assert wait_gone(worker_children()) == []


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2", None])
def test_a_size_that_is_not_a_positive_int_is_refused(size):
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load(size)
    assert worker_children() == []


def test_sizes_and_devices_the_model_or_machine_cannot_take_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=5: InternViT has 4 attention heads"):
        load(5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 needs 2 GPUs.*1 are visible"):
        pyvl.load(V15, device="cuda", dtype="float32", tensor_parallel_size=2)
    with pytest.raises(
        ConfigError, match=r"device=cuda:0: with tensor_parallel_size=2 the ranks take GPUs 0..1"
    ):
        pyvl.load(V15, device="cuda:0", dtype="float32", tensor_parallel_size=2)
    assert worker_children() == []
