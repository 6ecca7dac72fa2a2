"""The engine's runner on rank 0 under tensor parallelism: every model call also runs on every worker.

:class:`DrivenRunner` has :class:`~pyvl.engine.runner.ModelRunner`'s interface. Each call that touches the model
(encoding an image, a prefill chunk, a decode step, copying KV slots, capturing the decode graphs) is sent to the
workers as a command (pyvl.parallel.launch.Cluster.run: the call's name and arguments; tiles and image-feature
rows travel as tensors) and then run here, on rank 0's shards: the workers run the same call on theirs with the
same inputs, so the collectives inside the forward meet. Only rank 0's results are used (the logits are gathered
whole on every rank; only rank 0 samples). Filling the decode buffers is host work: it is sent with the step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..engine.runner import DecodeRow, GraphReport, ModelRunner
from ..kv_cache import PagedKVCache
from ..models.vlm import InternVLChatModel

__all__ = ["DrivenRunner"]


class Commands(Protocol):
    """Where the commands go: pyvl.parallel.launch.Cluster (which makes this runner, so is not imported here)."""

    def run(self, name: str, args: tuple, local): ...


class DrivenRunner:
    def __init__(
        self,
        cluster: Commands,
        model: InternVLChatModel,
        cache: PagedKVCache,
        max_num_seqs: int,
        max_blocks: int,
        cuda_graphs: bool,
    ):
        self.cluster = cluster
        self.runner = ModelRunner(model, cache, max_num_seqs, max_blocks, cuda_graphs)
        # the workers build the same runner, on pools of the block count rank 0 chose
        cluster.run("start", (cache.num_blocks, max_num_seqs, max_blocks, cuda_graphs), lambda: None)

    @property
    def cache(self) -> PagedKVCache:
        return self.runner.cache

    @property
    def graphs(self) -> GraphReport:
        return self.runner.graphs

    def encode_image(self, tiles: torch.Tensor) -> torch.Tensor:
        model = self.runner.model
        tiles = tiles.to(model.device, model.dtype)  # what every rank's ViT reads, sent as such
        return self.cluster.run("encode_image", (tiles,), lambda: self.runner.encode_image(tiles))

    def prefill(
        self,
        token_ids: list[int],
        start: int,
        image_rows: list[tuple[int, torch.Tensor]],
        block_table: list[int],
        slots: list[int],
        rope_length: int,
        every_position: bool = False,
    ) -> torch.Tensor:
        args = (token_ids, start, image_rows, block_table, slots, rope_length, every_position)
        return self.cluster.run("prefill", args, lambda: self.runner.prefill(*args))

    def fill(self, rows: list[DecodeRow]) -> None:
        self.runner.fill(rows)

    def forward(self, rows: list[DecodeRow]) -> torch.Tensor:
        # the workers fill their buffers and step (ModelRunner.decode); rank 0 filled its own already
        return self.cluster.run("decode", (rows,), lambda: self.runner.forward(rows))

    def decode(self, rows: list[DecodeRow]) -> torch.Tensor:
        self.fill(rows)
        return self.forward(rows)

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        self.cluster.run("copy_slots", (src, dst), lambda: self.runner.copy_slots(src, dst))

    def capture_graphs(self) -> GraphReport:
        return self.cluster.run("capture_graphs", (), self.runner.capture_graphs)
