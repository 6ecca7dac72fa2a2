"""pyvl.kernels.vit_attention against pyvl.ops.reference.vit_attention (rules: kernel_tolerances.py).

On a CPU-only machine the kernel runs under TRITON_INTERPRET=1 at small shapes, odd lengths S = k*16 + 1 (the
ViT's 1025 is 64*16 + 1) with 16-key blocks; on a CUDA machine the same tests run on the GPU, plus the real
InternViT shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import assert_matches_oracle, fresh_generator, randn

from pyvl.kernels.vit_attention import vit_attention
from pyvl.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def vit_qkv(b, s, h, d, dtype, gen):
    """q, k, v as the ViT passes them: views of one fused qkv output, (N, S, 3, H, d) -> 3 x (N, H, S, d)."""
    qkv = randn(b, s, 3, h, d, dtype=dtype, device=DEVICE, gen=gen)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


def check(q, k, v, what, **kw):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poison: catches unwritten rows
    got = vit_attention(q, k, v, out=out, **kw)
    assert got is out
    oracle = ref.vit_attention(q.float(), k.float(), v.float())
    assert_matches_oracle(got, oracle, ref.vit_attention(q, k, v), what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("s, d", [(1, 64), (17, 128), (33, 64), (65, 128)])
def test_matches_reference(dtype, s, d):
    gen, seed = fresh_generator()
    check(*vit_qkv(1, s, 2, d, dtype, gen), f"seed {seed}")


@pytest.mark.parametrize("s, d", [(17, 16), (33, 32)])
def test_small_head_dims(s, d):
    gen, seed = fresh_generator()
    check(*vit_qkv(2, s, 2, d, torch.bfloat16, gen), f"seed {seed}")


def test_float16():
    gen, seed = fresh_generator()
    check(*vit_qkv(1, 33, 2, 64, torch.float16, gen), f"seed {seed}")


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (64, 16)])
def test_other_block_shapes(block_m, block_n):
    """Query and key tails of different lengths (33 = 2*16 + 1 = 1*32 + 1)."""
    gen, seed = fresh_generator()
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    check(*vit_qkv(1, 33, 2, 64, torch.bfloat16, gen), f"seed {seed}", config=cfg)


def test_contiguous_inputs_and_default_out():
    gen, _ = fresh_generator()
    q, k, v = (randn(2, 2, 17, 64, dtype=torch.bfloat16, device=DEVICE, gen=gen) for _ in range(3))
    out = vit_attention(q, k, v)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    assert_matches_oracle(out, ref.vit_attention(q.float(), k.float(), v.float()), ref.vit_attention(q, k, v))


def test_out_may_be_a_transposed_buffer():
    """out= with any strides: here the [N, S, H, d] layout the ViT's projection wants, seen as [N, H, S, d]."""
    gen, _ = fresh_generator()
    q, k, v = vit_qkv(1, 17, 2, 32, torch.bfloat16, gen)
    buf = torch.full((1, 17, 2, 32), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    vit_attention(q, k, v, out=buf.transpose(1, 2))
    assert_matches_oracle(
        buf.transpose(1, 2), ref.vit_attention(q.float(), k.float(), v.float()), ref.vit_attention(q, k, v)
    )


def test_rejects_bad_inputs():
    x = torch.zeros(1, 2, 17, 64, device=DEVICE)
    with pytest.raises(ValueError, match="last-dim stride"):
        vit_attention(x, x, torch.zeros(1, 2, 64, 17, device=DEVICE).transpose(2, 3))
    with pytest.raises(ValueError, match="dtype"):
        vit_attention(x, x, x.bfloat16())
    with pytest.raises(ValueError, match="power of two"):
        y = torch.zeros(1, 2, 17, 80, device=DEVICE)
        vit_attention(y, y, y)
    with pytest.raises(ValueError, match="one shape"):
        vit_attention(x, x[:, :, :5], x)
    with pytest.raises(ValueError, match="out must be"):
        vit_attention(x, x, x, out=torch.empty(1, 2, 17, 64, dtype=torch.bfloat16, device=DEVICE))


@gpu
@pytest.mark.parametrize("h, d", [(25, 128), (16, 64)])  # InternViT-6B, InternViT-300M
def test_real_shapes(h, d):
    gen, seed = fresh_generator()
    check(*vit_qkv(2, 1025, h, d, torch.bfloat16, gen), f"2 x {h} x 1025 x {d}, seed {seed}")
