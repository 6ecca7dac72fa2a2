"""The fused C++ preprocessing kernel against Pillow: bit-identical uint8 resizes, identical pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pyvl.errors import ImageError
from pyvl.image import IMAGENET_MEAN, IMAGENET_STD, choose_grid, dynamic_preprocess, load_image, pixel_values_reference

native = pytest.importorskip("pyvl.ops.native", reason="pyvl._C is not built")  # test_packaging insists it is


def fused(image, cols, rows, tile=448, thumbnail=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
    """native.resize_tiles with InternVL's tile size and constants (the kernel itself takes them all)."""
    return native.resize_tiles(image, cols, rows, tile, thumbnail, mean, std, **kwargs)


def random_image(rng, h, w) -> np.ndarray:
    """Smooth gradients plus noise plus hard edges: every filter tap matters somewhere."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    noise = rng.integers(0, 256, size=(h, w, 3))
    mask = rng.random((h, w, 1)) < 0.3
    return np.where(mask, noise, base).astype(np.uint8)


SIZES = [(1, 1), (2, 3), (40, 50), (7, 1000), (1000, 7), (333, 517), (600, 800), (1080, 1920), (97, 4001)]
TARGETS = [(1, 1), (448, 448), (896, 1344), (13, 17), (3, 5000)]


@pytest.mark.parametrize("h, w", SIZES)
def test_resize_bicubic_is_bit_identical_to_pillow(h, w):
    rng = np.random.default_rng(h * 7919 + w)
    src = random_image(rng, h, w)
    pil = Image.fromarray(src)
    for out_h, out_w in TARGETS + [(int(rng.integers(1, 900)), int(rng.integers(1, 900))) for _ in range(3)]:
        want = np.asarray(pil.resize((out_w, out_h), Image.Resampling.BICUBIC))
        got = native.resize_bicubic(src, out_w, out_h, num_threads=2)
        assert np.array_equal(got, want), f"{w}x{h} -> {out_w}x{out_h}: {(got != want).sum()} values differ"


def test_resize_accepts_strided_rows():
    src = random_image(np.random.default_rng(0), 300, 400)
    view = src[10:250, 20:370]  # rows keep the parent's stride
    want = np.asarray(Image.fromarray(np.ascontiguousarray(view)).resize((448, 448), Image.Resampling.BICUBIC))
    assert np.array_equal(native.resize_bicubic(view, 448, 448), want)


@pytest.mark.parametrize("h, w", [(40, 50), (300, 1000), (600, 800), (1080, 1920), (31, 4000)])
def test_resize_tiles_equals_reference_pipeline_for_every_max_num(h, w):
    src = random_image(np.random.default_rng(h + w), h, w)
    img = Image.fromarray(src)
    seen = set()
    for max_num in range(1, 41):
        cols, rows = choose_grid(w, h, 1, max_num)
        if (cols, rows) in seen:  # same grid as a smaller max_num: same output
            continue
        seen.add((cols, rows))
        want = pixel_values_reference(np.stack([np.asarray(t) for t in dynamic_preprocess(img, 1, max_num)]))
        got = fused(src, cols, rows, 448, True, num_threads=1 + max_num % 2)
        assert torch.equal(got, want), f"{w}x{h} max_num {max_num} ({cols}x{rows})"


def test_load_image_native_equals_pillow_path():
    src = random_image(np.random.default_rng(5), 479, 641)
    for max_num in (1, 6, 12, 40):
        assert torch.equal(load_image(src, max_num=max_num), load_image(src, max_num=max_num, use_native=False))


def test_thread_counts_agree():
    src = random_image(np.random.default_rng(9), 720, 1280)
    outs = [fused(src, 4, 2, num_threads=t) for t in (1, 2, 3, 0)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_out_argument_and_poison():
    src = random_image(np.random.default_rng(1), 200, 300)
    out = torch.full((7, 3, 448, 448), float("nan"))
    fused(src, 3, 2, out=out)
    assert torch.isfinite(out).all()
    assert torch.equal(out, fused(src, 3, 2))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((10, 10, 3), dtype=np.float32), "must be uint8"),
    (np.zeros((10, 10, 4), dtype=np.uint8), r"\[H, W, 3\]"),
    (np.zeros((10, 10), dtype=np.uint8), r"\[H, W, 3\]"),
    (np.zeros((0, 10, 3), dtype=np.uint8), "must not be empty"),
    (np.zeros((10, 20, 3), dtype=np.uint8)[:, ::2], "packed RGB"),
    (np.zeros((3, 10, 10), dtype=np.uint8).transpose(1, 2, 0), "packed RGB"),
    ("not an array", "numpy array"),
])
def test_bad_images(bad, match):
    with pytest.raises(ImageError, match=match):
        fused(bad, 1, 1)


@pytest.mark.parametrize("cols, rows, match", [(0, 1, "out of range"), (41, 1, "out of range"), (7, 6, "out of range")])
def test_bad_grids(cols, rows, match):
    with pytest.raises(ImageError, match=match):
        fused(np.zeros((8, 8, 3), np.uint8), cols, rows)


def test_bad_out_and_threads():
    src = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ImageError, match="out must be"):
        fused(src, 1, 1, out=torch.empty(1, 3, 448, 447))
    with pytest.raises(ImageError, match="num_threads"):
        fused(src, 1, 1, num_threads=-1)
    with pytest.raises(ImageError, match="output size"):
        native.resize_bicubic(src, 0, 5)
