"""The RGB pixels of a decoded image in the layout pyvl's native resize reads in place, copied as little as possible.

The layout: uint8 [H, W, 3] (R, G, B) whose pixels are 3 bytes apart (packed RGB) or 4 (a 4th byte, Pillow's
padding or an alpha, lies between them and is not part of the image), rows any number of bytes apart but not
overlapping, all forward: strides (row, 3, 1) or (row, 4, 1). See :func:`layout`.

Pillow stores RGB, RGBA and RGBX images alike, 4 bytes a pixel with R, G, B first, in blocks of rows (16 MiB
each by default, so a 4K image takes several), and its convert("RGB") of RGBA or RGBX only drops the 4th byte.
So :func:`from_pil` reads those modes without converting them:

- in place, with no copy, where Pillow >= 13 exports the image through the Arrow C data interface (an image in
  one block with contiguous rows: up to 4 Mpixels by default). The export holds a reference on Pillow's pixel
  memory and the returned array holds the export, so the pixels stay valid while the array lives, even after the
  image is closed or deleted. Pillow 11.2-12.x export too but crash on memory-mapped images (``fromarray`` of an
  RGBA array, ``frombuffer``) and do not check row alignment, so they are not asked.
- otherwise with one copy of each row as it is (4-byte pixels, a plain memcpy): Pillow pastes the image into an
  image mapped onto a new array. ``np.asarray(image)`` instead packs the pixels to 3 bytes through Pillow's
  encoder and copies the result again to join its chunks, 2-3x slower.

Other modes are converted to RGB once (the original's own ``convert("RGB")``), then read the same way.
"""

from __future__ import annotations

import ctypes

import numpy as np
import PIL
from PIL import Image

__all__ = ["pillow_release", "layout", "from_pil"]

# Modes stored as 4 bytes a pixel with R, G, B first, whose convert("RGB") keeps exactly those three bytes.
_RGB_FIRST_MODES = ("RGB", "RGBA", "RGBX")


def pillow_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of an upstream Pillow release; None for Pillow-SIMD (".postN"), whose resampler differs."""
    parts = version.split(".")
    if "post" in version or len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


_release = pillow_release(PIL.__version__)
_ARROW_EXPORT_CHECKS_LAYOUT = _release is not None and _release >= (13, 0)


def layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """(row_stride, pixel_stride) in bytes of a non-empty uint8 [H, W, 3] array the native resize reads in place
    (pixel_stride 3 or 4, channels 1 byte apart, rows forward and at least a row of pixels apart); None for any
    other layout, which must be copied first. A dimension of size 1 is never stepped over, so its stride (numpy
    leaves odd ones there) does not count."""
    height, width = shape[0], shape[1]
    pixel = strides[1] if width > 1 else 3
    row = strides[0] if height > 1 else pixel * width
    if strides[2] != 1 or pixel not in (3, 4) or row < pixel * width:
        return None
    return row, pixel


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [  # the Arrow C data interface's ArrowSchema and ArrowArray: a stable C ABI
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

# A private prototype: setting argtypes on ctypes.pythonapi's shared function object would change it for others.
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


class _ExportedPixels:
    """Numpy's view of exported memory: the array keeps this object, and so the export's capsule, alive."""

    def __init__(self, address: int, shape: tuple[int, int, int], capsule) -> None:
        self.capsule = capsule  # releasing it (when the array goes) gives Pillow its reference back
        self.__array_interface__ = {"version": 3, "shape": shape, "typestr": "|u1", "data": (address, True)}


def _exported(img: Image.Image) -> np.ndarray | None:
    """img's [H, W, 4] pixels in place (read-only) through Pillow's Arrow export; None where it cannot export them
    so (several blocks, padded rows) or exports anything but W*H pixels of 4 uint8 values."""
    try:
        schema_capsule, array_capsule = img.__arrow_c_array__()
    except ValueError:  # "Image rows are not contiguous in memory."
        return None
    schema = _ArrowSchema.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
    array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
    width, height = img.size
    if not (
        schema.format == b"+w:4"
        and schema.n_children == 1
        and schema.children[0].contents.format == b"C"
        and array.length == width * height
        and array.offset == 0
        and array.n_children == 1
    ):
        return None
    values = array.children[0].contents
    if not (
        values.length == 4 * width * height
        and values.offset == 0
        and values.n_buffers == 2
        and values.buffers[1]
    ):
        return None
    return np.asarray(_ExportedPixels(values.buffers[1], (height, width, 4), array_capsule))


def _copied(img: Image.Image) -> np.ndarray:
    """img's [H, W, 4] pixels copied row by row into a new array (Pillow's paste between images of one pixel size
    is a memcpy per row); np.asarray(img), 3 bytes a pixel, where this Pillow refuses."""
    width, height = img.size
    out = np.empty((height, width, 4), np.uint8)
    try:
        target = Image.frombuffer("RGBX", img.size, out, "raw", "RGBX", 0, 1)  # mapped onto out's memory
        target.im.paste(img.im, (0, 0, width, height))
    except (AttributeError, TypeError, ValueError):  # the core API changed: Pillow's public, slower copy
        return np.asarray(img)
    return out


def from_pil(img: Image.Image) -> np.ndarray:
    """The pixels of a loaded PIL image as uint8 [H, W, 3] in :func:`layout`'s form, the same values as
    ``np.asarray(img.convert("RGB"))``: in place where Pillow can export them (read-only, sharing the image's
    memory), else one copy (see the module doc). The caller checks the size (Pillow's pixel limit)."""
    rgb = img if img.mode in _RGB_FIRST_MODES else img.convert("RGB")
    pixels = _exported(rgb) if _ARROW_EXPORT_CHECKS_LAYOUT else None
    if pixels is None:
        pixels = _copied(rgb)
    return pixels[..., :3]
