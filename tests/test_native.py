"""pyvl.ops.native (and pyvl._C underneath) against the plain-torch reference: bit-exact, every error path.

The reference is the original preprocessing: t.permute(0, 3, 1, 2).float().div(255), then (x - mean) / std with
mean and std as float32 tensors. Outputs are poisoned with NaN so an unwritten element cannot pass.
"""

import numpy as np
import pytest
import torch

from pyvl.errors import ImageError
from pyvl.image import IMAGENET_MEAN, IMAGENET_STD
from pyvl.ops import native
from pyvl.ops.native import has_cuda
from pyvl import _C  # after pyvl.ops.native, whose ImportError explains a missing or shadowed build


def normalize_tiles(tiles, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
    """native.normalize_tiles with InternVL's constants (the kernel itself takes them)."""
    return native.normalize_tiles(tiles, mean, std, **kwargs)


SHAPES = [(1, 7, 13), (2, 13, 7), (3, 1, 1), (1, 448, 448), (3, 448, 448)]


def reference(tiles: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = tiles.cpu().permute(0, 3, 1, 2).float().div(255)  # (N, 3, H, W)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def random_tiles(n, h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def poisoned(n, h, w, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.full((n, 3, h, w), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("num_threads", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_exactly(shape, num_threads):
    tiles = random_tiles(*shape, seed=sum(shape))
    expected = reference(torch.from_numpy(tiles))
    got = normalize_tiles(tiles, num_threads=num_threads)  # numpy input
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)
    out = poisoned(*shape)
    result = normalize_tiles(torch.from_numpy(tiles), out=out, num_threads=num_threads)  # tensor input, given out
    assert result is out
    assert torch.equal(out, expected)


def test_every_uint8_value_and_custom_mean_std():
    # All 256 values in every channel, with mean/std that are not the ImageNet ones.
    values = np.arange(256, dtype=np.uint8)
    tiles = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(1, 16, 16, 3)
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.3, 0.7)
    out = normalize_tiles(tiles, mean=mean, std=std, out=poisoned(1, 16, 16))
    assert torch.equal(out, reference(torch.from_numpy(tiles), mean, std))


def test_more_threads_than_rows_and_read_only_input():
    tiles = random_tiles(2, 3, 5)
    tiles.flags.writeable = False  # what np.asarray(PIL image) gives
    assert torch.equal(normalize_tiles(tiles, num_threads=64), reference(torch.from_numpy(tiles.copy())))


def test_registered_custom_op():
    tiles = torch.from_numpy(random_tiles(2, 9, 11))
    out = poisoned(2, 9, 11)
    assert torch.ops.pyvl.normalize_tiles(tiles, list(IMAGENET_MEAN), list(IMAGENET_STD), out, 1) is None
    assert torch.equal(out, reference(tiles))
    torch.library.opcheck(
        torch.ops.pyvl.normalize_tiles.default, (tiles, list(IMAGENET_MEAN), list(IMAGENET_STD), poisoned(2, 9, 11), 1)
    )


def test_traced_by_torch_compile():
    tiles = torch.from_numpy(random_tiles(1, 5, 6))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def preprocess(t):
        return normalize_tiles(t) * 2

    assert torch.equal(preprocess(tiles), reference(tiles) * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_matches_cpu_reference(shape, dtype):
    assert has_cuda(), "torch sees a GPU but pyvl._C was built without CUDA"
    tiles = torch.from_numpy(random_tiles(*shape)).cuda()
    out = normalize_tiles(tiles, out=poisoned(*shape, dtype=dtype, device="cuda"))
    assert torch.equal(out.cpu(), reference(tiles).to(dtype))


@pytest.mark.skipif(has_cuda() or not torch.cuda.is_available(), reason="needs a GPU and a CPU-only pyvl._C")
def test_cuda_tiles_without_cuda_build():
    with pytest.raises(RuntimeError, match="built without CUDA"):
        normalize_tiles(torch.zeros((1, 2, 2, 3), dtype=torch.uint8, device="cuda"))


@pytest.mark.parametrize(
    "tiles, match",
    [
        (np.zeros((1, 4, 4, 3), np.float32), "must be uint8, got float32"),
        (torch.zeros((1, 4, 4, 3), dtype=torch.int16), "must be uint8, got torch.int16"),
        (np.zeros((1, 4, 4, 4), np.uint8), r"\[N, H, W, 3\].*\(1, 4, 4, 4\)"),
        (np.zeros((4, 4, 3), np.uint8), r"\[N, H, W, 3\].*\(4, 4, 3\)"),
        (np.zeros((1, 4, 8, 3), np.uint8)[:, :, ::2], "C-contiguous"),
        (torch.zeros((1, 3, 4, 4), dtype=torch.uint8).permute(0, 2, 3, 1), "C-contiguous"),
        (np.zeros((0, 4, 4, 3), np.uint8), "must not be empty"),
        (np.zeros((1, 0, 4, 3), np.uint8), "must not be empty"),
        (torch.zeros((1, 4, 4, 3), dtype=torch.uint8, device="meta"), "CPU or a CUDA device, got meta"),
        ([[[[0, 0, 0]]]], "numpy array or torch tensor, got list"),
    ],
)
def test_bad_tiles(tiles, match):
    with pytest.raises(ImageError, match=match):
        normalize_tiles(tiles)


@pytest.mark.parametrize(
    "out, match",
    [
        (torch.empty((1, 3, 4, 5)), r"shape \(1, 3, 4, 4\).*got \(1, 3, 4, 5\)"),
        (torch.empty((1, 4, 4, 3)), r"shape \(1, 3, 4, 4\)"),
        (torch.empty((1, 3, 4, 4), dtype=torch.float64), "got torch.float64"),
        (torch.empty((1, 3, 4, 4), dtype=torch.bfloat16), "got torch.bfloat16"),  # bfloat16 is CUDA-only
        (torch.empty((1, 4, 4, 3)).permute(0, 3, 1, 2), "must be contiguous"),
        (torch.empty((1, 3, 4, 4), device="meta"), "out is on meta but tiles are on cpu"),
        (np.empty((1, 3, 4, 4), np.float32), "must be a torch.Tensor, got ndarray"),
    ],
)
def test_bad_out(out, match):
    with pytest.raises(ImageError, match=match):
        normalize_tiles(np.zeros((1, 4, 4, 3), np.uint8), out=out)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean": (0.5, 0.5)}, "mean must be 3 numbers.*got 2"),
        ({"std": "abc"}, "std must be 3 numbers"),
        ({"num_threads": -1}, "num_threads must be an int >= 0"),
        ({"num_threads": 1.5}, "num_threads must be an int >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ImageError, match=match):
        normalize_tiles(np.zeros((1, 4, 4, 3), np.uint8), **kwargs)


def test_native_checks_reject_nonsense():
    # The bindings' own guards, for callers that bypass the wrapper.
    src, dst = np.zeros((1, 2, 2, 3), np.uint8), torch.empty((1, 3, 2, 2))
    args = (src.ctypes.data, dst.data_ptr(), 1, 2, 2, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="src is a null data pointer"):
        _C.normalize_tiles_cpu(0, *args[1:])
    with pytest.raises(ValueError, match=r"h \(tile height\) must be > 0, got 0"):
        _C.normalize_tiles_cpu(*args[:3], 0, *args[4:])
    with pytest.raises(ValueError, match="num_threads must be >= 0"):
        _C.normalize_tiles_cpu(*args, -2)
    if not has_cuda():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _C.normalize_tiles_cuda(1, 1, _C.FLOAT32, 1, 1, 1, IMAGENET_MEAN, IMAGENET_STD, 0)
    else:
        with pytest.raises(ValueError, match="unknown output dtype code 7"):
            _C.normalize_tiles_cuda(1, 1, 7, 1, 1, 1, IMAGENET_MEAN, IMAGENET_STD, 0)
