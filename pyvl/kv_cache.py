"""A preallocated KV cache: keys/values of every layer in two tensors, written in place, never regrown.

Layout: k, v: [layers, batch, kv_heads, capacity, head_dim]. Keys are stored after RoPE, as the original
does, so decoding never recomputes the prefix. ``kv_start`` [batch] counts the left-padding columns of each
row of a batched prompt (None when no row is padded).
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.kv_start: torch.Tensor | None = None
        self.capacity = capacity
        self.length = 0  # tokens committed by completed forwards

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B, Hkv, S, D] at the current length; return this layer's keys/values up to the new end."""
        end = self.length + k_new.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.k[layer, :, :, self.length:end] = k_new
        self.v[layer, :, :, self.length:end] = v_new
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n_new: int) -> None:
        """Advance the length once every layer has written its n_new tokens."""
        self.length += n_new

    @property
    def remaining(self) -> int:
        return self.capacity - self.length
