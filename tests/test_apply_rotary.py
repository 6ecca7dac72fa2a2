"""pyvl.kernels.apply_rotary against pyvl.ops.reference.apply_rotary.

q and k come as views of a fused qkv output [B, S, Hq + 2 Hkv, D], as the model passes them. In bf16 and fp16
every step is one correctly rounded operation on both sides, so the kernel must equal the reference bit for bit;
float32 follows kernel_tolerances.py (the GPU may fuse a multiply-add).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import assert_matches_oracle, fresh_generator, randn

from pyvl.kernels.apply_rotary import apply_rotary
from pyvl.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(b, s, hq, hkv, d, dtype, gen, table_batch=None):
    qkv = randn(b, s, hq + 2 * hkv, d, dtype=dtype, device=DEVICE, gen=gen)
    q = qkv[:, :, :hq].transpose(1, 2)  # (B, Hq, S, D), strided
    k = qkv[:, :, hq : hq + hkv].transpose(1, 2)
    angles = torch.rand(table_batch or b, s, d // 2, generator=gen) * 100  # positions up to ~100 x inv_freq
    emb = torch.cat([angles, angles], dim=-1).to(DEVICE)  # duplicated halves, as RotaryTables makes them
    return q, k, emb.cos(), emb.sin()


def check(q, k, cos, sin, got, what):
    q_out, k_out = got
    want = ref.apply_rotary(q, k, cos, sin)
    oracle = ref.apply_rotary(q.float(), k.float(), cos, sin)
    for name, o, w, orc in (("q", q_out, want[0], oracle[0]), ("k", k_out, want[1], oracle[1])):
        if o.dtype == torch.float32:
            assert_matches_oracle(o, orc, w, f"{name}, {what}")
        else:
            assert not o.isnan().any(), f"{name}: unwritten elements, {what}"
            assert torch.equal(o, w), (
                f"{name}: {int((o != w).sum())} elements differ from the reference, {what}"
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2), (6, 1)])
@pytest.mark.parametrize("d", [64, 128])
def test_matches_reference(dtype, hq, hkv, d):
    gen, seed = fresh_generator()
    q, k, cos, sin = make_inputs(2, 9, hq, hkv, d, dtype, gen)
    out = (
        torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE),
        torch.full(k.shape, float("nan"), dtype=dtype, device=DEVICE),
    )
    got = apply_rotary(q, k, cos, sin, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    check(q, k, cos, sin, got, f"seed {seed}")


def test_default_outputs_are_new_contiguous_tensors():
    gen, seed = fresh_generator()
    q, k, cos, sin = make_inputs(1, 1, 6, 2, 16, torch.bfloat16, gen)  # a decode step, the golden head_dim
    q0, k0 = q.clone(), k.clone()
    got = apply_rotary(q, k, cos, sin)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched
    check(q, k, cos, sin, got, f"seed {seed}")


def test_in_place_on_strided_views():
    gen, seed = fresh_generator()
    q, k, cos, sin = make_inputs(2, 5, 4, 2, 64, torch.bfloat16, gen)
    want = ref.apply_rotary(q, k, cos, sin)
    got = apply_rotary(q, k, cos, sin, out=(q, k))
    assert got[0] is q and got[1] is k
    assert torch.equal(q, want[0]) and torch.equal(k, want[1]), f"seed {seed}"


def test_batch_one_table_broadcasts():
    gen, seed = fresh_generator()
    q, k, cos, sin = make_inputs(3, 4, 2, 2, 32, torch.bfloat16, gen, table_batch=1)
    check(q, k, cos, sin, apply_rotary(q, k, cos, sin), f"seed {seed}")


def test_rejects_bad_inputs():
    q, k = torch.zeros(1, 4, 3, 64, device=DEVICE), torch.zeros(1, 2, 3, 64, device=DEVICE)
    cos = torch.zeros(1, 3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="float32 cos/sin"):
        apply_rotary(q, k, cos.double(), cos.double())
    with pytest.raises(ValueError, match="shapes disagree"):
        apply_rotary(q, k[:, :, :2], cos, cos)
    with pytest.raises(ValueError, match="one dtype"):
        apply_rotary(q, k.bfloat16(), cos, cos)
    with pytest.raises(ValueError, match="last-dim stride"):
        apply_rotary(q, torch.zeros(1, 2, 64, 3, device=DEVICE).transpose(2, 3), cos, cos)


@gpu
def test_real_shape():
    gen, seed = fresh_generator()
    q, k, cos, sin = make_inputs(1, 3400, 48, 8, 128, torch.bfloat16, gen)
    check(q, k, cos, sin, apply_rotary(q, k, cos, sin), f"seed {seed}")
