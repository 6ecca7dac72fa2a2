"""The image-feature LRU (bounded in bytes) and the image digests that key it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyvl.engine.features import FeatureCache, pixels_digest, tiles_digest
from pyvl.errors import ImageError, PyvlError

TILING = {"max_num": 12, "min_num": 1, "image_size": 448, "use_thumbnail": True}


def features(n_floats: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n_floats).to(dtype)


def test_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    cache = FeatureCache(max_bytes=40)  # room for ten float32 values
    a, b, c = features(4), features(4), features(2, torch.bfloat16)  # 16, 16 and 4 bytes
    assert cache.put(b"a", a) and cache.put(b"b", b) and cache.put(b"c", c)
    assert (len(cache), cache.nbytes) == (3, 36)
    assert torch.equal(cache.get(b"a"), a)  # a is now the most recently used
    assert cache.put(b"d", features(3))  # 12 more bytes: b, the oldest, must go
    assert b"b" not in cache and b"a" in cache and b"c" in cache
    assert cache.nbytes == 32 and cache.nbytes <= cache.max_bytes
    assert cache.put(b"e", features(10))  # exactly the bound: evicts everything else
    assert (len(cache), cache.nbytes) == (1, 40)


def test_a_tensor_larger_than_the_bound_is_not_cached():
    cache = FeatureCache(max_bytes=16)
    kept = features(2)
    cache.put(b"kept", kept)
    assert cache.put(b"big", features(5)) is False
    assert b"big" not in cache and torch.equal(cache.get(b"kept"), kept) and cache.nbytes == 8
    assert FeatureCache(0).put(b"x", features(1)) is False


def test_replacing_an_entry_counts_its_bytes_once():
    cache = FeatureCache(max_bytes=100)
    cache.put(b"a", features(10))
    newer = features(5)
    cache.put(b"a", newer)
    assert (len(cache), cache.nbytes) == (1, 20) and torch.equal(cache.get(b"a"), newer)


def test_hits_misses_and_clear():
    cache = FeatureCache(max_bytes=1 << 20)
    cache.put(b"a", features(3))
    cache.get(b"a")
    cache.get(b"a")
    cache.get(b"missing")
    assert (cache.hits, cache.misses) == (2, 1)
    assert b"a" in cache and (cache.hits, cache.misses) == (2, 1)  # membership counts nothing
    cache.clear()
    assert (len(cache), cache.nbytes) == (0, 0) and cache.get(b"a") is None and cache.misses == 2
    with pytest.raises(PyvlError):
        FeatureCache(-1)


def test_tiles_digest_depends_on_values_and_shape_not_dtype():
    tiles = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    digest = tiles_digest(tiles)
    assert len(digest) == 16
    assert tiles_digest(tiles.float()) == digest  # same values, other dtype
    assert tiles_digest(tiles.float().transpose(2, 3).contiguous().transpose(2, 3)) == digest  # other strides
    assert tiles_digest(tiles.reshape(1, 6, 8, 8)) != digest
    changed = tiles.clone()
    changed[1, 2, 7, 7] += 1
    assert tiles_digest(changed) != digest


def test_pixels_digest_depends_on_pixels_shape_and_tiling():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    digest = pixels_digest(pixels, TILING)
    assert len(digest) == 16
    assert pixels_digest(pixels.copy(), dict(reversed(list(TILING.items())))) == digest  # key order ignored
    assert pixels_digest(pixels, {**TILING, "max_num": 6}) != digest
    assert pixels_digest(pixels, {**TILING, "use_thumbnail": False}) != digest
    assert pixels_digest(pixels.reshape(7, 5, 3), TILING) != digest
    changed = pixels.copy()
    changed[4, 6, 2] ^= 1
    assert pixels_digest(changed, TILING) != digest
    with pytest.raises(ImageError):
        pixels_digest(pixels.astype(np.float32), TILING)
