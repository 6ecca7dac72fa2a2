"""The image-feature cache: ViT + projector outputs keyed by image digest (pyvl.image_input makes the digests).

The same digest keys the feature cache here and the image tokens' content keys in blocks.py.

Thread safety: the engine thread alone reads and writes it, except ``in`` (a dict lookup), which any thread may
use to ask whether an image needs tiling; its answer may be stale a moment later, which only costs a tiling.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from pyvl.errors import PyvlError

__all__ = ["DIGEST_BYTES", "FeatureCache"]

DIGEST_BYTES = 16  # an image digest's length (pyvl.image_input makes them)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class FeatureCache:
    """An LRU of feature tensors (any device) keyed by digest, holding at most ``max_bytes`` of tensor data.

    A tensor larger than the whole bound is not cached. ``hits`` and ``misses`` count ``get`` calls."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise PyvlError(f"FeatureCache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # least recently used first
        self._nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes) -> torch.Tensor | None:
        """The cached features (now the most recently used), or None."""
        features = self._entries.get(digest)
        if features is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(digest)
        return features

    def put(self, digest: bytes, features: torch.Tensor) -> bool:
        """Cache features under digest (replacing an older entry), evicting the least recently used as needed.
        Returns False, caching nothing, when the tensor alone exceeds max_bytes."""
        size = _nbytes(features)
        if size > self.max_bytes:
            return False
        old = self._entries.pop(digest, None)
        if old is not None:
            self._nbytes -= _nbytes(old)
        while self._nbytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._nbytes -= _nbytes(evicted)
        self._entries[digest] = features.detach()
        self._nbytes += size
        return True

    def __contains__(self, digest: bytes) -> bool:
        """Membership without counting a hit or miss and without refreshing the entry."""
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (numel * element_size summed)."""
        return self._nbytes

    def clear(self) -> None:
        """Drop every entry; the hit and miss counters keep counting."""
        self._entries.clear()
        self._nbytes = 0
