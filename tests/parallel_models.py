"""Checkpoints for the tensor-parallel tests, in the released format (pyvl.demo's writer, the demo tokenizer).

``TP_CONFIG``: the shapes that make tensor parallelism's corner cases happen at TP=2 and TP=3: 5 ViT heads (odd:
3 + 2, 2 + 2 + 1), InternViT-6B style with QK-norm (normalised across ranks), 6 query heads over 2 KV heads
(at TP=3 the middle rank's two query heads read different KV heads), FFN and MLP widths and a vocabulary (1009,
prime) that neither size divides. ``uneven_groups_config``: 6 query heads over 3 KV heads, whose ranks at TP=2
read their KV heads unevenly (2 + 1), so KV heads are repeated. And helpers that find worker processes.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

from pyvl.demo import demo_config_dict, write_demo_checkpoint

__all__ = ["tp_config", "uneven_groups_config", "write_checkpoint", "wait_gone", "worker_children"]


def tp_config() -> dict:
    d = demo_config_dict()
    d["ps_version"] = "v1"
    d["hidden_size"] = 96
    d["vision_config"].update(
        hidden_size=80,  # 5 heads of 16
        num_attention_heads=5,
        intermediate_size=100,
        norm_type="rms_norm",
        qkv_bias=False,
        qk_normalization=True,
    )
    d["llm_config"].update(
        hidden_size=96,  # 6 query heads of 16
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=130,
        num_hidden_layers=2,
        max_position_embeddings=512,
    )
    return d


def uneven_groups_config() -> dict:
    d = tp_config()
    d["llm_config"]["num_key_value_heads"] = 3
    return d


def write_checkpoint(folder: Path, config: dict, seed: int = 0) -> Path:
    write_demo_checkpoint(folder, seed=seed, config=copy.deepcopy(config))
    return folder


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reparented zombie waits on a reaper that may never come)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    """The pids still alive after ``timeout`` seconds (none, normally)."""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def worker_children() -> list[int]:
    """Live tensor-parallel workers spawned by this process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _alive(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if ppid == os.getpid() and b"pyvl.parallel.worker" in cmdline:
            found.append(int(entry))
    return found
