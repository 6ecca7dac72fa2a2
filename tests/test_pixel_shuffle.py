"""pyvl.kernels.pixel_shuffle against pyvl.ops.reference.pixel_shuffle: a permutation, so torch.equal.

Grids 4, 6 and 32 (the real 1024-patch grid), non-square h != w grids (where v1's transposed order shows),
odd-ish channel counts, v1 and v2, float32 and bfloat16, views with strides (the CLS row skipped by pointer
offset), outputs poisoned with NaN. Runs under TRITON_INTERPRET=1 on
CPU-only machines.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import fresh_generator, randn

from pyvl.kernels.pixel_shuffle import pixel_shuffle, pixel_shuffle_from_vit
from pyvl.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CASES = [(1, 4, 3), (2, 6, 5), (1, 32, 48), (3, 6, 48), (2, 32, 5)]  # (N, grid side, C)


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, g, c", CASES)
def test_matches_reference(n, g, c, dtype, ps_version):
    gen, seed = fresh_generator()
    x = randn(n, g, g, c, dtype=dtype, device=DEVICE, gen=gen)
    want = ref.pixel_shuffle(x, 0.5, ps_version)
    out = poisoned(want.shape, dtype)
    assert pixel_shuffle(x, 0.5, ps_version, out=out) is out
    assert torch.equal(out, want), f"seed {seed}"
    assert torch.equal(pixel_shuffle(x, 0.5, ps_version), want), f"seed {seed} (default out)"


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, g, c", CASES)
def test_from_vit_skips_cls_without_copy(n, g, c, dtype, ps_version):
    gen, seed = fresh_generator()
    vit = randn(n, 1 + g * g, c, dtype=dtype, device=DEVICE, gen=gen)
    want = ref.pixel_shuffle(vit[:, 1:].reshape(n, g, g, c), 0.5, ps_version)  # what shuffle_tokens does
    out = poisoned(want.shape, dtype)
    assert pixel_shuffle_from_vit(vit, ps_version, out=out) is out
    assert torch.equal(out, want), f"seed {seed}"
    # The same through pixel_shuffle on the model's view: vit[:, 1:] reshaped is a strided view, not a copy.
    view = vit[:, 1:].reshape(n, g, g, c)
    assert view.data_ptr() == vit.data_ptr() + c * vit.element_size()
    assert torch.equal(pixel_shuffle(view, 0.5, ps_version), want), f"seed {seed} (view)"


NON_SQUARE = [(1, 2, 4, 3), (2, 4, 6, 5), (1, 6, 2, 8), (2, 8, 4, 3), (1, 4, 32, 6)]  # (N, h, w, C), h != w


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("n, h, w, c", NON_SQUARE)
def test_non_square_grids(n, h, w, c, ps_version):
    """h != w: v1's transposed token order (t = j * h/2 + a) and v2's (t = a * w/2 + j) differ from any
    square-grid indexing that swaps h and w, which square grids cannot tell apart."""
    gen, seed = fresh_generator()
    x = randn(n, h, w, c, dtype=torch.float32, device=DEVICE, gen=gen)
    want = ref.pixel_shuffle(x, 0.5, ps_version)
    assert want.shape == (n, h * w // 4, 4 * c)
    out = poisoned(want.shape, torch.float32)
    assert pixel_shuffle(x, 0.5, ps_version, out=out) is out
    assert torch.equal(out, want), f"seed {seed} {ps_version} grid {h}x{w}"
    # the transposed view (w x h) is a strided input of the other shape: same rule
    xt = x.transpose(1, 2)
    assert torch.equal(pixel_shuffle(xt, 0.5, ps_version), ref.pixel_shuffle(xt, 0.5, ps_version)), (
        f"seed {seed} {ps_version} grid {w}x{h} (transposed view)"
    )


def test_non_square_token_order_by_hand():
    """The definition on a 2x4 grid of scalars: v2 keeps row-major cells, v1 lists them column by column."""
    x = torch.arange(8, dtype=torch.float32, device=DEVICE).reshape(1, 2, 4, 1)  # x[0, r, c, 0] = 4r + c
    cells = [[0, 1, 4, 5], [2, 3, 6, 7]]  # 2x2 cell (0, j): [x(0,2j), x(0,2j+1), x(1,2j), x(1,2j+1)]
    for version in ("v1", "v2"):  # one cell row: both orders agree here
        assert pixel_shuffle(x, 0.5, version)[0].tolist() == cells, version
    y = torch.arange(16, dtype=torch.float32, device=DEVICE).reshape(1, 4, 4, 1)[:, :, :2]  # a 4x2 grid view
    # y[0, r, c] = 4r + c; cells (a, 0) for a = 0, 1 -> [4*2a, 4*2a + 1, 4*(2a+1), 4*(2a+1) + 1]
    assert pixel_shuffle(y, 0.5, "v2")[0].tolist() == [[0, 1, 4, 5], [8, 9, 12, 13]]
    assert pixel_shuffle(y, 0.5, "v1")[0].tolist() == [[0, 1, 4, 5], [8, 9, 12, 13]]
    z = torch.arange(24, dtype=torch.float32, device=DEVICE).reshape(1, 4, 6, 1)  # z[0, r, c] = 6r + c
    grid = [
        [
            [6 * 2 * a + 2 * j, 6 * 2 * a + 2 * j + 1, 6 * (2 * a + 1) + 2 * j, 6 * (2 * a + 1) + 2 * j + 1]
            for j in range(3)
        ]
        for a in range(2)
    ]  # grid[a][j]: the 2 x 3 merged cells
    assert pixel_shuffle(z, 0.5, "v2")[0].tolist() == [grid[a][j] for a in range(2) for j in range(3)]
    assert pixel_shuffle(z, 0.5, "v1")[0].tolist() == [grid[a][j] for j in range(3) for a in range(2)]
    assert torch.equal(ref.pixel_shuffle(z, 0.5, "v1"), pixel_shuffle(z, 0.5, "v1"))


@pytest.mark.parametrize("c", [48, 200])
def test_gpu_block_shapes(monkeypatch, c):
    # The GPU's tiling (128-channel blocks with a masked tail, 32-token blocks), also under the interpreter.
    import pyvl.kernels.pixel_shuffle as kernel

    gpu_blocks = kernel._blocks(c, interpreting=False)
    monkeypatch.setattr(kernel, "_blocks", lambda c, interpreting: gpu_blocks)
    gen, seed = fresh_generator()
    vit = randn(2, 1 + 32 * 32, c, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    for version in ("v1", "v2"):
        want = ref.pixel_shuffle(vit[:, 1:].reshape(2, 32, 32, c), 0.5, version)
        assert torch.equal(pixel_shuffle_from_vit(vit, version), want), f"seed {seed} {version} {gpu_blocks}"


def test_strided_input_and_output():
    gen, seed = fresh_generator()
    wide = randn(2, 6, 6, 16, dtype=torch.float32, device=DEVICE, gen=gen)
    x = wide[..., 3:8]  # C = 5 with a channel stride of 1 but row strides of 16
    big_out = poisoned((2, 9, 40), torch.float32)
    out = big_out[:, :, 10:30]  # a non-contiguous out= view
    for version in ("v1", "v2"):
        pixel_shuffle(x, 0.5, version, out=out)
        assert torch.equal(out, ref.pixel_shuffle(x, 0.5, version)), f"seed {seed} {version}"
    assert big_out[:, :, :10].isnan().all() and big_out[:, :, 30:].isnan().all()  # nothing written outside


def test_rejects_bad_inputs():
    x = torch.zeros(1, 4, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="scale 0.5"):
        pixel_shuffle(x, 0.25, "v2")
    with pytest.raises(ValueError, match="ps_version must be one of"):
        pixel_shuffle(x, 0.5, "v3")
    with pytest.raises(ValueError, match=r"\[N, h, w, C\] patch grid, got shape \(4, 4, 8\)"):
        pixel_shuffle(x[0], 0.5, "v2")
    with pytest.raises(ValueError, match="even height and width"):
        pixel_shuffle(torch.zeros(1, 5, 4, 8, device=DEVICE), 0.5, "v2")
    with pytest.raises(ValueError, match="non-empty"):
        pixel_shuffle(torch.zeros(0, 4, 4, 8, device=DEVICE), 0.5, "v2")
    with pytest.raises(ValueError, match="dtype torch.int32 is not one of"):
        pixel_shuffle(x.int(), 0.5, "v2")
    with pytest.raises(ValueError, match=r"out must be \(1, 4, 32\)"):
        pixel_shuffle(x, 0.5, "v2", out=torch.empty(1, 4, 33, device=DEVICE))
    with pytest.raises(ValueError, match=r"out must be .*torch.float32"):
        pixel_shuffle(x, 0.5, "v2", out=torch.empty(1, 4, 32, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="1025 = 1 \\+ 32\\*32"):
        pixel_shuffle_from_vit(torch.zeros(1, 16, 8, device=DEVICE), "v2")  # no CLS row
    with pytest.raises(ValueError, match=r"\[N, 1 \+ g\*g, C\]"):
        pixel_shuffle_from_vit(torch.zeros(17, 8, device=DEVICE), "v2")


@gpu
@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("c", [3200, 1024])
def test_real_shapes(c, ps_version):
    gen, seed = fresh_generator()
    vit = randn(13, 1025, c, dtype=torch.bfloat16, device=DEVICE, gen=gen)  # 12 tiles + thumbnail
    want = ref.pixel_shuffle(vit[:, 1:].reshape(13, 32, 32, c), 0.5, ps_version)
    assert torch.equal(pixel_shuffle_from_vit(vit, ps_version), want), f"seed {seed}"
