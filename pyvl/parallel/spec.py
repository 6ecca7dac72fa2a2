"""What every rank of a tensor-parallel group loads: the same settings, sent to the workers as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, load_config
from ..models.vlm import InternVLChatModel
from ..ops import Ops, resolve_ops
from .comm import Comm
from .plan import ShardPlan

__all__ = ["ShardSpec"]


@dataclass(frozen=True)
class ShardSpec:
    """A released folder (``folder``), or random weights of a config.json dict (``config``, for benchmarks at a
    preset's size), loaded on ``device_type`` ("cpu" or "cuda": rank r takes CUDA device r, or LOCAL_RANK under
    torchrun) in ``dtype`` with the op table of ``backend``/``op_backends``."""

    device_type: str
    dtype: str  # a torch dtype's name: "float32", "bfloat16", "float16"
    backend: str = "auto"
    op_backends: dict[str, str] | None = None
    folder: str | None = None
    config: dict | None = None
    seed: int = 0  # random weights only
    timeout_s: float = 300.0  # the bound on one rank's wait for the others inside a call (pyvl.parallel.comm)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def model_config(self) -> ModelConfig:
        if self.folder is not None:
            return load_config(Path(self.folder))
        return ModelConfig.from_dict(self.config, source="random weights")

    def device(self, local_rank: int) -> torch.device:
        return torch.device("cuda", local_rank) if self.device_type == "cuda" else torch.device("cpu")

    def ops(self, device: torch.device) -> Ops:
        return resolve_ops(self.backend, device, self.op_backends, self.torch_dtype)

    def load(self, plan: ShardPlan, comm: Comm, device: torch.device) -> InternVLChatModel:
        """This rank's sharded model, from the folder's slices or random."""
        from .load import load_shard, random_shard

        cfg, ops = self.model_config(), self.ops(device)
        if self.folder is not None:
            return load_shard(cfg, ops, Path(self.folder), plan, comm, device, self.torch_dtype)
        return random_shard(cfg, ops, plan, comm, device, self.torch_dtype, self.seed)
