"""Images keyed before preprocessing (pyvl.image_input): which inputs share a key and which never do, the tile
count from the header alone, tiles only on demand (and then exactly load_image's), tensor digests computed once."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import pyvl
from pyvl.errors import ImageError
from pyvl.image_input import Tiling, image_source, slice_digest, tensor_digest
from pyvl.ops import reference

TILING = Tiling(max_num=6)


def tile(rgb, cols, rows):
    return reference.resize_tiles(
        rgb, cols, rows, 448, True, pyvl.image.IMAGENET_MEAN, pyvl.image.IMAGENET_STD
    )


def photo(width=700, height=300, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def never(*_):
    raise AssertionError("tiled before it was asked for")


def test_each_input_kind_gives_load_images_tiles_only_when_asked(tmp_path):
    pixels = photo()
    path = tmp_path / "a.png"
    path.write_bytes(png(pixels))
    expected = pyvl.load_image(pixels, max_num=6)
    for image in (
        str(path),
        path,
        path.read_bytes(),
        bytearray(path.read_bytes()),
        Image.fromarray(pixels),
        pixels,
    ):
        lazy = image_source(image, TILING, never)  # keyed and counted without tiling
        assert lazy.num_tiles == expected.shape[0] and not lazy.prepared
        source = image_source(image, TILING, tile)
        assert torch.equal(source.tiles(), expected) and source.prepared
        assert source.tiles() is source.tiles()  # computed once


def test_who_shares_a_key(tmp_path):
    pixels = photo()
    data = png(pixels)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    key = lambda image, tiling=TILING: image_source(image, tiling, never).digest  # noqa: E731
    assert key(str(path)) == key(data) == key(memoryview(data))  # the same encoded bytes
    image = Image.fromarray(pixels)
    assert key(image) == key(image) and key(pixels) == key(pixels[:, ::-1][:, ::-1])  # the same pixels
    assert key(np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])) != key(
        pixels
    )  # 4 bytes a pixel
    assert key(data) != key(pixels)  # encoded and decoded are separate domains
    assert key(data, Tiling(max_num=12)) != key(data)  # the tiling is part of the key
    assert key(data, Tiling(max_num=6, use_thumbnail=False)) != key(data)
    changed = pixels.copy()
    changed[5, 5, 1] ^= 1
    assert key(changed) != key(pixels) and key(png(changed)) != key(data)
    assert len(key(data)) == 16


def test_a_file_rewritten_in_place_gets_a_new_key(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png(photo(seed=1)))
    before = image_source(path, TILING, never).digest
    stat = os.stat(path)
    path.write_bytes(png(photo(seed=2)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old timestamps
    assert image_source(path, TILING, never).digest != before


@pytest.mark.parametrize("size", [(1, 1), (448, 448), (449, 448), (3000, 100), (100, 3000), (1920, 1080)])
@pytest.mark.parametrize("max_num", [1, 6, 12, 40])
def test_the_tile_count_comes_from_the_header(size, max_num):
    data = png(photo(*size))
    assert (
        image_source(data, Tiling(max_num=max_num), never).num_tiles
        == pyvl.load_image(data, max_num=max_num).shape[0]
    )


def test_bad_images_are_refused_before_any_decoding(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="0 bytes"):
        image_source(b"", TILING, never)
    with pytest.raises(ImageError, match="cannot read image"):
        image_source(b"not an image at all", TILING, never)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageError, match="decompression.bomb"):
        image_source(png(photo(200, 200)), TILING, never)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ImageError, match="FIFO"):
        image_source(tmp_path / "fifo", TILING, never)
    with pytest.raises(ImageError, match="expected a path"):
        image_source(3.5, TILING, never)


def test_tensor_digests_are_remembered_until_the_tensor_changes(monkeypatch):
    import pyvl.image_input as image_input

    tiles = torch.randn(3, 3, 8, 8)
    hashed = []
    real = image_input._hasher
    monkeypatch.setattr(image_input, "_hasher", lambda *args: hashed.append(args) or real(*args))
    first = tensor_digest(tiles)
    assert tensor_digest(tiles) == first and len(hashed) == 1  # hashed once
    assert tensor_digest(tiles.clone()) == first and len(hashed) == 2  # another tensor, the same values
    tiles[2, 1, 3, 3] += 1  # in place: the memo must not answer
    assert tensor_digest(tiles) != first
    assert tensor_digest(tiles.to(torch.bfloat16)) != tensor_digest(tiles)  # stored values: the dtype counts
    assert tensor_digest(tiles.reshape(1, 9, 8, 8)) != tensor_digest(tiles)
    strided = tiles.transpose(2, 3).contiguous().transpose(2, 3)
    assert tensor_digest(strided) == tensor_digest(tiles)  # values, not memory layout
    with torch.inference_mode():  # no version counter: computed every time, still right
        frozen = torch.randn(2, 3, 8, 8)
        assert tensor_digest(frozen) == tensor_digest(frozen.clone())


def test_slices_of_one_tensor_have_their_own_keys():
    whole = tensor_digest(torch.randn(5, 3, 8, 8))
    keys = {slice_digest(whole, 0, 2), slice_digest(whole, 2, 3), slice_digest(whole, 0, 5)}
    assert len(keys) == 3 and slice_digest(whole, 0, 2) == slice_digest(whole, 0, 2)


def test_a_tensor_is_checked_with_its_digest_once():
    checked = []
    tiles = torch.randn(2, 3, 8, 8)
    assert tensor_digest(tiles, checked.append) == tensor_digest(tiles, checked.append)
    assert len(checked) == 1
    tiles[0, 0, 0, 0] = float("nan")  # a change: checked again, and a failing check remembers nothing

    def refuse(t):
        raise ValueError("not finite")

    for _ in range(2):
        with pytest.raises(ValueError):
            tensor_digest(tiles, refuse)


def test_pixels_are_keyed_in_place_with_the_byte_after_each(monkeypatch):
    import pyvl.image_input as image_input

    rgba = np.random.default_rng(3).integers(0, 256, size=(40, 30, 4), dtype=np.uint8)
    copies = []
    real = np.ascontiguousarray
    monkeypatch.setattr(
        image_input.np, "ascontiguousarray", lambda a: copies.append(a.flags.c_contiguous) or real(a)
    )
    first = image_source(rgba, TILING, never).digest
    assert copies == [True]  # the (H, 4W) rows are the array's own memory: nothing to copy
    other_alpha = rgba.copy()
    other_alpha[..., 3] ^= 1
    assert image_source(other_alpha, TILING, never).digest != first  # a miss at worst, never a shared key
    crop = np.random.default_rng(4).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)[:, 10:40]
    assert image_source(crop, TILING, never).digest == image_source(crop.copy(), TILING, never).digest
    assert torch.equal(
        image_source(rgba, TILING, tile).tiles(), pyvl.load_image(rgba[..., :3].copy(), max_num=6)
    )
