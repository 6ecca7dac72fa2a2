"""pyvl.image against the golden fixtures of the original InternVL load_image."""

import hashlib
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pyvl.errors import ImageError
from pyvl.image import (
    candidate_grids,
    choose_grid,
    dynamic_preprocess,
    load_image,
    open_image,
    pixel_values_reference,
    tile_boxes,
)

GOLDEN = Path(__file__).parent / "data" / "golden"
PREPROCESS = json.loads((GOLDEN / "preprocess.json").read_text())
GRID_TABLE = json.loads((GOLDEN / "grid_table.json").read_text())["rows"]
GRADIENT = GOLDEN / "images" / "gradient_800x600.png"
PALETTE = GOLDEN / "images" / "tiny_50x40_palette.png"


def sha256_f32le(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().astype("<f4").tobytes()).hexdigest()


def png_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming width x height RGB pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


# --- grid choice ----------------------------------------------------------------------------------------------


def _parse(grids: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in g.strip("()").split(",")) for g in grids.split()]


SPEC_ORDER = {  # the candidate order, computed with CPython 3.11 from the original's set
    6: _parse("(1,1) (1,2) (2,1) (3,1) (1,3) (4,1) (1,4) (2,2) (1,5) (5,1) (6,1) (2,3) (1,6) (3,2)"),
    12: _parse(
        "(1,1) (1,2) (2,1) (3,1) (1,3) (2,2) (4,1) (1,4) (5,1) (1,5) (1,6) (6,1) (3,2) (2,3) (7,1) (1,7) "
        "(4,2) (2,4) (1,8) (8,1) (1,9) (3,3) (9,1) (2,5) (5,2) (10,1) (1,10) (11,1) (1,11) (12,1) (3,4) "
        "(4,3) (1,12) (6,2) (2,6)"
    ),
}


@pytest.mark.parametrize("max_num", sorted(SPEC_ORDER))
def test_candidate_order_matches_spec(max_num):
    assert candidate_grids(1, max_num) == SPEC_ORDER[max_num]


@pytest.mark.parametrize("min_num,max_num", [(1, 1), (1, 40), (2, 2), (3, 12), (12, 12), (7, 40)])
def test_candidates_complete_and_sorted_by_area(min_num, max_num):
    grids = candidate_grids(min_num, max_num)
    expected = {(i, j) for i in range(1, 41) for j in range(1, 41) if min_num <= i * j <= max_num}
    assert len(grids) == len(expected) and set(grids) == expected
    areas = [c * r for c, r in grids]
    assert areas == sorted(areas)


def test_grid_table():
    assert len(GRID_TABLE) == 880
    bad = []
    for row in GRID_TABLE:
        cols, rows = choose_grid(row["w"], row["h"], 1, row["max_num"])
        n = cols * rows
        got = ([cols, rows], [448 * cols, 448 * rows], n + (n > 1), n > 1)
        want = (
            [row["grid_cols"], row["grid_rows"]],
            row["resized_to"],
            row["n_tiles"],
            row["thumbnail_appended"],
        )
        if got != want:
            bad.append((row["w"], row["h"], row["max_num"], got, want))
    assert not bad, bad[:10]


@pytest.mark.parametrize(
    "w,h,grid6,grid12",
    [  # (cols, rows) for max 6 and max 12, from the original
        (448, 448, (1, 1), (1, 1)),
        (500, 400, (1, 1), (4, 3)),
        (640, 480, (3, 2), (4, 3)),
        (1000, 1000, (2, 2), (3, 3)),
        (1344, 896, (3, 2), (3, 2)),
        (1920, 1080, (2, 1), (4, 2)),
        (1080, 1920, (1, 2), (2, 4)),
        (3000, 1000, (3, 1), (6, 2)),
        (300, 1200, (1, 4), (1, 4)),
    ],
)
def test_spec_vectors(w, h, grid6, grid12):
    assert choose_grid(w, h, 1, 6) == grid6
    assert choose_grid(w, h, 1, 12) == grid12


def test_min_num_excludes_small_grids():
    assert choose_grid(448, 448, 2, 12) == (2, 2)  # (1,1) is not a candidate; 2x2 is the closest square
    assert choose_grid(500, 400, 12, 12) == (4, 3)


def test_tile_boxes_row_major():
    assert tile_boxes(3, 2, 10) == [
        (0, 0, 10, 10),
        (10, 0, 20, 10),
        (20, 0, 30, 10),
        (0, 10, 10, 20),
        (10, 10, 20, 20),
        (20, 10, 30, 20),
    ]


# --- golden tiles and pixel values ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", PREPROCESS["entries"], ids=lambda e: e["key"])
def test_golden_preprocess(entry):
    path, max_num = GOLDEN / entry["image"], entry["max_num"]
    img = open_image(path)
    cols, rows = choose_grid(img.width, img.height, 1, max_num)
    assert [cols, rows] == [entry["grid_cols"], entry["grid_rows"]]
    assert [448 * cols, 448 * rows] == entry["resized_to"]
    assert [list(b) for b in tile_boxes(cols, rows)] == entry["crop_boxes"]

    tiles = dynamic_preprocess(img, max_num=max_num)
    assert len(tiles) == entry["n_tiles"] == len(entry["tiles"])
    for k, (tile, tile_file) in enumerate(zip(tiles, entry["tiles"])):
        with Image.open(GOLDEN / tile_file) as want:
            assert tile.mode == want.mode == "RGB" and tile.size == (448, 448)
            assert np.array_equal(np.asarray(tile), np.asarray(want)), f"tile {k} ({tile_file}) differs"

    pixel_values = load_image(path, max_num=max_num)  # native normalisation when built
    assert list(pixel_values.shape) == entry["pixel_values_shape"] and pixel_values.dtype == torch.float32
    assert pixel_values.is_contiguous()
    assert sha256_f32le(pixel_values) == entry["pixel_values_sha256_f32le"]
    reference = pixel_values_reference(np.stack([np.asarray(t) for t in tiles]))
    assert sha256_f32le(reference) == entry["pixel_values_sha256_f32le"]
    assert pixel_values.double().sum().item() == pytest.approx(entry["pixel_values_sum_f64"], rel=1e-12)


@pytest.mark.parametrize("use_native", [True, False])
def test_pixel_values_anchor(use_native):
    anchor = load_file(GOLDEN / PREPROCESS["anchor_file"])["pixel_values_crop"]
    assert PREPROCESS["anchor_key"] == "gradient_800x600@max1"
    pixel_values = load_image(GRADIENT, max_num=1, use_native=use_native)
    assert torch.equal(pixel_values[0:1, :, 0:64, 0:64], anchor)


def test_no_thumbnail_and_other_tile_size():
    img = open_image(GRADIENT)
    assert len(dynamic_preprocess(img, max_num=6, use_thumbnail=False)) == 6
    pixel_values = load_image(GRADIENT, max_num=6, image_size=224)
    assert pixel_values.shape == (7, 3, 224, 224)


# --- input types ----------------------------------------------------------------------------------------------


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("path,max_num", [(PALETTE, 12), (GRADIENT, 2)])
def test_input_types_match_path(path, max_num):
    want = load_image(str(path), max_num=max_num)
    data = path.read_bytes()
    lazy = Image.open(path)  # not yet loaded; open_image must load it
    mode = lazy.mode
    rgb = Image.open(path).convert("RGB")
    inputs = {
        "Path": path,
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "PIL lazy": lazy,
        "PIL RGBA": Image.open(path).convert("RGBA"),
        "PIL RGB": rgb,
        "numpy HWC": np.asarray(rgb),
        "numpy HWC non-contiguous": np.asarray(rgb)[::-1][::-1],
        "numpy RGBA": np.asarray(Image.open(path).convert("RGBA")),
    }
    for name, image in inputs.items():
        assert _same(load_image(image, max_num=max_num), want), name
    assert lazy.mode == mode  # the caller's image is not converted in place


def test_strided_numpy_is_copied():
    rgb = np.asarray(open_image(GRADIENT))
    flipped = rgb[:, ::-1]  # negative stride view
    assert np.array_equal(np.asarray(open_image(flipped)), np.ascontiguousarray(flipped))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_modes_convert_like_pil(tmp_path, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (60, 90, 4), dtype=np.uint8))  # RGBA, varying alpha
    img = base.convert(mode) if mode != "P" else base.convert("RGB").quantize(64)
    file = tmp_path / f"x_{mode}.png"
    img.save(file)
    want = np.asarray(Image.open(file).convert("RGB"))
    assert np.array_equal(np.asarray(open_image(file)), want)
    assert np.array_equal(np.asarray(open_image(img)), want)
    if mode in ("L", "RGBA"):  # numpy (H, W) and (H, W, 4) behave like the same PIL image
        assert np.array_equal(np.asarray(open_image(np.asarray(img))), want)


# --- errors ---------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    for image in (missing, str(missing)):
        with pytest.raises(ImageError, match="nope.png.*no such file"):
            open_image(image)


def test_directory_and_garbage(tmp_path):
    with pytest.raises(ImageError, match="cannot read image"):
        open_image(tmp_path)
    with pytest.raises(ImageError, match=r"image bytes \(20 bytes\): cannot read image"):
        open_image(b"this is not an image")
    with pytest.raises(ImageError, match="got 0 bytes"):
        open_image(b"")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png.*cannot read image"):
        open_image(tmp_path / "empty.png")


def test_truncated_png(tmp_path):
    data = GRADIENT.read_bytes()[: GRADIENT.stat().st_size // 2]
    file = tmp_path / "truncated.png"
    file.write_bytes(data)
    with pytest.raises(ImageError, match="truncated.png.*cannot read image"):
        open_image(file)
    with pytest.raises(ImageError, match="cannot read image"):
        open_image(data)


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (10_000, 10_000)])  # over 2x limit / warn range
def test_decompression_bomb_header(width, height):
    limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    with pytest.raises(ImageError, match=rf"{width * height} pixels.*MAX_IMAGE_PIXELS = {limit}"):
        open_image(png_header(width, height))
    assert Image.MAX_IMAGE_PIXELS == limit and warnings.filters == filters  # nothing global changed


def test_pixel_limit_applies_to_every_input(monkeypatch):
    rgb = open_image(PALETTE)  # 50x40 = 2000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 2000 is in Pillow's warning range (<= 2x limit)
    for image in (PALETTE, PALETTE.read_bytes(), rgb, np.asarray(rgb)):
        with pytest.raises(ImageError, match="2000 pixels.*1500"):
            open_image(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # None disables the check, as in Pillow
    assert open_image(PALETTE).size == (50, 40)


@pytest.mark.parametrize(
    "array,match",
    [
        (np.zeros((4, 4, 3), np.float32), "dtype float32.*expected dtype uint8"),
        (np.zeros((4, 4, 3), np.uint16), "expected dtype uint8"),
        (np.zeros((4, 4, 3), bool), "expected dtype uint8"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\).*expected \(H, W, 3\)"),
        (np.zeros((4, 4, 5), np.uint8), "expected"),
        (np.zeros((4,), np.uint8), "expected"),
        (np.zeros((1, 4, 4, 3), np.uint8), "expected"),
        (np.zeros((0, 4, 3), np.uint8), "height and width >= 1"),
    ],
)
def test_bad_numpy(array, match):
    with pytest.raises(ImageError, match=match):
        open_image(array)


def test_bad_types_and_empty_pil():
    for value in (123, None, [1, 2, 3], torch.zeros(4, 4, 3, dtype=torch.uint8)):
        with pytest.raises(ImageError, match="expected a path, bytes"):
            open_image(value)
    with pytest.raises(ImageError, match="size 0x0"):
        open_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageError, match="mode P.*expected a PIL image in mode RGB"):
        dynamic_preprocess(Image.open(PALETTE))
    with pytest.raises(ImageError, match="expected uint8"):
        pixel_values_reference(np.zeros((1, 4, 4, 3), np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_num": 0}, "max_num=0"),
        ({"max_num": 41}, "max_num=41.*1..40"),
        ({"max_num": 2.0}, "max_num=2.0"),
        ({"max_num": True}, "max_num=True"),
        ({"min_num": 0}, "min_num=0"),
        ({"min_num": 3, "max_num": 2}, "min_num=3.*1..2"),
        ({"image_size": 0}, "image_size=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ImageError, match=match):
        load_image(GRADIENT, **kwargs)
    if "image_size" not in kwargs:
        with pytest.raises(ImageError, match=match):
            candidate_grids(kwargs.get("min_num", 1), kwargs.get("max_num", 12))


def test_bad_grid_size():
    with pytest.raises(ImageError, match="width=0"):
        choose_grid(0, 10)


def test_load_image_device_argument_on_cpu():
    """The CPU side of device=: float32 only there (bf16 tiles are the GPU path's)."""
    assert torch.equal(load_image(GRADIENT, max_num=2, device="cpu"), load_image(GRADIENT, max_num=2))
    with pytest.raises(ImageError, match="float32"):
        load_image(GRADIENT, max_num=2, dtype=torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in benchmarks/device_check.sh)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_image_on_the_gpu_matches_the_cpu(dtype):
    for max_num in (1, 6, 12, 40):
        cpu = load_image(GRADIENT, max_num=max_num)
        gpu = load_image(GRADIENT, max_num=max_num, device="cuda", dtype=dtype)
        assert gpu.device.type == "cuda" and gpu.dtype == dtype
        assert torch.equal(gpu.cpu(), cpu.to(dtype))


# Exact ties of the grid rule: W*H == 0.5 * S^2 * i*j for a grid (i, j) whose aspect ratio ties
# with an earlier candidate. "More than half" is strict, so the image keeps the earlier, smaller grid; one pixel
# more and it takes the larger one. Worked by hand from the rule:
#   1008x896 (aspect 1.125; 1x1, 2x2, 3x3 tie at diff 0.125, 4/3 is 0.208 away): area 903168 = 0.5*448^2*9
#   1024x882 (aspect 1.161; 1/1 is 0.161 away, 4/3 0.172): area 903168 again; 896x1008 is the portrait twin
#   2048x588 (aspect 3.483; 3/1 and 6/2 tie at 0.483, 4/1 is 0.517): area 1204224 = 0.5*448^2*12
#   18x16 with S = 12, max 4: 1x1 and 2x2 tie; area 288 = 0.5*12^2*4
@pytest.mark.parametrize(
    "w, h, max_num, image_size, on_tie, one_more",
    [
        (1008, 896, 12, 448, (2, 2), ((1009, 896), (3, 3))),
        (896, 1008, 12, 448, (2, 2), ((896, 1009), (3, 3))),
        (1024, 882, 12, 448, (2, 2), ((1024, 883), (3, 3))),
        (2048, 588, 12, 448, (3, 1), ((2049, 588), (6, 2))),
        (18, 16, 4, 12, (1, 1), ((19, 16), (2, 2))),
    ],
)
def test_grid_tie_needs_more_than_half_the_pixels(w, h, max_num, image_size, on_tie, one_more):
    cols, rows = choose_grid(w, h, 1, max_num, image_size)
    larger = one_more[1]
    assert w * h == 0.5 * image_size**2 * larger[0] * larger[1]  # the case really sits on the boundary
    assert abs(w / h - cols / rows) == abs(w / h - larger[0] / larger[1])  # ... of an exact aspect tie
    assert (cols, rows) == on_tie, f"{w}x{h} fills exactly half of {larger}: it must keep {on_tie}"
    assert choose_grid(*one_more[0], 1, max_num, image_size) == larger
    assert choose_grid(w - (w > h), h - (h >= w), 1, max_num, image_size) == on_tie  # one pixel less: still


def test_grid_tie_through_dynamic_preprocess():
    """The tie decides the tiles: 1008x896 at max 12 gives 4 tiles + thumbnail, not 9 + thumbnail."""
    img = Image.new("RGB", (1008, 896), (10, 20, 30))
    tiles = dynamic_preprocess(img, max_num=12)
    assert len(tiles) == 5 and all(t.size == (448, 448) for t in tiles)
