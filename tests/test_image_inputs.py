"""Image inputs: only regular files are opened, the native path takes every array the Pillow path takes (and
gives the same pixels), and bad arrays and arguments are ImageErrors."""

from __future__ import annotations

import os
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import pyvl
from pyvl.errors import ImageError
from pyvl.image import open_image, open_rgb_array

native = pytest.importorskip("pyvl.ops.native", reason="the compiled extension is not built")

RNG = np.random.default_rng(20261201)
A = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)


def _pillow(array: np.ndarray, **kw) -> torch.Tensor:
    """The Pillow pipeline on its own terms: fromarray of a contiguous copy, convert("RGB"), no native code."""
    return pyvl.load_image(
        Image.fromarray(np.ascontiguousarray(array)).convert("RGB"), use_native=False, **kw
    )


def _call_with_timeout(fn, fifo: str | None = None, timeout: float = 10.0):
    """Run fn in a thread; if it is still blocked after `timeout`, open the FIFO for writing to release it and
    fail (a blocked open() cannot be interrupted otherwise)."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY))
        thread.join(timeout)
        pytest.fail(f"{fn} blocked for more than {timeout} s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = str(tmp_path / "photo.png")
    os.mkfifo(fifo)
    for fn in (
        lambda: pyvl.load_image(fifo),
        lambda: open_image(fifo),
        lambda: pyvl.load_image(fifo, use_native=False),
    ):
        with pytest.raises(
            ImageError, match="photo.png': cannot read image: it is a FIFO; expected a regular image"
        ):
            _call_with_timeout(fn, fifo)


def test_directories_devices_and_sockets_are_refused(tmp_path):
    with pytest.raises(ImageError, match="it is a directory; expected a regular image file"):
        pyvl.load_image(tmp_path)
    if os.path.exists("/dev/null"):
        with pytest.raises(ImageError, match="is a device"):
            _call_with_timeout(lambda: pyvl.load_image("/dev/null"))
    if hasattr(socket, "AF_UNIX"):
        path = str(tmp_path / "s.png")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            with pytest.raises(ImageError, match="s.png"):  # a socket cannot even be opened as a file
                pyvl.load_image(path)
    with pytest.raises(ImageError, match="no such file"):
        pyvl.load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a usable path"):
        pyvl.load_image("a\0b.png")


def test_regular_files_still_load(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(A).save(path)
    want = _pillow(A, max_num=2)
    assert torch.equal(pyvl.load_image(path, max_num=2), want)
    assert torch.equal(pyvl.load_image(str(path), max_num=2, use_native=False), want)


def _odd_stride_single_row() -> np.ndarray:
    # a 1-row view whose (never used) row stride is 0: numpy still calls it C-contiguous
    return np.lib.stride_tricks.as_strided(A[:1], shape=(1, 53, 3), strides=(0, 3, 1))


VIEWS = {
    "flipped rows": lambda: A[::-1],
    "flipped columns": lambda: A[:, ::-1],
    "BGR": lambda: A[..., ::-1],
    "broadcast": lambda: np.broadcast_to(A[:1], A.shape),
    "transposed": lambda: A.transpose(1, 0, 2),
    "every other column": lambda: A[:, ::2],
    "every other row": lambda: A[::2],
    "crop": lambda: A[3:30, 5:40],
    "fortran": lambda: np.asfortranarray(A),
    "read-only": lambda: np.frombuffer(A.tobytes(), dtype=np.uint8).reshape(A.shape),
    "rgba": lambda: RNG.integers(0, 256, (21, 34, 4), dtype=np.uint8),
    "rgba view": lambda: RNG.integers(0, 256, (21, 34, 4), dtype=np.uint8)[::-1, ::3],
    "grayscale": lambda: A[..., 1],
    "grayscale transposed": lambda: A[..., 1].T,
    "one row, odd stride": _odd_stride_single_row,
    "one column": lambda: A[:, 7:8],
}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("max_num", [1, 6])
def test_native_path_takes_every_array_the_pillow_path_takes(view, max_num):
    array = VIEWS[view]()
    want = _pillow(array, max_num=max_num)
    assert torch.equal(pyvl.load_image(array, max_num=max_num, use_native=True), want)
    assert torch.equal(pyvl.load_image(array, max_num=max_num, use_native=False), want)


def test_packed_rows_are_used_in_place_and_other_views_copied():
    crop = A[3:30, 5:40]  # packed pixels, rows 53 * 3 bytes apart
    assert open_rgb_array(crop) is crop
    for view in ("flipped rows", "broadcast", "transposed", "BGR"):
        array = VIEWS[view]()
        rgb = open_rgb_array(array)
        assert rgb.flags.c_contiguous and rgb.strides == (3 * array.shape[1], 3, 1)
        assert np.array_equal(rgb, array) and not np.shares_memory(rgb, A)


def test_the_kernel_takes_a_single_row_with_any_row_stride():
    row = _odd_stride_single_row()
    out = native.resize_tiles(row, 1, 1, 16, False, (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(out, native.resize_tiles(row.copy(), 1, 1, 16, False, (0.5,) * 3, (0.25,) * 3))


BAD_ARRAYS = {
    "float32": (np.zeros((8, 8, 3), np.float32), "expected dtype uint8"),
    "int16": (np.zeros((8, 8, 3), np.int16), "expected dtype uint8"),
    "bool": (np.zeros((8, 8, 3), bool), "expected dtype uint8"),
    "object": (np.full((8, 8, 3), None, object), "expected dtype uint8"),
    "no rows": (np.zeros((0, 8, 3), np.uint8), "expected height and width >= 1"),
    "no columns": (np.zeros((8, 0), np.uint8), "expected height and width >= 1"),
    "five channels": (np.zeros((8, 8, 5), np.uint8), r"expected \(H, W, 3\) RGB"),
    "two channels": (np.zeros((8, 8, 2), np.uint8), r"expected \(H, W, 3\) RGB"),
    "4-D": (np.zeros((1, 8, 8, 3), np.uint8), r"expected \(H, W, 3\) RGB"),
    "scalar": (np.uint8(3), "image of type uint8"),
}


@pytest.mark.parametrize("name", BAD_ARRAYS)
def test_bad_arrays_give_the_same_image_error_on_both_paths(name):
    array, match = BAD_ARRAYS[name]
    messages = []
    for use_native in (True, False):
        with pytest.raises(ImageError, match=match) as info:
            pyvl.load_image(array, use_native=use_native)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize("threads", [2**40, -1, 1025, True, 1.0, "2"])
def test_thread_counts_are_validated(threads):
    with pytest.raises(ImageError, match="num_threads"):
        pyvl.load_image(A, num_threads=threads)
    with pytest.raises(ImageError, match="num_threads must be an int >= 0 and <= 1024"):
        native.resize_tiles(A, 1, 1, 16, False, (0.5,) * 3, (0.25,) * 3, num_threads=threads)
    with pytest.raises(ImageError, match="num_threads must be an int >= 0 and <= 1024"):
        native.resize_bicubic(A, 4, 4, num_threads=threads)


def test_thread_count_limits_are_accepted():
    want = _pillow(A, max_num=2)
    for threads in (0, 1, 1024, np.int64(3)):
        assert torch.equal(pyvl.load_image(A, max_num=2, num_threads=threads), want)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(use_native="no"), "use_native='no': expected True or False"),
        (dict(use_thumbnail=1), "use_thumbnail=1"),
        (dict(image_size=4096), r"image_size=4096: expected an integer in 1..2048"),
        (dict(max_num=1.5), "max_num=1.5"),
        (dict(max_num=0), r"max_num=0: expected an integer in 1..40"),
        (dict(min_num=2, max_num=1), "min_num=2"),
        (dict(device="nonsense"), "device='nonsense' is not a torch device"),
        (dict(dtype="float32"), "dtype must be a torch.dtype"),
    ],
)
def test_load_image_arguments(kwargs, match):
    with pytest.raises(ImageError, match=match):
        pyvl.load_image(A, **kwargs)
