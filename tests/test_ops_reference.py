"""The plain-torch reference ops against their definitions written out element by element."""

from __future__ import annotations

import pytest
import torch

from pyvl.ops import TORCH_OPS, resolve_ops
from pyvl.ops import reference as ref


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("grid, channels", [(32, 5), (4, 3), (6, 2)])
def test_pixel_shuffle_matches_spec_formula(ps_version, grid, channels):
    x = torch.randn(2, grid, grid, channels)
    out = ref.pixel_shuffle(x, 0.5, ps_version)
    half = grid // 2
    assert out.shape == (2, half * half, 4 * channels)
    for a in range(half):
        for b in range(half):
            cell = torch.cat(
                [
                    x[:, 2 * a, 2 * b],
                    x[:, 2 * a, 2 * b + 1],
                    x[:, 2 * a + 1, 2 * b],
                    x[:, 2 * a + 1, 2 * b + 1],
                ],
                dim=-1,
            )  # [TL | TR | BL | BR]
            token = a * half + b if ps_version == "v2" else b * half + a  # v1 leaves the grid transposed
            assert torch.equal(out[:, token], cell)


def test_rms_norm_computes_in_float32_and_casts_back():
    x = torch.randn(3, 64, dtype=torch.bfloat16) * 50
    w = torch.rand(64, dtype=torch.bfloat16) + 0.5
    xf = x.float()
    want = w * (xf / torch.sqrt((xf**2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    got = ref.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("sq, sk", [(5, 5), (1, 9), (3, 11)])
def test_causal_attention_matches_dense_loop(hq, hkv, sq, sk):
    torch.manual_seed(0)
    d = 8
    q, k, v = torch.randn(2, hq, sq, d), torch.randn(2, hkv, sk, d), torch.randn(2, hkv, sk, d)
    out = ref.causal_attention(q, k, v)
    for b in range(2):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(sq):
                pos = sk - sq + i
                keys = list(range(pos + 1))
                s = torch.stack([q[b, h, i] @ k[b, kv, j] for j in keys]) / d**0.5
                want = (s.softmax(0)[:, None] * v[b, kv, keys]).sum(0)
                torch.testing.assert_close(out[b, h, i], want, atol=1e-5, rtol=1e-5)


def test_vit_attention_is_plain_softmax_attention():
    q, k, v = torch.randn(3, 2, 7, 16), torch.randn(3, 2, 7, 16), torch.randn(3, 2, 7, 16)
    want = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    torch.testing.assert_close(ref.vit_attention(q, k, v), want, atol=1e-5, rtol=1e-5)


def test_rotary_rotate_half_convention():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    angles = torch.rand(1, 3, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q2, k2 = ref.apply_rotary(q, k, cos, sin)
    # pairs (i, i + D/2) rotate as complex numbers by the same angle
    for i in range(4):
        c, s = angles[0, :, i].cos(), angles[0, :, i].sin()
        torch.testing.assert_close(q2[0, :, :, i], q[0, :, :, i] * c - q[0, :, :, i + 4] * s)
        torch.testing.assert_close(k2[0, :, :, i + 4], k[0, :, :, i + 4] * c + k[0, :, :, i] * s)


def test_dynamic_ntk_base():
    from pyvl.config import LLMConfig
    from pyvl.models.rope import RotaryTables

    cfg = LLMConfig(
        hidden_size=512,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=10,
        max_position_embeddings=512,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        rope_scaling_type="dynamic",
        rope_scaling_factor=2.0,
    )
    rope = RotaryTables(cfg)
    assert rope.base_for_length(512) == 1e6  # unchanged up to max_position_embeddings
    assert rope.base_for_length(513) == pytest.approx(1e6 * (2 * 513 / 512 - 1) ** (128 / 126))
    assert rope.base_for_length(1024) > rope.base_for_length(600) > 1e6


def test_resolve_ops_backends():
    ops = resolve_ops("reference", "cpu")
    assert {ops.backends[name] for name in ops.backends if name not in TORCH_OPS} == {"reference"}
    assert {ops.backends[name] for name in TORCH_OPS} == {"torch"}  # served by torch in every backend
    assert resolve_ops("auto", "cpu").rms_norm is ref.rms_norm
    with pytest.raises(ValueError, match="not one of"):
        resolve_ops("cuda-magic", "cpu")
    with pytest.raises(ValueError, match="unknown ops"):
        resolve_ops("auto", "cpu", {"not_an_op": "reference"})
