"""pyvl.ops.native's shared argument checks and pyvl._C's own guards for the CPU resize ops.

The kernels' results (bit-identical to Pillow + ToTensor + Normalize) are tested in test_resize_tiles.py and
test_native_cuda_resize.py; here every refusal is an ImageError (the wrappers) or a ValueError (the bindings,
for callers that bypass the wrappers) naming what is wrong, before any pixel is read.
"""

import numpy as np
import pytest
import torch

from pyvl import _C  # after pyvl.ops.native, whose ImportError explains a missing or shadowed build
from pyvl.errors import ImageError
from pyvl.image import IMAGENET_MEAN, IMAGENET_STD
from pyvl.ops import native

IMAGE = np.zeros((4, 5, 3), np.uint8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean": (0.5, 0.5)}, r"resize_tiles: mean must be 3 numbers \(R, G, B\), got 2"),
        ({"std": "abc"}, "resize_tiles: std must be 3 numbers"),
        ({"std": (1, 2, None)}, "resize_tiles: std must be 3 numbers"),
    ],
)
def test_bad_mean_and_std(kwargs, match):
    args = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **kwargs}
    with pytest.raises(ImageError, match=match):
        native.resize_tiles(IMAGE, 1, 1, 8, False, args["mean"], args["std"])


def test_cpu_guards_reject_nonsense():
    out = torch.empty((1, 3, 8, 8))
    args = dict(
        src=IMAGE.ctypes.data,
        h=4,
        w=5,
        row_stride=15,
        dst=out.data_ptr(),
        cols=1,
        rows=1,
        tile=8,
        thumbnail=False,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_threads=1,
        pass_order=_C.PASS_ORDER_PILLOW_13,
    )
    for change, match in [
        ({"src": 0}, "src is a null data pointer"),
        ({"dst": 0}, "dst is a null data pointer"),
        ({"h": 0}, "source height must be > 0"),
        ({"row_stride": 14}, "row_stride 14 is smaller than 3 \\* width 15"),
        ({"tile": 0}, "tile must be > 0, got 0"),
        ({"num_threads": -2}, "num_threads must be >= 0"),
        ({"pass_order": 7}, "pass_order must be"),
        ({"pixel_stride": 5}, r"pixel_stride must be 3 \(RGB\) or 4 \(RGBX\), got 5"),
        ({"pixel_stride": 4, "row_stride": 19}, "row_stride 19 is smaller than 4 \\* width 20"),
    ]:
        with pytest.raises(ValueError, match=match):
            _C.resize_tiles_cpu(**{**args, **change})
    resize = dict(
        src=IMAGE.ctypes.data,
        h=4,
        w=5,
        row_stride=15,
        dst=out.data_ptr(),
        out_h=2,
        out_w=2,
        pass_order=_C.PASS_ORDER_PILLOW_13,
    )
    for change, match in [({"dst": 0}, "dst is a null"), ({"out_w": 0}, "out_w must be > 0")]:
        with pytest.raises(ValueError, match=match):
            _C.resize_bicubic_cpu(**{**resize, **change})
