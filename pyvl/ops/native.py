"""Checked Python wrappers over the compiled extension ``pyvl._C``.

``pyvl._C`` links no libtorch: its functions take raw data pointers, sizes, an output dtype code and, for CUDA
ops, the stream handle. This module checks device, dtype, shape and memory layout (never silently copying),
allocates ``out`` when it is not given, and calls the native function directly (a few microseconds).

Every op reads an RGB uint8 [H, W, 3] image where it lies: rows any distance apart, pixels 3 bytes apart
(packed) or 4 (RGBX or RGBA memory, the 4th byte ignored: how Pillow stores RGB images; see
:func:`pyvl.image.rgb_pixels`), strides (row, 3, 1) or (row, 4, 1). Any other layout is refused, never copied.

resize_bicubic
    RGB uint8 [H, W, 3] -> uint8 [out_h, out_w, 3], bit-identical to ``PIL.Image.resize(.., BICUBIC)`` of the
    installed Pillow: which of the two passes runs first changed in Pillow 12.2 and 13 and is visible in the
    result, so the resize functions take ``pass_order`` (default: the installed Pillow's, see
    :func:`pillow_pass_order`).
resize_tiles
    RGB uint8 [H, W, 3] -> float32 [cols*rows (+1 thumbnail), 3, T, T]: the original dynamic_preprocess
    (grid resize, row-major crops, thumbnail of the whole image last) and ToTensor + Normalize in one pass:
    out[n, c, y, x] = (u / 255 - mean[c]) / std[c] in float32 (true division, no fused multiply-add), mean and
    std rounded to float32, bit-identical to the CPU torch reference.
resize_tiles_cuda
    The same on a CUDA device, out float32 (equal to resize_tiles) or bfloat16 (resize_tiles rounded to
    nearest even). A host image is packed into a pinned buffer together with the bicubic weights and uploaded
    with one asynchronous copy on the current stream; a CUDA uint8 tensor is read where it is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import PIL
import torch

from pyvl.errors import ImageError
from pyvl.pixels import layout, pillow_release

try:
    from pyvl import _C
except ImportError as exc:  # the usual cause: the source tree's pyvl/ shadows the installed package
    import pyvl

    raise ImportError(
        f"pyvl._C (the compiled extension) is not importable next to pyvl at {list(pyvl.__path__)}: {exc}. "
        "Build it with `pip install .` and run from outside the source tree (or with `python -P`), "
        "or use an editable install (`pip install -e .`), which works from anywhere."
    ) from exc

__all__ = [
    "MAX_GRID_TILES",
    "pillow_pass_order",
    "pass_order_for",
    "has_cuda",
    "resize_bicubic",
    "resize_tiles",
    "resize_tiles_cuda",
]

# The largest grid the kernels accept: the range they are tested at. Which grid an image gets is the tiling
# policy's business (pyvl.image.choose_grid, at most pyvl.image.MAX_TILES), not this module's.
MAX_GRID_TILES = 40
MAX_THREADS = 1024  # the kernels take a C int; more threads than this is a mistake, not a machine

# torch dtype -> _C dtype code of the tiles resize_tiles_cuda writes (the CPU kernel writes float32 only).
_CUDA_OUT_DTYPES = {torch.float32: _C.FLOAT32, torch.bfloat16: _C.BFLOAT16}


def pass_order_for(version: str) -> int | None:
    """The `_C.PASS_ORDER_*` rule of Pillow ``version``, or None outside the releases pyvl reproduces (10.0-13.x)."""
    release = pillow_release(version)
    if release is None or not (10, 0) <= release < (14, 0):
        return None
    if release <= (12, 1):
        return _C.PASS_ORDER_PILLOW_12_1  # horizontal pass first, always
    if release < (13, 0):
        return _C.PASS_ORDER_PILLOW_12_2  # vertical first for tall images that shrink
    return _C.PASS_ORDER_PILLOW_13  # vertical first when the height shrinks more than twice the width


@functools.cache
def pillow_pass_order() -> int | None:
    """The installed Pillow's pass-order rule (None: not one the kernels reproduce; use the Pillow path)."""
    return pass_order_for(PIL.__version__)


def _resolve_pass_order(pass_order: int | None, op: str) -> int:
    if pass_order is None:
        pass_order = pillow_pass_order()
        if pass_order is None:
            raise ImageError(
                f"{op}: the installed Pillow {PIL.__version__} is not a release whose resize pyvl "
                "reproduces (upstream Pillow 10.0-13.x); pass pass_order=_C.PASS_ORDER_PILLOW_* "
                "explicitly or use the Pillow path (load_image(..., use_native=False))"
            )
    if pass_order not in (_C.PASS_ORDER_PILLOW_12_1, _C.PASS_ORDER_PILLOW_12_2, _C.PASS_ORDER_PILLOW_13):
        raise ImageError(f"{op}: pass_order={pass_order!r} is not one of pyvl._C.PASS_ORDER_PILLOW_*")
    return pass_order


def _call(op: str, what: str, fn, *args, **kwargs) -> None:
    """Run a native resize; its refusals (sizes, memory) become an ImageError naming the image and the output."""
    try:
        fn(*args, **kwargs)
    except (MemoryError, ValueError) as exc:
        raise ImageError(f"{op}: {what}: {exc}") from exc


def has_cuda() -> bool:
    """True when pyvl._C was compiled with its CUDA kernels (nvcc was found at build time)."""
    return _C.has_cuda()


def _channels(op: str, name: str, values: Sequence[float]) -> tuple[float, float, float]:
    try:
        channels = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ImageError(f"{op}: {name} must be 3 numbers (R, G, B), got {values!r}") from None
    if len(channels) != 3:
        raise ImageError(f"{op}: {name} must be 3 numbers (R, G, B), got {len(channels)}: {values!r}")
    return channels


def _layout_error(op: str, shape, strides, fix: str) -> ImageError:
    return ImageError(
        f"{op}: image of shape {shape} must have RGB pixels 3 or 4 bytes apart, rows forward (strides "
        f"(row, 3, 1) or (row, 4, 1)), got strides {strides}; make a contiguous copy first ({fix})"
    )


def _check_image(image: np.ndarray, op: str) -> tuple[int, int, int, int]:
    """(h, w, row_stride, pixel_stride) of an RGB uint8 [H, W, 3] array in pyvl.pixels.layout's form: pixels 3
    bytes apart (packed) or 4 (an RGBX / RGBA buffer's first three channels), rows any distance apart."""
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{op}: image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"{op}: image must be uint8, got {image.dtype} (shape {image.shape})")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"{op}: image must have shape [H, W, 3] (RGB, channels last), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{op}: image must not be empty, got shape {image.shape}")
    strides = layout(image.shape, image.strides)
    if strides is None:
        raise _layout_error(op, image.shape, image.strides, "image.copy()")
    return (*image.shape[:2], *strides)


def _check_threads(num_threads, op: str) -> int:
    if (
        isinstance(num_threads, (bool, np.bool_))
        or not isinstance(num_threads, (int, np.integer))
        or not 0 <= num_threads <= MAX_THREADS
    ):
        raise ImageError(
            f"{op}: num_threads must be an int >= 0 and <= {MAX_THREADS} (0 = automatic), got {num_threads!r}"
        )
    return int(num_threads)


def _check_grid(cols, rows, tile, op: str) -> None:
    """cols x rows tiles of tile x tile pixels, 1..MAX_GRID_TILES of them."""
    for name, value in (("cols", cols), ("rows", rows), ("tile", tile)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ImageError(f"{op}: {name} must be an int, got {value!r}")
    if not (1 <= cols * rows <= MAX_GRID_TILES) or cols < 1 or rows < 1:
        raise ImageError(f"{op}: a grid of {cols}x{rows} tiles is out of range (1..{MAX_GRID_TILES} tiles)")
    if tile < 1:
        raise ImageError(f"{op}: tile size must be positive, got {tile}")


def resize_bicubic(
    image: np.ndarray, out_w: int, out_h: int, num_threads: int = 0, pass_order: int | None = None
) -> np.ndarray:
    """Pillow-exact ``resize((out_w, out_h), BICUBIC)`` of an RGB uint8 [H, W, 3] array."""
    h, w, row_stride, pixel_stride = _check_image(image, "resize_bicubic")
    num_threads = _check_threads(num_threads, "resize_bicubic")
    pass_order = _resolve_pass_order(pass_order, "resize_bicubic")
    if out_w < 1 or out_h < 1:
        raise ImageError(f"resize_bicubic: output size must be positive, got {out_w}x{out_h}")
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    _call(
        "resize_bicubic",
        f"{w}x{h} image to {out_w}x{out_h}",
        _C.resize_bicubic_cpu,
        image.ctypes.data,
        h,
        w,
        row_stride,
        out.ctypes.data,
        out_h,
        out_w,
        num_threads,
        pass_order=pass_order,
        pixel_stride=pixel_stride,
    )
    return out


def resize_tiles(
    image: np.ndarray,
    cols: int,
    rows: int,
    tile: int,
    thumbnail: bool,
    mean: Sequence[float],
    std: Sequence[float],
    out: torch.Tensor | None = None,
    num_threads: int = 0,
    pass_order: int | None = None,
) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> normalised float32 tiles [cols*rows (+1), 3, tile, tile] (see module doc).

    The thumbnail is appended only when asked for *and* the grid has more than one tile, as the original.
    """
    h, w, row_stride, pixel_stride = _check_image(image, "resize_tiles")
    mean, std = _channels("resize_tiles", "mean", mean), _channels("resize_tiles", "std", std)
    num_threads = _check_threads(num_threads, "resize_tiles")
    _check_grid(cols, rows, tile, "resize_tiles")
    pass_order = _resolve_pass_order(pass_order, "resize_tiles")
    thumbnail = bool(thumbnail) and cols * rows > 1
    n = cols * rows + int(thumbnail)
    if out is None:
        out = torch.empty((n, 3, tile, tile), dtype=torch.float32)
    elif (
        tuple(out.shape) != (n, 3, tile, tile)
        or out.dtype != torch.float32
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        raise ImageError(
            f"resize_tiles: out must be a contiguous float32 CPU tensor of shape {(n, 3, tile, tile)}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    _call(
        "resize_tiles",
        f"{w}x{h} image, {cols}x{rows} grid of {tile}px tiles",
        _C.resize_tiles_cpu,
        image.ctypes.data,
        h,
        w,
        row_stride,
        out.data_ptr(),
        cols,
        rows,
        tile,
        thumbnail,
        mean,
        std,
        num_threads,
        pass_order=pass_order,
        pixel_stride=pixel_stride,
    )
    return out


_ALIGN = 256  # bytes; the coefficient block after a packed host image starts on this boundary


def _check_cuda_image(image, op: str) -> tuple[int, int, int, bool]:
    """(h, w, row_stride, pixel_stride, on_cuda) of an RGB uint8 [H, W, 3] numpy array or torch tensor laid out as
    _check_image wants."""
    if isinstance(image, torch.Tensor):
        if image.device.type not in ("cpu", "cuda"):
            raise ImageError(f"{op}: image must be on the CPU or a CUDA device, got {image.device}")
        if image.dtype != torch.uint8:
            raise ImageError(f"{op}: image must be uint8, got {image.dtype} (shape {tuple(image.shape)})")
        if image.dim() != 3 or image.shape[2] != 3:
            raise ImageError(
                f"{op}: image must have shape [H, W, 3] (RGB, channels last), got {tuple(image.shape)}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ImageError(f"{op}: image must not be empty, got shape {tuple(image.shape)}")
        if image.device.type == "cpu":  # a host image either way; numpy() shares the memory
            return (*_check_image(image.numpy(), op), False)
        strides = layout(tuple(image.shape), image.stride())
        if strides is None:
            raise _layout_error(op, tuple(image.shape), image.stride(), ".contiguous()")
        return image.shape[0], image.shape[1], *strides, True
    return (*_check_image(image, op), False)


def _row_bytes(image: np.ndarray, row_stride: int, pixel_stride: int) -> np.ndarray:
    """The bytes of each row's pixels as an [H, (W - 1) * pixel_stride + 3] view (a plain copy per row, where an
    element-wise copy of a 4-byte-pixel view would be ~10x slower); the last pixel's 4th byte is left out, as it
    may lie past the array's memory."""
    height, width = image.shape[:2]
    return np.lib.stride_tricks.as_strided(
        image, (height, (width - 1) * pixel_stride + 3), (row_stride, 1), writeable=False
    )


def _cuda_target(device, image, op: str) -> torch.device:
    """The CUDA device to run on, from `device` and a CUDA image (checked without touching CUDA)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ImageError(f"{op}: device={device!r} is not a torch device ({exc})") from None
    if target.type != "cuda":
        raise ImageError(
            f"{op}: device must be a CUDA device, got {target} (resize_tiles is the CPU version)"
        )
    if isinstance(image, torch.Tensor) and image.device.type == "cuda":
        if target.index is not None and target != image.device:
            raise ImageError(f"{op}: image is on {image.device} but device={target}")
        target = image.device
    return target


def resize_tiles_cuda(
    image: np.ndarray | torch.Tensor,
    cols: int,
    rows: int,
    tile: int,
    thumbnail: bool,
    mean: Sequence[float],
    std: Sequence[float],
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    pass_order: int | None = None,
) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> normalised tiles [cols*rows (+1), 3, tile, tile] of `dtype` on a CUDA device.

    Exactly :func:`resize_tiles` (Pillow-exact bicubic, thumbnail last when asked for and cols*rows > 1), in
    float32 or bfloat16 (the float32 value rounded to nearest even). ``image`` is a numpy array or CPU tensor
    (its rows copied into a pinned buffer as they are, 3 or 4 bytes a pixel, and uploaded asynchronously on the
    current stream) or a CUDA uint8 tensor (read in place; ``device`` must then name its device or just "cuda").
    Rows may be strided; pixels are 3 or 4 bytes apart, as for :func:`resize_tiles`. ``out``, when given, is a
    contiguous tensor of that shape and of ``dtype`` on the device. Returns without waiting for the GPU.
    """
    op = "resize_tiles_cuda"
    h, w, row_stride, pixel_stride, on_cuda = _check_cuda_image(image, op)
    mean, std = _channels(op, "mean", mean), _channels(op, "std", std)
    _check_grid(cols, rows, tile, op)
    pass_order = _resolve_pass_order(pass_order, op)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ImageError(f"{op}: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    target = _cuda_target(device, image, op)
    thumbnail = bool(thumbnail) and cols * rows > 1
    shape = (cols * rows + int(thumbnail), 3, tile, tile)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ImageError(f"{op}: out must be a torch.Tensor, got {type(out).__name__}")
        if (
            tuple(out.shape) != shape
            or out.dtype != dtype
            or out.device.type != "cuda"
            or (target.index is not None and out.device != target)
            or not out.is_contiguous()
        ):
            raise ImageError(
                f"{op}: out must be a contiguous {dtype} tensor of shape {shape} on {target}, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
                f"{'' if out.is_contiguous() else ' (not contiguous)'}"
            )
    if not _C.has_cuda():
        raise RuntimeError(
            f"{op}: pyvl._C was built without CUDA (no nvcc at build time); reinstall pyvl with "
            "nvcc on PATH (PYVL_CUDA=ON makes a missing nvcc a build error), or use resize_tiles"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{op}: torch.cuda is not available (a CPU-only torch build, or no GPU visible); "
            "use resize_tiles, the CPU version"
        )
    if target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if out is not None and out.device != target:
        raise ImageError(f"{op}: out is on {out.device} but the image goes to {target}")

    with torch.cuda.device(target):  # the kernels launch on the current device, which must own the stream
        stream = torch.cuda.current_stream(target)
        what = f"{w}x{h} image, {cols}x{rows} grid of {tile}px tiles"
        try:
            coeff_bytes, tmp_bytes = _C.resize_tiles_cuda_workspace(
                h, w, cols, rows, tile, thumbnail, pass_order=pass_order
            )
        except (MemoryError, ValueError) as exc:
            raise ImageError(f"{op}: {what}: {exc}") from exc
        # One pinned host buffer, [image rows | weights] (image left out when it is on the GPU already), one
        # asynchronous upload; the caching host allocator keeps the buffer until that copy has run.
        image_bytes = 0 if on_cuda else -(-h * w * pixel_stride // _ALIGN) * _ALIGN
        staging = torch.empty(image_bytes + coeff_bytes, dtype=torch.uint8, pin_memory=True)
        if not on_cuda:
            rows_in = _row_bytes(
                image.numpy() if isinstance(image, torch.Tensor) else image, row_stride, pixel_stride
            )
            row_stride = pixel_stride * w  # the staged rows are adjacent
            staging[: h * row_stride].numpy().reshape(h, row_stride)[:, : rows_in.shape[1]] = rows_in
        _call(
            op,
            what,
            _C.resize_tiles_cuda_coefficients,
            h,
            w,
            cols,
            rows,
            tile,
            thumbnail,
            staging.data_ptr() + image_bytes,
            coeff_bytes,
            pass_order=pass_order,
        )
        # Device side: [image | weights | uint8 intermediate]; freed on return, safely, as later users of the
        # block are ordered after these kernels on the same stream.
        workspace = torch.empty(image_bytes + coeff_bytes + tmp_bytes, dtype=torch.uint8, device=target)
        workspace[: staging.numel()].copy_(staging, non_blocking=True)
        base = workspace.data_ptr()
        src = image.data_ptr() if on_cuda else base
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=target)
        _call(
            op,
            what,
            _C.resize_tiles_cuda,
            src,
            h,
            w,
            row_stride,
            out.data_ptr(),
            _CUDA_OUT_DTYPES[dtype],
            cols,
            rows,
            tile,
            thumbnail,
            mean,
            std,
            base + image_bytes,
            coeff_bytes,
            base + image_bytes + coeff_bytes,
            tmp_bytes,
            stream.cuda_stream,
            pass_order=pass_order,
            pixel_stride=pixel_stride,
        )
    return out
