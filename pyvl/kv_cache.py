"""The paged KV cache: every layer's keys and values in two tensors of fixed-size blocks, allocated once.

Layout: k, v: [layers, num_blocks, kv_heads, block_size, head_dim], so one layer's pool ``k[layer]`` is
[num_blocks, Hkv, block_size, D] (contiguous) and a block's keys of one head are block_size x D contiguous rows.
Token ``offset`` of block ``b`` lives at slot ``b * block_size + offset``; which blocks a sequence owns is the
block manager's business (``pyvl.engine.blocks``). Keys are stored after RoPE, as the original does, so
decoding never recomputes the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["BLOCK_SIZE", "PagedKVCache", "PagedBatch"]

BLOCK_SIZE = 64  # one Triton key tile (BLOCK_N) never straddles two blocks; one 448px tile = 4 blocks


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_size: int = BLOCK_SIZE,
    ):
        if num_blocks < 1:
            raise ConfigError(
                f"the KV cache needs at least one block of {block_size} tokens, got {num_blocks}"
            )
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        try:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            raise ConfigError(
                f"cannot allocate a KV cache of {num_blocks} blocks x {block_size} tokens on "
                f"{device}: {exc}; pass a smaller kv_cache_gb"
            ) from None
        self.num_blocks = num_blocks
        self.block_size = block_size

    def commit(self) -> None:
        """Write every page of the pool (zeros), so that the process holds its memory from now on: on the CPU an
        allocation's pages are only faulted in when first written, and a server's memory would creep up to the
        pool's size under traffic. It clears the pool: call it before any request."""
        self.k.zero_()
        self.v.zero_()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of slots ``src`` into slots ``dst`` in every layer (the tokens of a reused tail)."""
        src_t = torch.tensor(src, device=self.k.device)
        dst_t = torch.tensor(dst, device=self.k.device)
        for pool in (self.k, self.v):  # (block, offset) index pairs; both sides index the same way
            pool[:, dst_t // self.block_size, :, dst_t % self.block_size] = pool[
                :, src_t // self.block_size, :, src_t % self.block_size
            ]


@dataclass
class PagedBatch:
    """Where one forward writes and reads K/V: the pool, each new token's slot, and each row's block table.

    Prefill: one sequence (B = 1), ``context_len`` its total length after the new tokens (an int).
    Decode: B rows of one new token each, ``context_lens`` [B] int32 on the device (0 = an idle padding row).
    ``slot_mapping`` [B * S] int64 on the device, -1 for padding rows; ``block_tables`` [B, max_blocks] int32.
    """

    cache: PagedKVCache
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_len: int = 0
    context_lens: torch.Tensor | None = None

    @property
    def decode(self) -> bool:
        return self.context_lens is not None

    @classmethod
    def contiguous_prefill(cls, cache: PagedKVCache, num_tokens: int) -> PagedBatch:
        """The first ``num_tokens`` tokens of a sequence owning blocks 0, 1, ... of ``cache`` (a private cache)."""
        device = cache.k.device
        n_blocks = -(-num_tokens // cache.block_size)
        if n_blocks > cache.num_blocks:
            raise ValueError(f"{num_tokens} tokens need {n_blocks} blocks; the cache has {cache.num_blocks}")
        return cls(
            cache,
            torch.arange(num_tokens, device=device),
            torch.arange(n_blocks, dtype=torch.int32, device=device)[None],
            context_len=num_tokens,
        )
