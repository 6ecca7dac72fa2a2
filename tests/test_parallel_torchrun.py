"""The README's torchrun commands, run on the CPU: one process per rank started by torchrun (not by pyvl), as on
two nodes (two torchrun launchers, one process each, meeting at a rendezvous address), give rank 0 the same
answer as one process; a world size other than ``--tensor-parallel-size`` is a clear error on every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import GOLDEN

V15 = GOLDEN / "v15" / "checkpoint"
CHAT = ["-m", "pyvl", "chat", "--model", str(V15), "--dtype", "float32", "--device", "cpu"]
CHAT += ["--max-new-tokens", "5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(node_rank: int, nnodes: int, nproc: int, port: int, tp: int) -> subprocess.Popen:
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(node_rank),
    ]
    run += ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    env = dict(os.environ, PYTHONSAFEPATH="1")
    return subprocess.Popen(
        run + CHAT + ["--tensor-parallel-size", str(tp), "Hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def test_two_nodes_answer_as_one_process():
    alone = subprocess.run([sys.executable, *CHAT, "Hi"], capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0, alone.stderr
    port = _free_port()
    nodes = [_torchrun(rank, 2, 1, port, 2) for rank in (0, 1)]
    (rc0, out0, err0), (rc1, out1, err1) = [_finish(p) for p in nodes]
    assert rc0 == 0 and rc1 == 0, err0 + err1
    assert out0 == alone.stdout  # rank 0 answers
    assert out1 == ""  # rank 1 served rank 0, then its process exited without printing


def test_a_world_size_other_than_the_tensor_parallel_size_is_refused():
    rc, out, err = _finish(_torchrun(0, 1, 2, _free_port(), 3))
    assert rc != 0 and out == ""
    assert "torchrun started 2 processes, but tensor_parallel_size is 3" in err
