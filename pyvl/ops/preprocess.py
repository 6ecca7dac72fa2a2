"""The ``resize_tiles`` op served by the compiled kernels of :mod:`pyvl.ops.native`.

Same signature as the reference (:func:`pyvl.ops.reference.resize_tiles`): an RGB uint8 [H, W, 3] image (pixels
3 or 4 bytes apart, as :func:`pyvl.image.rgb_pixels` gives them), the grid and tile size, whether to append the
thumbnail, mean/std, and the dtype and device the tiles are wanted in. Both kernels are bit-identical to the
reference in float32; any other dtype is that float32 value cast, as the model's own ``.to(dtype)`` of float32
tiles would. Importing this module fails without ``pyvl._C``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import PIL
import torch

from . import native

__all__ = ["matches_installed_pillow", "resize_tiles_cpu", "resize_tiles_cuda"]


def matches_installed_pillow() -> bool:
    """True when the kernels reproduce the installed Pillow's resize. Otherwise warn and return False: the
    caller then takes the Pillow + torch path, so results equal the installed Pillow's, never silently differ."""
    if native.pillow_pass_order() is not None:
        return True
    warnings.warn(
        f"Pillow {PIL.__version__} is not a release whose resize pyvl's kernels reproduce (upstream "
        "Pillow 10.0-13.x); images are preprocessed with Pillow + torch instead (exact, slower)",
        stacklevel=3,
    )
    return False


_CUDA_OUT_DTYPES = (torch.float32, torch.bfloat16)  # what the CUDA kernel writes itself


def resize_tiles_cpu(
    image: np.ndarray,
    cols: int,
    rows: int,
    tile: int,
    thumbnail: bool,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    device: torch.device,
    num_threads: int = 0,
) -> torch.Tensor:
    """The C++ kernel (float32 on the CPU; ``num_threads`` 0 = from the size and the cores), then cast and
    copied to ``device`` when asked for."""
    tiles = native.resize_tiles(image, cols, rows, tile, thumbnail, mean, std, num_threads=num_threads)
    return tiles.to(device=device, dtype=dtype)


def resize_tiles_cuda(
    image: np.ndarray,
    cols: int,
    rows: int,
    tile: int,
    thumbnail: bool,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The CUDA kernel: one upload of the uint8 image, tiles written on the device in float32 or bfloat16."""
    out_dtype = dtype if dtype in _CUDA_OUT_DTYPES else torch.float32  # float16: float32 tiles, then cast
    tiles = native.resize_tiles_cuda(
        image, cols, rows, tile, thumbnail, mean, std, dtype=out_dtype, device=device
    )
    return tiles.to(dtype)
