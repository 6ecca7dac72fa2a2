"""The image-feature cache (ViT + projector outputs) keyed by image digest, and the digests themselves.

A digest names an image's content as the model sees it, independent of the device and dtype it arrives in:
  tiles_digest(pixel_values)      the caller passed tiles: their values as float32 + their shape
  pixels_digest(pixels, tiling)   the caller passed an image: its decoded uint8 RGB pixels + shape + the tiling
                                  settings (max_num, min_num, image_size, use_thumbnail) that turn it into tiles
The same digest keys the feature cache here and the image tokens' content keys in blocks.py. The two kinds are
domain-separated, so a tiles digest never equals a pixels digest.

Thread safety: none; like the block pool, the cache is used from the one engine thread.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from pyvl.errors import ImageError, PyvlError

__all__ = ["DIGEST_BYTES", "tiles_digest", "pixels_digest", "FeatureCache"]

DIGEST_BYTES = 16


def _shape_bytes(shape) -> bytes:
    return struct.pack(f"<q{len(shape)}q", len(shape), *shape)


def tiles_digest(pixel_values: torch.Tensor) -> bytes:
    """Digest of tiles [N, 3, S, S], any dtype or device: equal float32 values and shape give equal digests."""
    values = pixel_values.detach().to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.blake2b(b"pyvl.tiles.v1\0float32\0", digest_size=DIGEST_BYTES)
    h.update(_shape_bytes(values.shape))
    h.update(memoryview(values.numpy()).cast("B"))
    return h.digest()


def pixels_digest(pixels: np.ndarray, tiling: Mapping[str, object]) -> bytes:
    """Digest of a decoded uint8 image [H, W, 3] and the tiling settings applied to it (key order ignored)."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8:
        raise ImageError(f"pixels_digest expects uint8 pixels, got {pixels.dtype}")
    h = hashlib.blake2b(b"pyvl.pixels.v1\0", digest_size=DIGEST_BYTES)
    h.update(_shape_bytes(pixels.shape))
    h.update(json.dumps(dict(tiling), sort_keys=True).encode())
    h.update(b"\0")
    h.update(memoryview(pixels).cast("B"))
    return h.digest()


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
