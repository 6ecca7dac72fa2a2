"""The model step of the engine: image features, a prefill chunk of one sequence, a batched decode step.

Decode runs on static buffers of ``max_num_seqs`` rows (token ids, positions, slots, block tables, lengths), so
the step itself allocates nothing, never syncs the host and never changes shape: on CUDA it is captured once per
batch bucket (1, 2, 4, ... max_num_seqs) as a CUDA graph and replayed; rows past the batch are padding (length 0,
slot -1). On the CPU, and whenever an op of the table cannot be captured, the same step runs eagerly on exactly
the rows of the batch. The block-table width (and so decode attention's split count) is fixed by the context.

Every bucket is captured by :meth:`ModelRunner.capture_graphs` when the engine is built, before any request, in
the "thread_local" capture mode: CUDA work other threads do meanwhile (another model, CUDA preprocessing) cannot
invalidate it. A capture that fails anyway leaves decode eager, with a logged warning and the reason in
:attr:`ModelRunner.graphs`. Everything a graph reads (the static buffers, the weights, the KV pool, the rotary
table of the configured base) lives as long as the runner.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..kv_cache import PagedBatch, PagedKVCache
from ..models.vlm import InternVLChatModel

__all__ = ["DecodeRow", "GraphReport", "ModelRunner"]

log = logging.getLogger("pyvl")

# Ops that a CUDA graph can capture only as Triton kernels (the references sync the host).
_CAPTURED_OPS = ("store_kv", "paged_decode_attention")


@dataclass(frozen=True)
class DecodeRow:
    token: int  # the token fed this step
    position: int  # its position (= tokens already in the cache)
    block_table: list[int]  # the sequence's own list, not a copy: read at once, never kept
    slot: int
    rope_length: int  # the sequence's length after this token


@dataclass
class GraphReport:
    """How decode runs: CUDA-graph replays of the captured batch buckets, or eagerly (and why)."""

    captured: list[int] = field(default_factory=list)  # batch sizes with a graph, ascending
    capture_s: float = 0.0  # wall time of capturing them all (warm-up, Triton compiles included)
    eager_reason: str | None = None  # why decode runs eagerly; None when graphs serve it

    @property
    def enabled(self) -> bool:
        return bool(self.captured)

    def as_dict(self) -> dict:
        return {
            "enabled": self.enabled,
            "captured": list(self.captured),
            "capture_s": round(self.capture_s, 3),
            "eager_reason": self.eager_reason,
        }


def _buckets(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


class ModelRunner:
    def __init__(
        self,
        model: InternVLChatModel,
        cache: PagedKVCache,
        max_num_seqs: int,
        max_blocks: int,
        cuda_graphs: bool,
    ):
        self.model = model
        self.lm = model.language_model
        self.cache = cache
        self.device = model.device
        self.max_blocks = max_blocks
        rows = max_num_seqs
        # The static buffers have host twins, written in place each step: on CUDA pinned, and sent with one copy
        # per buffer (asynchronous; the step's read of its new tokens orders them); on the CPU the twins are the
        # buffers themselves.
        pin = self.device.type == "cuda"
        host_ids = torch.zeros(3, rows, dtype=torch.long, pin_memory=pin)  # token, position, slot
        host_ids[2] = -1
        host_lens = torch.zeros(rows, dtype=torch.int32, pin_memory=pin)
        host_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, pin_memory=pin)
        self._host = (host_ids, host_lens, host_tables)
        self._ids_np, self._lens_np, self._tables_np = (t.numpy() for t in self._host)
        self._table_rows: list[list[int] | None] = [None] * rows  # the block table each host row holds
        self._padded_from = 0  # rows from here on are padding in the host twins
        self.ids, self.context_lens, self.block_tables = (t.to(self.device) for t in self._host)
        self.tokens, self.positions, self.slots = self.ids  # views
        self.buckets = _buckets(max_num_seqs)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graphs = GraphReport(eager_reason=self._why_eager(cuda_graphs))
        # Past max_position_embeddings dynamic NTK gives each length its own rotary base: such steps run eagerly.
        rope = self.lm.rotary
        self._static_rope_up_to = rope.max_positions if rope.scaling == "dynamic" else None

    def _why_eager(self, cuda_graphs: bool) -> str | None:
        if not cuda_graphs:
            return "cuda_graphs=False"
        if self.device.type != "cuda":
            return f"no CUDA graphs on {self.device.type}"
        uncapturable = [op for op in _CAPTURED_OPS if self.model.ops.backends[op] != "triton"]
        if uncapturable:
            return f"ops {uncapturable} do not run the Triton backend (the references sync the host)"
        return None

    def encode_image(self, tiles: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] tiles -> feature rows [N * 256, H] (ViT + pixel shuffle + mlp1)."""
        feats = self.model.extract_feature(tiles)
        return feats.reshape(-1, feats.shape[-1])

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
        """Tokens [start, start + n) of one sequence (K/V of the earlier ones already cached); image_rows:
        (offset in the chunk, feature rows) spliced over the <IMG_CONTEXT> embeddings. float32 logits [V] of
        the chunk's last token, or [n, V] of every token with ``every_position``."""
        n = len(token_ids)
        embeds = self.lm.embed(torch.tensor(token_ids, device=self.device)[None])  # (1, n, H)
        for offset, rows in image_rows:
            embeds[0, offset : offset + rows.shape[0]] = rows.to(embeds.dtype)
        positions = torch.arange(start, start + n, device=self.device)[None]
        batch = PagedBatch(
            self.cache,
            torch.tensor(slots, device=self.device),
            torch.tensor(block_table, dtype=torch.int32, device=self.device)[None],
            context_len=start + n,
        )
        hidden = self.lm(embeds, positions, batch, rope_lengths=[rope_length])
        return self.lm.lm_head(hidden[0] if every_position else hidden[0, -1])

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of slots ``src`` into slots ``dst`` in every layer (the tokens of a reused tail)."""
        self.cache.copy_slots(src, dst)

    # ---- decode --------------------------------------------------------------------------------------------
    def decode(self, rows: list[DecodeRow]) -> torch.Tensor:
        """One new token for each row: float32 logits [len(rows), V] (:meth:`fill` then :meth:`forward`)."""
        self.fill(rows)
        return self.forward(rows)

    def forward(self, rows: list[DecodeRow]) -> torch.Tensor:
        """The decode step over the rows :meth:`fill` wrote: a graph replay, or eagerly."""
        b = len(rows)
        static_rope = (
            self._static_rope_up_to is None or max(r.rope_length for r in rows) <= self._static_rope_up_to
        )
        bucket = next(size for size in self.buckets if size >= b)
        if static_rope and bucket in self._graphs:
            graph, logits = self._graphs[bucket]
            graph.replay()
            return logits[:b]
        return self._step(b, [r.rope_length for r in rows])

    def fill(self, rows: list[DecodeRow]) -> None:
        """The static buffers from the rows; rows past them become padding (slot -1, length 0). The per-row
        work is a few stores into the host twins: a row's block table is rewritten only when it changed."""
        b = len(rows)
        ids, lens, tables = self._ids_np, self._lens_np, self._tables_np
        tables_changed = False
        for i, r in enumerate(rows):
            ids[0, i], ids[1, i], ids[2, i], lens[i] = r.token, r.position, r.slot, r.position + 1
            if self._table_rows[i] != r.block_table:  # list equality: a C loop over the row's block ids
                tables[i, : len(r.block_table)] = r.block_table
                self._table_rows[i] = list(r.block_table)
                tables_changed = True
        if b < self._padded_from:  # rows that ran last step and do not now
            ids[2, b : self._padded_from], lens[b : self._padded_from] = -1, 0
        self._padded_from = b
        if self.ids is not self._host[0]:  # on the CPU the buffers are the twins
            host_ids, host_lens, host_tables = self._host
            self.ids.copy_(host_ids, non_blocking=True)
            self.context_lens.copy_(host_lens, non_blocking=True)
            if tables_changed:
                self.block_tables.copy_(host_tables, non_blocking=True)

    def _step(self, b: int, rope_lengths: list[int] | None) -> torch.Tensor:
        """The capture-ready step over the first b rows of the static buffers."""
        batch = PagedBatch(
            self.cache, self.slots[:b], self.block_tables[:b], context_lens=self.context_lens[:b]
        )
        embeds = self.lm.embed(self.tokens[:b, None])  # (b, 1, H)
        hidden = self.lm(embeds, self.positions[:b, None], batch, rope_lengths=rope_lengths)
        return self.lm.lm_head(hidden[:, -1])

    def capture_graphs(self) -> GraphReport:
        """Capture the decode step of every bucket (largest first, so the smaller ones reuse its memory pool).
        Any failure leaves every bucket eager, with a warning: a half-captured set would hide which one broke."""
        if self.graphs.eager_reason is not None or self._graphs:
            return self.graphs
        t0 = time.perf_counter()
        pool = None
        try:
            for bucket in sorted(self.buckets, reverse=True):
                graph, logits = self._capture(bucket, pool)
                pool = graph.pool()
                self._graphs[bucket] = (graph, logits)
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # decode must keep working: eager is slower, never wrong
            self._graphs.clear()
            self.graphs.eager_reason = f"graph capture failed: {type(exc).__name__}: {str(exc)[:300]}"
            log.warning(
                "pyvl: CUDA-graph capture of the decode step failed; decoding eagerly (%s)",
                self.graphs.eager_reason,
            )
        self.graphs.captured = sorted(self._graphs)
        self.graphs.capture_s = time.perf_counter() - t0
        return self.graphs

    def _capture(self, bucket: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Every length is within max_position_embeddings here, so one rotary base serves every row: any
        # length <= the limit stands for them without reading the device. The rows are padding (length 0).
        rope_lengths = [1] * bucket
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._step(bucket, rope_lengths)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls during the capture cannot invalidate it
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            logits = self._step(bucket, rope_lengths)
        return graph, logits
