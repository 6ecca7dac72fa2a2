"""``pyvl bench preprocess --device cuda``: photo -> tiles on the GPU, the CUDA kernel against torch and the floor.

For each image (synthetic photo, max_num 12 by default: 3840x2160 -> 8 tiles + thumbnail) and each output dtype
(bf16, what the model eats, and fp32), all medians of triton.testing.do_bench (CUDA events, L2 flushed):
  kernel ms         pyvl.ops.native.resize_tiles_cuda on a uint8 image already on the device (the coefficient
                    upload and workspace allocation included: it is what a call costs)
  from host ms      the same call on the host image (pinned staging copy + upload + kernels): the whole call
  h2d ms            the image alone copied to the device, from pinned and from pageable host memory
  interpolate ms    F.interpolate(bicubic, antialias=True) of the device image to the grid and to the thumbnail,
                    crops, ImageNet normalisation, cast: the same output shape, in plain torch on the GPU
  floor ms          image bytes read + tile bytes written, over the device copy bandwidth measured in the run
The CUDA result is checked against the CPU kernel (resize_tiles, float32; rounded to bf16 for the bf16 row):
max abs diff, expected 0. "interp diff" is the torch path's max abs difference to it (a different resampler:
Pillow's fixed-point weights and uint8 intermediate are not reproduced there). Each row goes to the
:class:`~pyvl.bench.report.Report` as soon as it is measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PyvlError
from ..image import IMAGENET_MEAN, IMAGENET_STD, choose_grid
from .preprocess import synthetic_photo
from .report import Report
from .timing import format_table

__all__ = ["SIZES", "MAX_NUMS", "interpolate_tiles", "require_cuda_preprocessing", "run", "format_result"]

SIZES = ((3840, 2160), (1920, 1080), (640, 480))
MAX_NUMS = (12,)
TILE = 448
TARGET = {("3840x2160", 12, "bfloat16"): "< 0.1 ms"}  # the target: a 4K photo to tiles under 100 us


def require_cuda_preprocessing():
    """pyvl.ops.native with its CUDA kernels, or a PyvlError naming what is missing."""
    if not torch.cuda.is_available():
        raise PyvlError(
            "bench preprocess --device cuda needs a CUDA device (torch.cuda.is_available() is False "
            "here); without --device it times the CPU kernel"
        )
    try:
        from pyvl.ops import native
    except ImportError as exc:
        raise PyvlError(
            f"bench preprocess --device cuda needs the compiled extension pyvl._C: {exc}"
        ) from None
    if not native.has_cuda():
        raise PyvlError(
            "bench preprocess --device cuda: pyvl._C was built without its CUDA kernels (no nvcc at "
            "build time); reinstall with PYVL_CUDA=ON"
        )
    return native


def interpolate_tiles(
    image: torch.Tensor, cols: int, rows: int, dtype: torch.dtype, tile: int = TILE, thumbnail: bool = True
) -> torch.Tensor:
    """uint8 [H, W, 3] on the device -> normalised [cols*rows (+1), 3, tile, tile]: torch's antialiased bicubic."""
    x = image.permute(2, 0, 1)[None].float()  # (1, 3, H, W)

    def resize(size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)

    grid = resize((rows * tile, cols * tile))[0]  # (3, rows * tile, cols * tile)
    tiles = grid.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if thumbnail and cols * rows > 1:
        tiles = torch.cat([tiles, resize((tile, tile))])
    mean = torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    return ((tiles / 255 - mean) / std).to(dtype)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float()).abs().max())


def _image_rows(native, width: int, height: int, max_num: int, gbps: float, timer):
    """Yields the rows of one image, one per output dtype."""
    image = synthetic_photo(width, height)
    cols, rows = choose_grid(width, height, 1, max_num, TILE)
    on_device = torch.from_numpy(image).cuda()
    pinned = torch.from_numpy(image).pin_memory()
    target = torch.empty_like(on_device)
    h2d_pinned = timer(lambda: target.copy_(pinned, non_blocking=True))
    h2d_pageable = timer(lambda: target.copy_(torch.from_numpy(image)))
    cpu = native.resize_tiles(image, cols, rows, TILE, True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.empty(cpu.shape, dtype=dtype, device="cuda")

        def call(src, out=out, dtype=dtype):
            return native.resize_tiles_cuda(
                src, cols, rows, TILE, True, IMAGENET_MEAN, IMAGENET_STD, out=out, dtype=dtype
            )

        expected = cpu.to(dtype)
        diff = _max_abs(call(on_device), expected)
        interp = interpolate_tiles(on_device, cols, rows, dtype)
        kernel_ms = timer(lambda: call(on_device))
        interp_ms = timer(lambda: interpolate_tiles(on_device, cols, rows, dtype))
        floor_ms = (image.nbytes + out.numel() * out.element_size()) / (gbps * 1e6)
        name, dt = f"{width}x{height}", str(dtype).removeprefix("torch.")
        yield {
            "image": name,
            "max_num": max_num,
            "grid": f"{cols}x{rows}",
            "tiles": out.shape[0],
            "dtype": dt,
            "kernel_ms": round(kernel_ms, 4),
            "from_host_ms": round(timer(lambda: call(image)), 4),
            "h2d_pinned_ms": round(h2d_pinned, 4),
            "h2d_pageable_ms": round(h2d_pageable, 4),
            "interpolate_ms": round(interp_ms, 4),
            "floor_ms": round(floor_ms, 4),
            "floor/kernel": round(floor_ms / kernel_ms, 3),
            "interpolate/kernel": round(interp_ms / kernel_ms, 2),
            "max_abs_diff_vs_cpu": diff,
            "interp_max_abs_diff": _max_abs(interp, expected),
            "target": TARGET.get((name, max_num, dt), ""),
        }


def run(sizes=SIZES, max_nums=MAX_NUMS, repeat_ms: int = 100, report: Report | None = None) -> dict:
    """Measure into ``report``; returns its result, {"setup", "copy_GBps", "rows", "notes"}: one row per image
    size x max_num x output dtype."""
    report = report or Report()
    native = require_cuda_preprocessing()
    from .kernels import copy_gbps, median_ms

    report.set("setup", {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tile": TILE})
    gbps = copy_gbps(rep_ms=repeat_ms)
    report.set("copy_GBps", round(gbps, 1))
    timer = lambda fn: median_ms(fn, repeat_ms)  # noqa: E731
    for width, height in sizes:
        for max_num in max_nums:
            try:
                for row in _image_rows(native, width, height, max_num, gbps, timer):
                    report.row(row)
            except Exception as exc:  # one failing size should not hide the others
                report.note(f"{width}x{height} max_num {max_num}: {type(exc).__name__}: {str(exc)[:300]}")
            torch.cuda.empty_cache()
    return report.done()


def format_result(result: dict) -> str:
    s = result["setup"]
    head = (
        f"{s['device']}, torch {s['torch']}; device copy {result['copy_GBps']:.0f} GB/s (read + write), "
        f"the floor's bandwidth; times in ms"
    )
    keys = (
        "image",
        "max_num",
        "grid",
        "tiles",
        "dtype",
        "kernel_ms",
        "from_host_ms",
        "h2d_pinned_ms",
        "h2d_pageable_ms",
        "interpolate_ms",
        "floor_ms",
        "interpolate/kernel",
        "max_abs_diff_vs_cpu",
        "interp_max_abs_diff",
        "target",
    )
    short = {
        "kernel_ms": "kernel",
        "from_host_ms": "from host",
        "h2d_pinned_ms": "h2d pinned",
        "h2d_pageable_ms": "h2d pageable",
        "interpolate_ms": "interpolate",
        "floor_ms": "floor",
        "max_abs_diff_vs_cpu": "diff vs CPU",
        "interp_max_abs_diff": "interp diff",
    }
    rows = [{short.get(k, k): r[k] for k in keys} for r in result["rows"]]
    return "\n".join([head, format_table(rows)] + [f"note: {n}" for n in result["notes"]])
