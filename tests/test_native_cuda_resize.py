"""pyvl.ops.native.resize_tiles_cuda (kernels/cuda/resize_tiles.cu) against the CPU kernel, and its checks.

On the GPU: float32 tiles must equal ``native.resize_tiles`` (itself bit-identical to Pillow + ToTensor +
Normalize) and bfloat16 tiles must equal that result ``.to(torch.bfloat16)``, over random sizes, aspect ratios
(tall ones run Pillow's vertical pass first) and every max_num 1..40. Outputs are poisoned with NaN first.
Everywhere else (CPU-only torch): every argument check fires before CUDA is touched, the missing-CUDA errors
are clear, and when pyvl._C was compiled with CUDA its host-side planning (buffer sizes, the weights written
for upload, the bindings' own guards) is checked without launching anything.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch

from pyvl.errors import ImageError
from pyvl.image import IMAGENET_MEAN, IMAGENET_STD, choose_grid

native = pytest.importorskip("pyvl.ops.native", reason="pyvl._C is not built")  # test_packaging insists it is
from pyvl import _C  # noqa: E402  (after pyvl.ops.native, whose ImportError explains a missing build)

PASS = _C.PASS_ORDER_PILLOW_13  # the bindings' own checks do not depend on the rule


def fused_cuda(image, cols, rows, tile=448, thumbnail=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
    """native.resize_tiles_cuda with InternVL's tile size and constants (the kernel itself takes them all)."""
    return native.resize_tiles_cuda(image, cols, rows, tile, thumbnail, mean, std, **kwargs)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
cuda_build = pytest.mark.skipif(not native.has_cuda(), reason="pyvl._C was built without CUDA")
ALIGN = 256  # the .cu's alignment of every array in its buffers
PRECISION = 1 << 22  # Pillow's fixed-point one


def random_image(rng, h, w) -> np.ndarray:
    """Gradients, noise and hard edges, so every tap of every filter matters somewhere."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], -1)
    noise = rng.integers(0, 256, size=(h, w, 3))
    return np.where(rng.random((h, w, 1)) < 0.3, noise, base).astype(np.uint8)


def vertical_first(h, w, oh, ow) -> bool:  # Pillow 13's pass order (csrc/resample_coeffs.h)
    return h - oh > 0 and h - oh > (w - ow) * 2


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


# --- argument checks: run everywhere, before CUDA is touched ------------------------------------------------

IMAGE = np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((10, 10, 3), np.float32), "must be uint8, got float32"),
        (torch.zeros((10, 10, 3), dtype=torch.int16), "must be uint8, got torch.int16"),
        (np.zeros((10, 10, 4), np.uint8), r"\[H, W, 3\].*\(10, 10, 4\)"),
        (torch.zeros((10, 10, 1), dtype=torch.uint8), r"\[H, W, 3\]"),
        (np.zeros((10, 10), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((0, 10, 3), np.uint8), "must not be empty"),
        (torch.zeros((10, 0, 3), dtype=torch.uint8), "must not be empty"),
        (np.zeros((10, 20, 3), np.uint8)[:, ::2], "RGB pixels 3 or 4 bytes apart"),
        (np.zeros((3, 10, 10), np.uint8).transpose(1, 2, 0), "RGB pixels 3 or 4 bytes apart"),
        (torch.zeros((10, 20, 3), dtype=torch.uint8)[:, ::2], "RGB pixels 3 or 4 bytes apart"),
        (torch.zeros((10, 10, 3), dtype=torch.uint8, device="meta"), "CPU or a CUDA device, got meta"),
        ("not an array", "numpy array"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_bad_images(bad, match):
    with pytest.raises(ImageError, match=match):
        fused_cuda(bad, 1, 1)


@pytest.mark.parametrize(
    "cols, rows, tile, match",
    [
        (0, 1, 448, "out of range"),
        (41, 1, 448, "out of range"),
        (7, 6, 448, "out of range"),
        (1, -2, 448, "out of range"),
        (1, 1, 0, "tile size must be positive"),
        (1.0, 1, 448, "cols must be an int"),
        (True, 1, 448, "cols must be an int"),
        (1, 1, "448", "tile must be an int"),
    ],
)
def test_bad_grids(cols, rows, tile, match):
    with pytest.raises(ImageError, match=match):
        fused_cuda(IMAGE, cols, rows, tile)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": torch.float16}, "dtype must be torch.float32 or torch.bfloat16, got torch.float16"),
        ({"device": "cpu"}, "must be a CUDA device, got cpu"),
        ({"device": "no-such-device"}, "not a torch device"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 numbers"),
        ({"std": None}, "std must be 3 numbers"),
        (
            {"out": torch.empty((1, 3, 448, 448), dtype=torch.bfloat16)},
            r"out must be .* on cuda",
        ),  # a CPU out
        ({"out": torch.empty((1, 3, 448, 448), dtype=torch.bfloat16, device="meta")}, "out must be"),
        (
            {"out": torch.empty((2, 3, 448, 448), dtype=torch.bfloat16, device="meta")},
            r"shape \(1, 3, 448, 448\)",
        ),
        ({"out": np.empty((1, 3, 448, 448), np.float32)}, "must be a torch.Tensor, got ndarray"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ImageError, match=match):
        fused_cuda(IMAGE, 1, 1, **kwargs)


def test_bad_out_dtype_and_layout():
    # out must match `dtype` (default bfloat16) and be contiguous; checked on meta tensors, no GPU needed.
    with pytest.raises(ImageError, match="contiguous torch.bfloat16 .* got torch.float32"):
        fused_cuda(IMAGE, 2, 1, out=torch.empty((3, 3, 448, 448), device="meta"))
    strided = torch.empty((3, 448, 448, 3), dtype=torch.bfloat16, device="meta").permute(0, 3, 1, 2)
    with pytest.raises(ImageError, match="not contiguous"):
        fused_cuda(IMAGE, 2, 1, out=strided)
    # Without the thumbnail (or with one tile) there is one tile fewer.
    with pytest.raises(ImageError, match=r"shape \(2, 3, 448, 448\)"):
        fused_cuda(IMAGE, 2, 1, thumbnail=False, out=torch.empty((3, 3, 448, 448), device="meta"))


RGBX_VIEW = np.zeros((8, 8, 4), np.uint8)[..., :3]  # pixels 4 bytes apart: accepted as well


@pytest.mark.parametrize(
    "image", [IMAGE, RGBX_VIEW, torch.from_numpy(RGBX_VIEW)], ids=["rgb", "rgbx", "rgbx tensor"]
)
def test_missing_cuda_is_a_clear_runtime_error(monkeypatch, image):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if native.has_cuda():
        with pytest.raises(RuntimeError, match="torch.cuda is not available.*use resize_tiles"):
            fused_cuda(image, 1, 1)
    monkeypatch.setattr(native._C, "has_cuda", lambda: False)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        fused_cuda(image, 1, 1)


def test_bindings_exist_with_cuda():
    names = ("resize_tiles_cuda", "resize_tiles_cuda_workspace", "resize_tiles_cuda_coefficients")
    assert all(hasattr(_C, name) for name in names)  # bound in every build; CPU-only ones raise
    if not native.has_cuda():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _C.resize_tiles_cuda_workspace(8, 8, 1, 1, 448, False, pass_order=PASS)


# --- host-side planning of a CUDA build: no GPU needed --------------------------------------------------------


def decode_coefficients(buf: np.ndarray, h, w, cols, rows, tile, thumbnail):
    """The weights resize_tiles_cuda_coefficients wrote, per target: [(horizontal, vertical)], each axis a list
    of (first, count, weights). Layout (resize_tiles.cu): per target, h bounds | h weights | v bounds | v weights,
    int32, each array starting on a 256-byte boundary; bounds are (first, count) pairs."""
    words = buf.view(np.int32)
    at = 0
    targets = []
    for oh, ow in [(rows * tile, cols * tile)] + ([(tile, tile)] if thumbnail else []):
        axes = []
        for n_in, n_out in ((w, ow), (h, oh)):
            ksize = int(np.ceil(2 * max(n_in / n_out, 1.0))) * 2 + 1
            bounds = words[at // 4 : at // 4 + 2 * n_out].reshape(n_out, 2)
            at += aligned(2 * n_out * 4)
            weights = words[at // 4 : at // 4 + n_out * ksize].reshape(n_out, ksize)
            at += aligned(n_out * ksize * 4)
            axes.append((n_in, bounds, weights))
        targets.append(axes)
    assert at == buf.size, "the layout decoded here disagrees with the buffer size the extension reports"
    return targets


@cuda_build
@pytest.mark.parametrize(
    "h, w, cols, rows, tile, thumbnail",
    [
        (2160, 3840, 4, 2, 448, True),
        (4001, 97, 1, 8, 48, True),
        (900, 120, 1, 3, 448, True),
        (1, 1, 1, 1, 448, False),
        (17, 5, 6, 1, 13, True),
    ],
)
def test_workspace_and_coefficients(h, w, cols, rows, tile, thumbnail):
    coeff_bytes, tmp_bytes = _C.resize_tiles_cuda_workspace(
        h, w, cols, rows, tile, thumbnail, pass_order=PASS
    )
    targets = [(rows * tile, cols * tile)] + ([(tile, tile)] if thumbnail else [])
    # The uint8 image between the passes: source rows at the output width (h-first) or output rows at the
    # source width (v-first): the pass-order rule decides the size.
    assert tmp_bytes == sum(
        aligned(3 * (oh * w if vertical_first(h, w, oh, ow) else h * ow)) for oh, ow in targets
    )
    buf = np.full(coeff_bytes, 0x5A, np.uint8)  # poisoned: padding must come back zeroed too
    _C.resize_tiles_cuda_coefficients(
        h, w, cols, rows, tile, thumbnail, buf.ctypes.data, coeff_bytes, pass_order=PASS
    )
    for axes in decode_coefficients(buf, h, w, cols, rows, tile, thumbnail):
        for n_in, bounds, weights in axes:
            first, count = bounds[:, 0], bounds[:, 1]
            assert first[0] == 0 and (first + count)[-1] == n_in and (count >= 1).all()
            assert (
                (np.diff(first) >= 0).all()
                and (first + count <= n_in).all()
                and (count <= weights.shape[1]).all()
            )
            # Each output's weights are normalised to one before rounding, and zero past its count.
            sums = weights.astype(np.int64).sum(axis=1)
            assert (np.abs(sums - PRECISION) <= weights.shape[1]).all()
            assert all((weights[i, count[i] :] == 0).all() for i in range(len(count)))


@cuda_build
def test_identity_weights():
    # Same size in and out: bicubic at integer offsets, one weight of exactly 1.0 at the pixel itself.
    n = 9
    coeff_bytes, _ = _C.resize_tiles_cuda_workspace(n, n, 1, 1, n, False, pass_order=PASS)
    buf = np.zeros(coeff_bytes, np.uint8)
    _C.resize_tiles_cuda_coefficients(n, n, 1, 1, n, False, buf.ctypes.data, coeff_bytes, pass_order=PASS)
    for _, bounds, weights in decode_coefficients(buf, n, n, 1, 1, n, False)[0]:
        for i, (first, count) in enumerate(bounds):
            expected = np.zeros(weights.shape[1], np.int32)
            expected[i - first] = PRECISION
            assert (
                (weights[i] == expected).all() and first == max(i - 1, 0) and first + count == min(i + 3, n)
            )


@cuda_build
def test_native_guards_reject_nonsense():
    # The bindings' own checks, for callers that bypass the wrapper; all fire before any CUDA call.
    h, w = 8, 8
    coeff_bytes, tmp_bytes = _C.resize_tiles_cuda_workspace(h, w, 2, 1, 448, True, pass_order=PASS)
    args = dict(
        src=1,
        h=h,
        w=w,
        row_stride=3 * w,
        dst=1,
        dtype=_C.BFLOAT16,
        cols=2,
        rows=1,
        tile=448,
        thumbnail=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        coefficients=1,
        coefficient_bytes=coeff_bytes,
        intermediate=1,
        intermediate_bytes=tmp_bytes,
        stream=0,
        pass_order=PASS,
    )
    for change, match in [
        ({"src": 0}, "src is a null data pointer"),
        ({"dst": 0}, "dst is a null data pointer"),
        ({"coefficients": 0}, "coefficients is a null"),
        ({"intermediate": 0}, "intermediate is a null"),
        ({"h": 0}, "source height must be > 0"),
        ({"row_stride": 3 * w - 1}, "row_stride 23 is smaller"),
        ({"cols": 0}, "cols, rows and tile must be > 0"),
        ({"dtype": 7}, "unknown output dtype code 7"),
        ({"coefficient_bytes": coeff_bytes - 4}, "coefficient buffer has"),
        ({"intermediate_bytes": tmp_bytes - 1}, "intermediate buffer has"),
        ({"tile": 1 << 40}, "must be in 1.."),
        ({"w": 1 << 29, "row_stride": 3 << 29}, "out of range"),
    ]:
        with pytest.raises(ValueError, match=match):
            _C.resize_tiles_cuda(**{**args, **change})
    buf = np.zeros(coeff_bytes, np.uint8)
    with pytest.raises(ValueError, match="the buffer has 4 bytes"):
        _C.resize_tiles_cuda_coefficients(h, w, 2, 1, 448, True, buf.ctypes.data, 4, pass_order=PASS)
    with pytest.raises(ValueError, match="dst is a null"):
        _C.resize_tiles_cuda_coefficients(h, w, 2, 1, 448, True, 0, coeff_bytes, pass_order=PASS)


# --- the GPU against the CPU kernel, bit for bit ------------------------------------------------------------


def cpu_tiles(src, cols, rows, tile=448, thumbnail=True, **kwargs) -> torch.Tensor:
    kwargs = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **kwargs}
    return native.resize_tiles(np.ascontiguousarray(src), cols, rows, tile, thumbnail, **kwargs)


def assert_same(src, cols, rows, what, tile=448, thumbnail=True, **kwargs):
    """float32 and bfloat16 CUDA tiles (into poisoned outs) against the CPU kernel."""
    want = cpu_tiles(src, cols, rows, tile, thumbnail, **kwargs)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full(want.shape, float("nan"), dtype=dtype, device="cuda")
        got = fused_cuda(src, cols, rows, tile, thumbnail, out=out, dtype=dtype, **kwargs)
        assert got is out
        expected = want.to(dtype).cuda()  # rounded on the CPU, compared on the GPU (the tensors are big)
        if not torch.equal(got, expected):
            bad = (got.float() != expected.float()) | ~torch.isfinite(got.float())
            raise AssertionError(f"{what} {dtype}: {int(bad.sum())} of {bad.numel()} values differ")


SIZES = [
    (1, 1),
    (2, 3),
    (40, 50),
    (7, 1000),
    (1000, 7),
    (333, 517),
    (600, 800),
    (1080, 1920),
    (97, 4001),
    (4001, 97),
    (3000, 400),
    (900, 120),
    (2160, 3840),
]


@gpu
@pytest.mark.parametrize("h, w", SIZES)
def test_matches_cpu_for_every_max_num(h, w):
    src = random_image(np.random.default_rng(h * 7919 + w), h, w)
    seen = set()
    for max_num in range(1, 41):
        grid = choose_grid(w, h, 1, max_num)
        if grid not in seen:  # same grid as a smaller max_num: same output
            seen.add(grid)
            assert_same(src, *grid, f"{w}x{h} max_num {max_num} grid {grid}")


@gpu
def test_matches_cpu_on_random_shapes():
    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    for _ in range(12):
        # log-uniform sides, so tiny upscales, extreme ratios and tall (vertical-first) images all turn up
        h, w = (int(np.exp(rng.uniform(0, np.log(3000)))) for _ in range(2))
        grid = choose_grid(w, h, 1, int(rng.integers(1, 41)))
        tile = int(rng.choice([448, 448, 224, 97, 16]))
        thumbnail = bool(rng.integers(0, 2))
        assert_same(
            random_image(rng, h, w), *grid, f"seed {seed}: {w}x{h} grid {grid} tile {tile}", tile, thumbnail
        )


@gpu
def test_tall_images_take_the_vertical_pass_first():
    rng = np.random.default_rng(3)
    for h, w, grid in [(4000, 300, (1, 6)), (2000, 900, (1, 2)), (5000, 40, (1, 40)), (2500, 1000, (1, 1))]:
        orders = [vertical_first(h, w, grid[1] * 448, grid[0] * 448), vertical_first(h, w, 448, 448)]
        assert any(orders)  # grid and/or thumbnail v-first; (5000, 40) upscales its grid h-first
        assert_same(
            random_image(rng, h, w), *grid, f"{w}x{h} grid {grid} (v-first grid, thumbnail: {orders})"
        )


@gpu
def test_tensor_inputs_strided_rows_custom_normalisation():
    rng = np.random.default_rng(11)
    parent = random_image(rng, 700, 1000)
    view = parent[50:650, 100:900]  # rows keep the parent's stride
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.3, 0.7)
    want = cpu_tiles(view, 3, 2, mean=mean, std=std)
    for image in (
        view,
        torch.from_numpy(parent)[50:650, 100:900],
        torch.from_numpy(parent).cuda()[50:650, 100:900],
    ):
        got = fused_cuda(image, 3, 2, mean=mean, std=std, dtype=torch.float32)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
    default = fused_cuda(view, 3, 2)  # bfloat16, ImageNet constants
    assert default.dtype == torch.bfloat16 and torch.equal(
        default.cpu(), cpu_tiles(view, 3, 2).to(torch.bfloat16)
    )


@gpu
@pytest.mark.parametrize("h, w", [(1, 1), (1, 9), (9, 1), (333, 517), (1080, 1920), (4000, 300)])
def test_four_byte_pixels_equal_packed_ones(h, w):
    """RGBX rows (what pyvl.image.rgb_pixels gives for a PIL image), the 4th byte random: uploaded as they are
    from the host, or read in place on the GPU."""
    rng = np.random.default_rng(h + w)
    rgbx = np.concatenate([random_image(rng, h, w), rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], axis=2)
    grid = choose_grid(w, h, 1, 12)
    assert_same(rgbx[..., :3], *grid, f"{w}x{h} RGBX from the host")
    want = cpu_tiles(rgbx[..., :3], *grid)
    got = fused_cuda(torch.from_numpy(rgbx).cuda()[..., :3], *grid, dtype=torch.float32)
    assert torch.equal(got.cpu(), want), f"{w}x{h} RGBX on the GPU"


@gpu
def test_runs_on_the_current_stream():
    src = random_image(np.random.default_rng(2), 1080, 1920)
    want = cpu_tiles(src, 4, 2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = fused_cuda(src, 4, 2, dtype=torch.float32)
    stream.synchronize()
    assert torch.equal(got.cpu(), want)


@gpu
def test_cuda_image_on_another_device_is_rejected():
    image = torch.zeros((8, 8, 3), dtype=torch.uint8, device="cuda:0")
    with pytest.raises(ImageError, match="image is on cuda:0 but device=cuda:1"):
        fused_cuda(image, 1, 1, device="cuda:1")
