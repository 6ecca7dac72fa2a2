"""An image as the caller gave it, keyed and sized before any pixel is decoded: what the front door needs.

The key (a 16-byte blake3 digest) names what the model will see, so that the image-feature cache and the prefix
cache can answer before the image is decoded, resized or normalised:

    encoded file (path, bytes, a data URL)   its bytes + the tiling settings
    decoded image (PIL.Image, uint8 array)   its pixels as stored (pyvl.image.rgb_pixels: read in place where
                                             Pillow allows) + their shape and layout + the tiling settings
    tiles (a pixel_values tensor)            the tensor's bytes + dtype + shape (once per tensor: tensor_digest)

The three domains are separated, so keys of two kinds never collide. A file is read and hashed on every call, so
a file rewritten in place under the same path gets a new key and never a stale entry (reading and hashing a 20 MB
PNG from the page cache takes a few ms; decoding it, 100-400 ms).

The grid, hence the number of tiles and the prompt, comes from the image size alone, and a file's header gives
the size (Pillow reads no pixel data for that; decompression bombs are refused there). :meth:`ImageSource.tiles`
decodes, resizes and normalises on demand, so a prompt about an image whose features are cached never does.
"""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import blake3
import numpy as np
import torch
from PIL import Image

from .engine.features import DIGEST_BYTES
from .errors import ImageError
from .image import _check_size, _open_regular_file, choose_grid, open_rgb_array, rgb_pixels
from .pixels import layout

__all__ = ["DIGEST_BYTES", "Tiling", "ImageSource", "image_source", "tensor_digest", "slice_digest"]

PARALLEL_HASH_BYTES = 4 << 20
_ENCODED, _PIXELS, _TILES = b"pyvl.encoded.v1\0", b"pyvl.pixels.v1\0", b"pyvl.tiles.v2\0"


@dataclass(frozen=True)
class Tiling:
    """What turns an image into tiles besides its pixels (part of every image key)."""

    max_num: int = 12
    min_num: int = 1
    image_size: int = 448
    use_thumbnail: bool = True

    def grid(self, width: int, height: int) -> tuple[int, int]:
        return choose_grid(width, height, self.min_num, self.max_num, self.image_size)

    def num_tiles(self, width: int, height: int) -> int:
        cols, rows = self.grid(width, height)
        return cols * rows + (self.use_thumbnail and cols * rows > 1)

    def key(self) -> bytes:
        return json.dumps([self.max_num, self.min_num, self.image_size, self.use_thumbnail]).encode() + b"\0"


# What the front door hands over to tile an RGB image: (rgb [H, W, 3] uint8, cols, rows) -> tiles [N, 3, S, S].
TileFn = Callable[[np.ndarray, int, int], torch.Tensor]


class ImageSource:
    """One image of a prompt: its key, its tile count, its size in pixels (0 for tiles given as such), and its
    tiles on demand (computed at most once)."""

    def __init__(
        self, digest: bytes, num_tiles: int, load_tiles: Callable[[], torch.Tensor], pixels: int = 0
    ):
        self.digest = digest
        self.num_tiles = num_tiles
        self.pixels = pixels
        self._load_tiles = load_tiles
        self._tiles: torch.Tensor | None = None
        self._lock = threading.Lock()

    def tiles(self) -> torch.Tensor:
        """[num_tiles, 3, S, S]: decoded, resized and normalised now, or what an earlier call made."""
        with self._lock:
            if self._tiles is None:
                self._tiles = self._load_tiles()
            return self._tiles

    @property
    def prepared(self) -> bool:
        return self._tiles is not None


def _hasher(domain: bytes, nbytes: int = 0) -> blake3.blake3:
    """blake3 for ``nbytes`` of input: on every core for large inputs (a 30 MB PNG: 4 ms instead of 9)."""
    return blake3.blake3(domain, max_threads=blake3.blake3.AUTO if nbytes >= PARALLEL_HASH_BYTES else 1)


def _shape_bytes(shape) -> bytes:
    return struct.pack(f"<q{len(shape)}q", len(shape), *shape)


def _encoded(data: bytes, name: str, tiling: Tiling, tile: TileFn) -> ImageSource:
    if not data:
        raise ImageError(f"{name}: got 0 bytes; expected the contents of an image file")
    h = _hasher(_ENCODED, len(data))
    h.update(tiling.key())
    h.update(data)
    width, height = _header_size(data, name)

    def load() -> torch.Tensor:
        rgb = open_rgb_array(data)
        return tile(rgb, *tiling.grid(rgb.shape[1], rgb.shape[0]))

    return ImageSource(h.digest(length=DIGEST_BYTES), tiling.num_tiles(width, height), load, width * height)


def _header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the file's header alone; the same refusals as a full decode makes first."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header, not the pixels
            _check_size(img, name)
            return img.size
    except ImageError:
        raise
    except Exception as exc:  # unknown format, corrupt header, a decompression bomb
        raise ImageError(
            f"{name}: cannot read image ({type(exc).__name__}: {exc}); expected a complete image "
            "file Pillow can decode (PNG, JPEG, ...)"
        ) from exc


def _pixel_memory(rgb: np.ndarray) -> tuple[int, memoryview]:
    """(pixel stride, the bytes that hold ``rgb``'s pixels row after row): 3 bytes a pixel, or 4 with the byte
    after each pixel (Pillow's padding, or an alpha: it is hashed too, so two images that differ only there get
    two keys, a cache miss at worst, never a shared one). No copy unless the rows are apart (a crop)."""
    found = layout(rgb.shape, rgb.strides)
    if found is None:  # not a layout rgb_pixels returns; packed first
        rgb = np.ascontiguousarray(rgb)
        found = (3 * rgb.shape[1], 3)
    row, pixel = found
    height, width = rgb.shape[:2]
    rows = np.lib.stride_tricks.as_strided(
        rgb, shape=(height, width * pixel), strides=(row, 1), writeable=False
    )
    return pixel, memoryview(np.ascontiguousarray(rows)).cast("B")


def _decoded(image, tiling: Tiling, tile: TileFn) -> ImageSource:
    rgb = rgb_pixels(image)  # read once, in place where Pillow allows: hashed now, tiled from it on a miss
    pixel, memory = _pixel_memory(rgb)
    h = _hasher(_PIXELS, memory.nbytes)
    h.update(tiling.key())
    h.update(_shape_bytes((*rgb.shape, pixel)))
    h.update(memory)
    height, width = rgb.shape[:2]
    return ImageSource(
        h.digest(length=DIGEST_BYTES),
        tiling.num_tiles(width, height),
        lambda: tile(rgb, *tiling.grid(width, height)),
        width * height,
    )


def image_source(image, tiling: Tiling, tile: TileFn) -> ImageSource:
    """An encoded image (a path, bytes) or a decoded one (a PIL image, a uint8 array), keyed and sized now,
    tiled by ``tile`` when :meth:`ImageSource.tiles` is first called."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        name = f"image file {path!r}"
        with _open_regular_file(path, name) as f:
            return _encoded(f.read(), name, tiling, tile)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return _encoded(data, f"image bytes ({len(data)} bytes)", tiling, tile)
    if isinstance(image, (Image.Image, np.ndarray)):
        return _decoded(image, tiling, tile)
    raise ImageError(
        f"image of type {type(image).__name__}: expected a path, bytes, PIL.Image.Image or uint8 numpy array"
    )


# ---- tiles given as a tensor ---------------------------------------------------------------------------------
_memo_lock = threading.Lock()
_memo: dict[int, tuple[weakref.ref, tuple, bytes]] = {}  # id(tensor) -> (the tensor, its state, digest)


def _state(t: torch.Tensor) -> tuple | None:
    """What must be unchanged for a memoised digest to hold; None when it cannot be known (inference tensors
    have no version counter), and then the digest is computed every time."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device


def _forget(key: int) -> None:
    with _memo_lock:
        _memo.pop(key, None)


def tensor_digest(tiles: torch.Tensor, check: Callable[[torch.Tensor], None] = lambda t: None) -> bytes:
    """Digest of a tiles tensor's values as stored (dtype and shape included; any device), after ``check(tiles)``
    (which raises on bad values). Both are remembered per tensor while it lives unmodified, so the original API's
    repeated ``chat(pixel_values, ...)`` checks and hashes it once."""
    state = _state(tiles)
    key = id(tiles)
    with _memo_lock:
        entry = _memo.get(key)
        if entry is not None and state is not None and entry[0]() is tiles and entry[1] == state:
            return entry[2]
    check(tiles)
    host = tiles.detach().to("cpu").contiguous()  # one device-to-host copy, in the tensor's own dtype
    h = _hasher(_TILES, host.numel() * host.element_size())
    h.update(str(host.dtype).encode() + b"\0")
    h.update(_shape_bytes(host.shape))
    h.update(memoryview(host.view(torch.uint8).numpy()).cast("B") if host.numel() else b"")
    digest = h.digest(length=DIGEST_BYTES)
    if state is not None:
        with _memo_lock:
            _memo[key] = (weakref.ref(tiles, lambda _, key=key: _forget(key)), state, digest)
    return digest


def slice_digest(whole: bytes, start: int, count: int) -> bytes:
    """The key of tiles [start, start + count) of a tensor whose digest is ``whole``."""
    return blake3.blake3(whole + struct.pack("<qq", start, count)).digest(length=DIGEST_BYTES)
