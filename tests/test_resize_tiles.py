"""The fused C++ preprocessing kernel against Pillow: bit-identical uint8 resizes, identical pixel values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pyvl.errors import ImageError
from pyvl.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    choose_grid,
    dynamic_preprocess,
    load_image,
    pixel_values_reference,
)

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
    want = np.asarray(
        Image.fromarray(np.ascontiguousarray(view)).resize((448, 448), Image.Resampling.BICUBIC)
    )
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
        assert torch.equal(
            load_image(src, max_num=max_num), load_image(src, max_num=max_num, use_native=False)
        )


def test_every_uint8_value_is_normalised_like_torch_with_any_mean_and_std():
    # A same-size resize is exact in Pillow and here, so each tile value is one uint8 through the normalisation.
    from pyvl.ops import reference

    values = np.arange(256, dtype=np.uint8)
    src = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(16, 16, 3)
    for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), ((0.5, 0.25, 0.125), (0.5, 0.3, 0.7))):
        want = reference.resize_tiles(src, 1, 1, 16, False, mean, std)
        assert torch.equal(
            fused(src, 1, 1, 16, False, mean, std, out=torch.full((1, 3, 16, 16), float("nan"))), want
        )


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


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((10, 10, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((10, 10, 4), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((10, 10), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((0, 10, 3), dtype=np.uint8), "must not be empty"),
        (np.zeros((10, 20, 3), dtype=np.uint8)[:, ::2], "RGB pixels 3 or 4 bytes apart"),
        (np.zeros((3, 10, 10), dtype=np.uint8).transpose(1, 2, 0), "RGB pixels 3 or 4 bytes apart"),
        (np.zeros((4, 5, 5), dtype=np.uint8)[..., :3], r"shape \(4, 5, 3\) .*got strides \(25, 5, 1\)"),
        (
            np.lib.stride_tricks.as_strided(np.zeros(99, np.uint8), (4, 5, 3), (19, 4, 1)),  # rows overlap
            r"shape \(4, 5, 3\) .*got strides \(19, 4, 1\)",
        ),
        ("not an array", "numpy array"),
    ],
)
def test_bad_images(bad, match):
    with pytest.raises(ImageError, match=match):
        fused(bad, 1, 1)


@pytest.mark.parametrize(
    "cols, rows, match", [(0, 1, "out of range"), (41, 1, "out of range"), (7, 6, "out of range")]
)
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


# --- native kernel internals: pass-order rules, SIMD vs portable code, memory, no crash on huge images ---

from pyvl import _C  # noqa: E402  (after pyvl.ops.native, whose ImportError explains a missing build)

RULES = (_C.PASS_ORDER_PILLOW_12_1, _C.PASS_ORDER_PILLOW_12_2, _C.PASS_ORDER_PILLOW_13)


def c_resize(src: np.ndarray, out_h: int, out_w: int, pass_order: int, simd: bool = True) -> np.ndarray:
    """The binding itself on an [H, W, 3] array with pixels 3 or 4 bytes apart."""
    h, w, _ = src.shape
    out = np.empty((out_h, out_w, 3), np.uint8)
    _C.resize_bicubic_cpu(
        src.ctypes.data,
        h,
        w,
        src.strides[0],
        out.ctypes.data,
        out_h,
        out_w,
        1,
        pass_order=pass_order,
        simd=simd,
        pixel_stride=src.strides[1],
    )
    return out


def two_pass(src: np.ndarray, out_h: int, out_w: int, vertical_first: bool) -> np.ndarray:
    """Pillow's two passes in a chosen order: a resize along one axis only is one pass in every Pillow version."""
    h, w, _ = src.shape
    mid = (w, out_h) if vertical_first else (out_w, h)
    return np.asarray(
        Image.fromarray(src)
        .resize(mid, Image.Resampling.BICUBIC)
        .resize((out_w, out_h), Image.Resampling.BICUBIC)
    )


# (h, w, out_h, out_w, vertical first under each rule): each rule's boundary, on and one pixel past its tie.
ORDER_CASES = [
    (250, 300, 100, 150, (False, False, False)),  # 13: h - oh = 150 < 2 (w - ow) = 300
    (300, 250, 100, 150, (False, False, False)),  # 13: tie, h - oh = 200 = 2 (w - ow): horizontal first
    (301, 250, 100, 150, (False, False, True)),  # 13: one past the tie
    (1920, 1080, 448, 448, (False, False, True)),  # a portrait photo
    (500, 5, 100, 7, (False, False, True)),  # 12.2: tie, h = 100 w: horizontal first
    (501, 5, 100, 7, (False, True, True)),  # 12.2: h > 100 w and the height shrinks
    (834, 3, 487, 98, (False, True, True)),
]


@pytest.mark.parametrize("h, w, out_h, out_w, vertical_first", ORDER_CASES)
def test_each_pass_order_rule_runs_its_pillows_order(h, w, out_h, out_w, vertical_first):
    src = random_image(np.random.default_rng(h * w), h, w)
    orders = {v: two_pass(src, out_h, out_w, v) for v in (False, True)}
    assert not np.array_equal(orders[False], orders[True]), "the case must tell the two orders apart"
    for rule, v_first in zip(RULES, vertical_first):
        assert np.array_equal(c_resize(src, out_h, out_w, rule), orders[v_first]), (rule, v_first)


@pytest.mark.parametrize(
    "version, rule",
    [
        ("10.0.0", _C.PASS_ORDER_PILLOW_12_1),
        ("11.3.0", _C.PASS_ORDER_PILLOW_12_1),
        ("12.1.1", _C.PASS_ORDER_PILLOW_12_1),
        ("12.2.0", _C.PASS_ORDER_PILLOW_12_2),
        ("12.3.0", _C.PASS_ORDER_PILLOW_12_2),
        ("13.0.0", _C.PASS_ORDER_PILLOW_13),
        ("13.1.2", _C.PASS_ORDER_PILLOW_13),
        ("9.5.0", None),
        ("14.0.0", None),
        ("12.1.1.post0", None),  # untested releases and Pillow-SIMD
    ],
)
def test_pass_order_of_each_pillow_release(version, rule):
    assert native.pass_order_for(version) == rule


@pytest.mark.parametrize("h, w, out_h, out_w, _", ORDER_CASES)
def test_installed_pillows_rule_equals_pillow(h, w, out_h, out_w, _):
    """The default rule is the installed Pillow's (.ci/run also runs this file under a second Pillow release)."""
    src = random_image(np.random.default_rng(h + w), h, w)
    want = np.asarray(Image.fromarray(src).resize((out_w, out_h), Image.Resampling.BICUBIC))
    assert np.array_equal(native.resize_bicubic(src, out_w, out_h), want)


def test_bad_pass_order():
    with pytest.raises(ValueError, match="pass_order must be"):
        c_resize(np.zeros((4, 4, 3), np.uint8), 2, 2, 3)


@pytest.mark.skipif(not _C.cpu_has_avx2(), reason="this CPU has no AVX2: only the portable code exists")
def test_avx2_and_portable_code_agree():
    rng = np.random.default_rng(3)
    # Row lengths (3 x width) below, at and off multiples of 32 (the vertical pass's step), tap counts odd and
    # even (a single source row included), both pass orders.
    for h, w, out_h, out_w in [
        (1, 1, 1, 1),
        (3, 7, 5, 2),
        (17, 1001, 33, 448),
        (100, 4001, 9, 1344),
        (640, 480, 896, 1344),
        (1000, 3, 40, 500),
        (1, 40, 7, 33),
        (37, 45, 70, 29),
        (900, 50, 20, 40),
        (300, 11, 7, 64),
    ]:
        src = random_image(rng, h, w)
        for rule in RULES:
            assert np.array_equal(
                c_resize(src, out_h, out_w, rule, simd=True), c_resize(src, out_h, out_w, rule, simd=False)
            ), (h, w, out_h, out_w, rule)
    src = random_image(rng, 300, 1000)
    for tile in (448, 1, 5, 13):  # the normalisation's 8-pixel steps, with and without a tail
        tiles = []
        for simd in (True, False):
            out = torch.full((4, 3, tile, tile), float("nan"))
            _C.resize_tiles_cpu(
                src.ctypes.data,
                300,
                1000,
                3000,
                out.data_ptr(),
                3,
                1,
                tile,
                True,
                IMAGENET_MEAN,
                IMAGENET_STD,
                2,
                pass_order=_C.PASS_ORDER_PILLOW_13,
                simd=simd,
            )
            tiles.append(out)
        assert torch.equal(tiles[0], tiles[1]), tile


def test_four_byte_pixels_equal_packed_ones_in_every_code_path():
    # RGBX / RGBA rows (the 4th byte random, never part of a result) against the packed RGB copy, for every
    # pass-order rule (h-first and v-first first passes), SIMD and portable code, strided rows, one row or column.
    rng = np.random.default_rng(12)
    for h, w, out_h, out_w in [
        (1, 1, 1, 1),
        (3, 7, 5, 2),
        (17, 1001, 33, 448),
        (640, 480, 896, 1344),
        (1000, 3, 40, 500),
        (1, 40, 7, 33),
        (900, 50, 20, 40),
        (2000, 30, 17, 9),
    ]:
        rgbx = rng.integers(0, 256, (h, w + 2, 4), dtype=np.uint8)[:, 1:-1]  # rows 4 * (w + 2) bytes apart
        packed = np.ascontiguousarray(rgbx[..., :3])
        for rule in RULES:
            for simd in (True, False):
                want = c_resize(packed, out_h, out_w, rule, simd)
                assert np.array_equal(c_resize(rgbx[..., :3], out_h, out_w, rule, simd), want), (
                    h,
                    w,
                    rule,
                    simd,
                )
        want = native.resize_bicubic(packed, out_w, out_h)
        assert np.array_equal(native.resize_bicubic(rgbx[..., :3], out_w, out_h), want)
        cols, rows = choose_grid(w, h, 1, 6)
        want = fused(packed, cols, rows, 32, num_threads=2)
        assert torch.equal(fused(rgbx[..., :3], cols, rows, 32, num_threads=2), want), (h, w)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_huge_thin_image_raises_instead_of_aborting():
    # 89,000,000 x 1 is under Pillow's pixel limit; its weight tables exceed what Pillow allows (Pillow raises
    # MemoryError too). This used to end in std::terminate (SIGABRT), so it runs in a subprocess.
    proc = run_python(
        "import numpy as np\n"
        "from pyvl.errors import ImageError\n"
        "from pyvl.image import IMAGENET_MEAN, IMAGENET_STD, choose_grid\n"
        "from pyvl.ops import native\n"
        "cols, rows = choose_grid(89_000_000, 1, 1, 12)\n"
        "try:\n"
        "    native.resize_tiles(np.zeros((1, 89_000_000, 3), np.uint8), cols, rows, 448, True, IMAGENET_MEAN,\n"
        "                        IMAGENET_STD, num_threads=2)\n"
        "except ImageError as e:\n"
        "    print('refused:', type(e.__cause__).__name__, e)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: MemoryError" in proc.stdout and "more than Pillow allows" in proc.stdout
    assert "89000000x1 image" in proc.stdout  # the ImageError names the size


@pytest.mark.parametrize(("width", "height"), [(89_000_000, 1), (1, 89_000_000), (70_000_000, 1)])
def test_the_reference_refuses_what_pillow_cannot_resize_as_the_native_path_does(width, height):
    """Both paths give an ImageError naming the size where Pillow's own resize raises a bare MemoryError (the
    weight tables alone would exceed INT_MAX bytes; nothing is allocated before either refusal)."""
    image = np.zeros((height, width, 3), np.uint8)
    cols, rows = choose_grid(width, height, 1, 12)
    with pytest.raises(MemoryError):  # the boundary is Pillow's: it refuses these sizes itself
        Image.fromarray(image).resize((448 * cols, 448 * rows), Image.Resampling.BICUBIC)
    from pyvl.ops import reference

    for op in (reference.resize_tiles, native.resize_tiles):
        with pytest.raises(ImageError, match=rf"{width}x{height} image.*more than Pillow allows"):
            op(image, cols, rows, 448, True, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ImageError, match="more than Pillow allows"):
        load_image(image, use_native=False)


PEAK_RSS = """
import resource, numpy as np
from PIL import Image
from pyvl.ops import native
src = np.random.default_rng(0).integers(0, 256, (1, {w}, 3), dtype=np.uint8)
before = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
if {pillow}:
    Image.fromarray(src).resize((64, 1), Image.Resampling.BICUBIC)
else:
    native.resize_bicubic(src, 64, 1, num_threads=2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def test_scratch_memory_of_a_wide_image_is_bounded_like_pillows():
    # Scratch that grows with the source width (48 bytes a column per thread before) would be 3-4x Pillow's
    # peak here; the weight tables (what Pillow allocates too) are ~32 bytes a column in both.
    w = 3_000_000
    peaks = {}
    for pillow in (True, False):
        proc = run_python(PEAK_RSS.format(w=w, pillow=pillow))
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[pillow] = int(proc.stdout.split()[-1])
    assert peaks[False] < 1.5 * peaks[True] + (8 << 20), (
        f"pyvl {peaks[False] >> 20} MB, Pillow {peaks[True] >> 20} MB"
    )


def test_unknown_pillow_release_falls_back_to_the_pillow_path(monkeypatch):
    """A Pillow whose resize the kernels do not reproduce: warned about, then preprocessed by Pillow itself."""
    from pyvl.ops import resolve_ops

    monkeypatch.setattr(native, "pillow_pass_order", lambda: None)
    src = random_image(np.random.default_rng(5), 1080, 720)  # portrait: the pass order matters here
    with pytest.warns(UserWarning, match="Pillow .* Pillow \\+ torch instead"):
        got = load_image(src, max_num=6)
    assert torch.equal(got, load_image(src, max_num=6, use_native=False))
    with pytest.warns(UserWarning, match="Pillow \\+ torch instead"):
        assert resolve_ops("auto", "cpu").backends["resize_tiles"] == "reference"
    with pytest.raises(ImageError, match="pass pass_order="):
        native.resize_bicubic(src, 448, 448)
