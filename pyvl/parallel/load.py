"""One rank's weights: its slices of the checkpoint (or random ones, for benchmarks), into its sharded model.

The checkpoint is first checked whole, as a single-process load checks it (keys, shapes, dtypes against the
config: pyvl.loader.check_checkpoint), and the sharded model's parameters against the plan; then each tensor's
slice is read on its own (``safe_open(...).get_slice``: the bytes of the rows or columns kept, never the whole
tensor) and copied into memory the rank owns, converted to its device and dtype. wqkv needs no regrouping: the
plan reads its rows straight into the local [q | k | v] order; w1/w3 are stacked into w13 as the loader does.
A 4-bit AWQ model's slices (whole words and groups: see plan.py) are converted to pyvl's layout as they are read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import CheckpointError
from ..loader import _READ_ERRORS, _assign, check_checkpoint, tensors_by_file
from ..models.random_weights import fill_random
from ..models.vlm import InternVLChatModel
from ..ops import Ops
from ..quant import awq
from .comm import Comm
from .layers import shard_model
from .plan import ShardPlan, Slice

__all__ = ["load_shard", "random_shard"]


def _read(f, name: str, cut: Slice) -> torch.Tensor:
    """The kept part of one tensor, as a view of the mapped file (copied by the caller)."""
    view = f.get_slice(name)
    if cut.dim is None:
        return view[:]
    pieces = [view[a:b] if cut.dim == 0 else view[:, a:b] for a, b in cut.ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=cut.dim)


def _check_plan(model: InternVLChatModel, cfg: ModelConfig, plan: ShardPlan, folder: Path) -> None:
    """The sharded model holds exactly the keys and shapes the plan reads (a mismatch is a bug in pyvl)."""
    plan_shapes = plan.shapes(cfg)
    found = {k: awq.checkpoint_shape(k, tuple(v.shape)) for k, v in model.state_dict().items()}
    missing, unexpected = set(plan_shapes) - set(found), set(found) - set(plan_shapes)
    wrong = {k for k in set(found) & set(plan_shapes) if found[k] != plan_shapes[k]}
    if missing or unexpected or wrong:
        raise AssertionError(
            f"{folder}: rank {plan.rank}'s model and shard plan disagree: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}, shapes {[(k, found[k], plan_shapes[k]) for k in sorted(wrong)]}"
        )


def load_shard(
    cfg: ModelConfig,
    ops: Ops,
    folder: Path,
    plan: ShardPlan,
    comm: Comm,
    device: torch.device,
    dtype: torch.dtype,
) -> InternVLChatModel:
    """This rank's model, filled from its slices of ``folder``; CheckpointError naming the file and key."""
    tensors = check_checkpoint(folder, cfg)
    model = shard_model(cfg, ops, plan, comm)
    _check_plan(model, cfg, plan, folder)
    cuts = plan.slices(cfg)
    for path, names in tensors_by_file(tensors).items():
        name = None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    part = _read(f, name, cuts[name])
                    if cfg.quant is not None:  # AWQ GEMM -> pyvl's rows (already in [q | k | v] order)
                        part = awq.to_rows(name, part)
                    # copy=True: the parameter owns its memory (the view above maps the file)
                    cast = dtype if part.is_floating_point() else part.dtype
                    _assign(model, name, part.to(device=device, dtype=cast, copy=True))
        except _READ_ERRORS as exc:
            raise CheckpointError(
                f"{path}: rank {plan.rank} failed while reading its slice of {name!r} ({type(exc).__name__}: {exc})"
            ) from None
    return model.eval()


def random_shard(
    cfg: ModelConfig,
    ops: Ops,
    plan: ShardPlan,
    comm: Comm,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> InternVLChatModel:
    """This rank's model with random weights (pyvl.models.random_weights), for benchmarks at a preset's size
    without a checkpoint: the shapes and the work of a real load, not its values."""
    model = shard_model(cfg, ops, plan, comm).to(dtype).to_empty(device=device)
    return fill_random(model, device, seed).eval()
