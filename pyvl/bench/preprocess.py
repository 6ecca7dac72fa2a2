"""``pyvl bench preprocess``: image -> pixel values, pyvl's fused kernel vs the original Pillow + torch pipeline.

The baseline is what the original ``load_image`` does (Pillow BICUBIC resize of the grid, crops, a second
resize for the thumbnail, ToTensor + Normalize per tile), timed on the same machine in the same run; both
paths produce identical pixel values, which the benchmark checks before timing. Threads: the fused kernel
runs with 1 thread and with every core; the baseline's torch ops run with the same thread count. Each size is
timed from a decoded RGB array and, at max_num 12 (the default), from a PIL image too: what the original's own
``Image.open(...).convert("RGB")`` hands its pipeline, and what pyvl reads without converting.

Pillow-SIMD installs as the module PIL too, so when it is the PIL of the environment the baseline columns are
named after it and its (inexact) results are reported as the share of values that differ instead of refused.
"""

from __future__ import annotations

import os
from importlib import metadata

import numpy as np
import torch
from PIL import Image

from ..image import dynamic_preprocess, load_image, pixel_values_reference
from .timing import median_seconds

__all__ = ["SIZES", "MAX_NUMS", "PIL_MAX_NUM", "pillow_flavour", "pillow_pipeline", "run"]

SIZES = ((3840, 2160), (1920, 1080), (640, 480))
MAX_NUMS = (6, 12, 40)
PIL_MAX_NUM = 12  # the max_num also timed from a PIL image


def synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth gradients plus texture (content does not change the resize cost)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    return (base + rng.integers(0, 56, size=(height, width, 3))).astype(np.uint8)


def pillow_flavour() -> str:
    """'pillow-simd' when the importable PIL is Pillow-SIMD (its versions end in .postN), else 'pillow'."""
    import PIL

    try:
        metadata.distribution("Pillow-SIMD")
        return "pillow-simd"
    except metadata.PackageNotFoundError:
        return "pillow-simd" if "post" in PIL.__version__ else "pillow"


def pillow_pipeline(image: np.ndarray | Image.Image, max_num: int) -> torch.Tensor:
    """The original load_image after decoding: a PIL image converted to RGB (as the original converts what it
    opens), Pillow tiles, then ToTensor + Normalize."""
    rgb = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image)
    tiles = dynamic_preprocess(rgb, 1, max_num)
    return pixel_values_reference(np.stack([np.asarray(t) for t in tiles]))


def _row(
    image: np.ndarray | Image.Image, size: str, max_num: int, flavour: str, cores: int, repeat: int
) -> dict:
    """One table row: the image through both pipelines, checked equal, then timed at 1 thread and every core."""
    fused = load_image(image, max_num=max_num, num_threads=1)
    baseline = pillow_pipeline(image, max_num)
    row = {
        "image": size,
        "input": "PIL" if isinstance(image, Image.Image) else "array",
        "max_num": max_num,
        "tiles": fused.shape[0],
    }
    if flavour == "pillow-simd":
        row["pillow-simd values differing"] = f"{(fused != baseline).double().mean().item():.2%}"
    elif not torch.equal(fused, baseline):
        raise AssertionError(f"{size} {row['input']} max_num {max_num}: fused kernel != Pillow pipeline")
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        base = median_seconds(lambda: pillow_pipeline(image, max_num), repeat=repeat)
        ours = median_seconds(lambda: load_image(image, max_num=max_num, num_threads=threads), repeat=repeat)
        tag = "1t" if threads == 1 else f"{threads}t"
        row[f"{flavour}+torch {tag} ms"] = f"{base * 1e3:.1f}"
        row[f"pyvl {tag} ms"] = f"{ours * 1e3:.1f}"
        row[f"speedup {tag}"] = f"{base / ours:.1f}x"
    return row


def run(sizes=SIZES, max_nums=MAX_NUMS, repeat: int = 3) -> list[dict]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    flavour = pillow_flavour()
    rows = []
    saved_threads = torch.get_num_threads()
    try:
        for width, height in sizes:
            photo = synthetic_photo(width, height)
            for max_num in max_nums:
                images = (photo, Image.fromarray(photo)) if max_num == PIL_MAX_NUM else (photo,)
                rows += [
                    _row(image, f"{width}x{height}", max_num, flavour, cores, repeat) for image in images
                ]
    finally:
        torch.set_num_threads(saved_threads)
    return rows
