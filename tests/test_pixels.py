"""Reading decoded images' pixels (pyvl.pixels, pyvl.image.rgb_pixels): every PIL mode and array gives the pixels
and tiles it gave through convert("RGB") + np.asarray, RGB-like modes are never converted, Pillow's memory is used
in place where the installed Pillow can export it and copied once (4 bytes a pixel) otherwise, and the array
outlives the image. .ci/run also runs this file under Pillow 12.3, which takes the copy for every image.
"""

from __future__ import annotations

import gc
import io

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

import pyvl
from pyvl import pixels
from pyvl.errors import ImageError
from pyvl.image import dynamic_preprocess, open_rgb_array, pixel_values_reference, rgb_pixels

RNG = np.random.default_rng(20261203)
RGBA = RNG.integers(0, 256, (45, 61, 4), dtype=np.uint8)
MODES = [
    "RGB",
    "RGBA",
    "RGBX",
    "L",
    "LA",
    "P",
    "PA",
    "1",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "F",
    "I;16",
    "RGBa",
]
EXPORTS_IN_PLACE = (pixels.pillow_release(PIL.__version__) or (0, 0)) >= (13, 0)


def pil_image(mode: str, array: np.ndarray = RGBA) -> Image.Image:
    if mode == "I;16":  # not a conversion every supported Pillow makes
        return Image.fromarray(array[..., 0].astype(np.uint16) * 257)  # mode I;16
    rgba = Image.fromarray(array, "RGBA")
    return rgba.convert("RGB").convert(mode) if mode in ("LAB", "HSV") else rgba.convert(mode)


def as_pillow_gives_it(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def original(img: Image.Image, max_num: int) -> torch.Tensor:
    """The original pipeline on its own terms: convert("RGB"), Pillow tiles, ToTensor + Normalize."""
    tiles = dynamic_preprocess(img.convert("RGB"), 1, max_num)
    return pixel_values_reference(np.stack([np.asarray(t) for t in tiles]))


def large_rgb(width: int = 2100, height: int = 2100) -> Image.Image:
    """Over Pillow's 16 MiB block: stored in several blocks, so never exported in place."""
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_pixels_and_tiles_of_convert_rgb(mode):
    img = pil_image(mode)
    got = rgb_pixels(img)
    assert got.dtype == np.uint8 and got.shape == (45, 61, 3) and got.strides[1:] == (4, 1)
    assert np.array_equal(got, as_pillow_gives_it(img))
    want = original(img, 6)
    assert torch.equal(pyvl.load_image(img, max_num=6), want)
    assert torch.equal(pyvl.load_image(img, max_num=6, use_native=False), want)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBX"])
def test_rgb_like_modes_are_not_converted(mode, monkeypatch):
    img = pil_image(mode)
    want = as_pillow_gives_it(img)
    want_tiles = original(img, 2)

    def no_convert(self, *args, **kwargs):
        raise AssertionError(f"convert{args} called on a mode {self.mode} image")

    monkeypatch.setattr(Image.Image, "convert", no_convert)
    assert np.array_equal(rgb_pixels(img), want)
    assert torch.equal(pyvl.load_image(img, max_num=2), want_tiles)


def test_decoded_rgb_files_are_not_converted(monkeypatch):
    buffer = io.BytesIO()
    Image.fromarray(RGBA[..., :3].copy()).save(buffer, "PNG")
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: pytest.fail("convert called"))
    assert np.array_equal(open_rgb_array(buffer.getvalue()), RGBA[..., :3])


@pytest.mark.skipif(not EXPORTS_IN_PLACE, reason="Pillow < 13: every image is copied")
def test_a_one_block_image_is_read_in_place():
    img = pil_image("RGB")
    got = rgb_pixels(img)
    assert not got.flags.writeable  # the image's own memory: pyvl never writes it
    img.putpixel((3, 2), (1, 2, 3))
    assert tuple(got[2, 3]) == (1, 2, 3)


def test_a_copy_has_the_stored_layout_and_is_not_the_image():
    img = large_rgb()
    want = as_pillow_gives_it(img)
    got = rgb_pixels(img)
    assert got.strides == (4 * img.width, 4, 1) and np.array_equal(got, want)
    img.putpixel((0, 0), tuple(255 - v for v in want[0, 0]))
    assert np.array_equal(got, want)


def test_without_the_core_paste_the_public_copy_is_used(monkeypatch):
    img = large_rgb()
    want = as_pillow_gives_it(img)

    def refused(*args, **kwargs):
        raise ValueError("images do not match")

    monkeypatch.setattr(Image, "frombuffer", refused)
    got = rgb_pixels(img)
    assert got.strides[1:] == (3, 1) and np.array_equal(got, want)


@pytest.mark.parametrize("make", [pil_image, lambda _: large_rgb()], ids=["one block", "several blocks"])
def test_pixels_outlive_the_image(make):
    buffer = io.BytesIO()
    make("RGB").save(buffer, "PNG")
    want = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    got = open_rgb_array(buffer.getvalue())  # decoded, read, then the image is closed
    gc.collect()
    others = [
        Image.new("RGB", (want.shape[1], want.shape[0]), (7, 7, 7)) for _ in range(4)
    ]  # reuse freed memory
    assert np.array_equal(got, want)
    del others


def test_arrays_are_read_in_place_where_their_layout_allows():
    rgba = RGBA.copy()
    view = rgb_pixels(rgba)
    assert view.strides == (4 * 61, 4, 1) and np.shares_memory(view, rgba)
    assert np.array_equal(view, np.asarray(Image.fromarray(rgba).convert("RGB")))
    rgb_of_rgbx = rgba[..., :3]
    assert rgb_pixels(rgb_of_rgbx) is rgb_of_rgbx
    flipped = rgb_pixels(rgba[::-1])
    assert flipped.strides == (3 * 61, 3, 1) and np.array_equal(flipped, rgba[::-1, :, :3])
    gray = RGBA[..., 0]
    assert np.array_equal(rgb_pixels(gray), np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (17, 1), (1, 29), (123, 77), (301, 999), (1000, 60)])
def test_four_byte_pixels_give_the_tiles_of_packed_ones(h, w):
    rgbx = np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 4), dtype=np.uint8)
    packed = np.ascontiguousarray(rgbx[..., :3])
    for max_num in (1, 6, 12):
        want = pyvl.load_image(packed, max_num=max_num)
        assert torch.equal(pyvl.load_image(rgbx[..., :3], max_num=max_num), want), max_num
        assert torch.equal(pyvl.load_image(Image.fromarray(rgbx, "RGBA"), max_num=max_num), want), max_num


def test_other_inputs_are_refused():
    with pytest.raises(ImageError, match="image of type str: expected a decoded image"):
        rgb_pixels("photo.jpg")
    with pytest.raises(ImageError, match=r"numpy array of shape \(4, 4, 2\)"):
        rgb_pixels(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="size 0x5"):
        rgb_pixels(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize(
    "shape, strides, want",
    [
        ((4, 5, 3), (15, 3, 1), (15, 3)),
        ((4, 5, 3), (20, 4, 1), (20, 4)),
        ((4, 5, 3), (99, 4, 1), (99, 4)),
        ((1, 5, 3), (0, 4, 1), (20, 4)),
        ((4, 1, 3), (3, 0, 1), (3, 3)),  # a size-1 dimension's stride is never used
        ((4, 5, 3), (19, 4, 1), None),
        ((4, 5, 3), (15, 5, 1), None),
        ((4, 5, 3), (-15, 3, 1), None),
        ((4, 5, 3), (30, 6, 2), None),
        ((4, 5, 3), (15, -3, 1), None),
    ],
)
def test_layout(shape, strides, want):
    assert pixels.layout(shape, strides) == want


@pytest.mark.parametrize(
    "version, release", [("13.0.0", (13, 0)), ("10.4.0", (10, 4)), ("12.1.1.post0", None), ("dev", None)]
)
def test_pillow_release(version, release):
    assert pixels.pillow_release(version) == release
