"""The model step of the engine: image features, a prefill chunk of one sequence, a batched decode step.

Decode runs on static buffers of ``max_num_seqs`` rows (token ids, positions, slots, block tables, lengths), so
the step itself allocates nothing, never syncs the host and never changes shape: on CUDA it is captured once per
batch bucket (1, 2, 4, ... max_num_seqs) as a CUDA graph and replayed; rows past the batch are padding (length 0,
slot -1). On the CPU, and whenever an op of the table cannot be captured, the same step runs eagerly on exactly
the rows of the batch. The block-table width (and so decode attention's split count) is fixed by the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv_cache import PagedBatch, PagedKVCache
from ..models.vlm import InternVLChatModel

__all__ = ["DecodeRow", "ModelRunner"]

# Ops that a CUDA graph can capture only as Triton kernels (the references sync the host).
_CAPTURED_OPS = ("store_kv", "paged_decode_attention")


@dataclass(frozen=True)
class DecodeRow:
    token: int  # the token fed this step
    position: int  # its position (= tokens already in the cache)
    block_table: list[int]
    slot: int
    rope_length: int  # the sequence's length after this token


def _buckets(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class ModelRunner:
    def __init__(self, model: InternVLChatModel, cache: PagedKVCache, max_num_seqs: int, max_blocks: int,
                 cuda_graphs: bool):
        self.model = model
        self.lm = model.language_model
        self.cache = cache
        self.device = model.device
        self.max_blocks = max_blocks
        rows = max_num_seqs
        self.tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.slots = torch.full((rows,), -1, dtype=torch.long, device=self.device)
        self.block_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=self.device)
        self.context_lens = torch.zeros(rows, dtype=torch.int32, device=self.device)
        capturable = all(model.ops.backends[op] == "triton" for op in _CAPTURED_OPS)
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and capturable
        self.buckets = _buckets(max_num_seqs)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None
        # Past max_position_embeddings dynamic NTK gives each length its own rotary base: such steps run eagerly.
        rope = self.lm.rotary
        self._static_rope_up_to = rope.max_positions if rope.scaling == "dynamic" else None

    def encode_image(self, tiles: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] tiles -> feature rows [N * 256, H] (ViT + pixel shuffle + mlp1)."""
        feats = self.model.extract_feature(tiles)
        return feats.reshape(-1, feats.shape[-1])

    def prefill(self, token_ids: list[int], start: int, image_rows: list[tuple[int, torch.Tensor]],
                block_table: list[int], slots: list[int], rope_length: int) -> torch.Tensor:
        """Tokens [start, start + n) of one sequence (K/V of the earlier ones already cached); image_rows:
        (offset in the chunk, feature rows) spliced over the <IMG_CONTEXT> embeddings. float32 logits [V] of
        the chunk's last token."""
        n = len(token_ids)
        embeds = self.lm.embed(torch.tensor(token_ids, device=self.device)[None])  # (1, n, H)
        for offset, rows in image_rows:
            embeds[0, offset:offset + rows.shape[0]] = rows.to(embeds.dtype)
        positions = torch.arange(start, start + n, device=self.device)[None]
        batch = PagedBatch(self.cache, torch.tensor(slots, device=self.device),
                           torch.tensor(block_table, dtype=torch.int32, device=self.device)[None],
                           context_len=start + n)
        hidden = self.lm(embeds, positions, batch, rope_lengths=[rope_length])
        return self.lm.lm_head(hidden[0, -1])

    # ---- decode --------------------------------------------------------------------------------------------
    def decode(self, rows: list[DecodeRow]) -> torch.Tensor:
        """One new token for each row: float32 logits [len(rows), V]."""
        b = len(rows)
        self._fill(rows)
        static_rope = self._static_rope_up_to is None or max(r.rope_length for r in rows) <= self._static_rope_up_to
        if self.use_graphs and static_rope:
            bucket = next(size for size in self.buckets if size >= b)
            graph, logits = self._graphs.get(bucket) or self._capture(bucket)
            graph.replay()
            return logits[:b]
        return self._step(b, [r.rope_length for r in rows])

    def _fill(self, rows: list[DecodeRow]) -> None:
        """The static buffers from the rows (one host-to-device copy each); rows past them become padding."""
        b, width = len(rows), self.max_blocks
        tables = torch.zeros(b, width, dtype=torch.int32)
        for i, r in enumerate(rows):
            tables[i, :len(r.block_table)] = torch.tensor(r.block_table, dtype=torch.int32)
        self.tokens[:b].copy_(torch.tensor([r.token for r in rows]), non_blocking=True)
        self.positions[:b].copy_(torch.tensor([r.position for r in rows]), non_blocking=True)
        self.slots[:b].copy_(torch.tensor([r.slot for r in rows]), non_blocking=True)
        self.block_tables[:b].copy_(tables, non_blocking=True)
        self.context_lens[:b].copy_(torch.tensor([r.position + 1 for r in rows], dtype=torch.int32),
                                    non_blocking=True)
        self.slots[b:].fill_(-1)
        self.context_lens[b:].fill_(0)

    def _step(self, b: int, rope_lengths: list[int] | None) -> torch.Tensor:
        """The capture-ready step over the first b rows of the static buffers."""
        batch = PagedBatch(self.cache, self.slots[:b], self.block_tables[:b], context_lens=self.context_lens[:b])
        embeds = self.lm.embed(self.tokens[:b, None])  # (b, 1, H)
        hidden = self.lm(embeds, self.positions[:b, None], batch, rope_lengths=rope_lengths)
        return self.lm.lm_head(hidden[:, -1])

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Every length is within max_position_embeddings here, so one rotary base serves every row: any
        # length <= the limit stands for them without reading the device.
        rope_lengths = [1] * bucket
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._step(bucket, rope_lengths)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._step(bucket, rope_lengths)
        self._graph_pool = graph.pool()
        self._graphs[bucket] = (graph, logits)
        return graph, logits
