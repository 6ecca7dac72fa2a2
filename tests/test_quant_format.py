"""pyvl.quant.awq (AWQ GEMM <-> pyvl's 4-bit layout) and pyvl.quantize.quantize_weight, against
AutoAWQ's algorithm as tests/awq_reference.py writes it independently."""

from __future__ import annotations

import awq_reference as autoawq
import pytest
import torch
from kernel_tolerances import fresh_generator

from pyvl.ops import reference
from pyvl.quant import awq
from pyvl.quantize import quantize_weight


def test_one_word_by_hand():
    """Outputs 0..7 holding the values 0..7 pack as nibbles 0, 2, 4, 6, 1, 3, 5, 7 from the low end."""
    values = torch.arange(8, dtype=torch.uint8)[None]
    assert awq.pack_nibbles(values, awq.AWQ_ORDER).item() == 0x75316420
    assert autoawq.pack(values).item() == 0x75316420  # the test's own AutoAWQ packing agrees
    assert awq.pack_nibbles(values, awq.NATURAL_ORDER).item() == 0x76543210


@pytest.mark.parametrize("n, k, group", [(16, 64, 32), (40, 96, 96), (24, 256, 128)])
def test_checkpoint_to_rows_dequantizes_as_autoawq(n, k, group):
    gen, seed = fresh_generator()
    tensors, weight = autoawq.random_linear(n, k, group, gen)
    rows = {attr: awq.to_rows(f"layer.{attr}", t) for attr, t in tensors.items()}
    assert rows["qweight"].shape == (n, k // 8) and rows["qweight"].dtype == torch.int32
    assert rows["qzeros"].shape == (n, k // group) and rows["qzeros"].dtype == torch.uint8
    assert rows["scales"].shape == (n, k // group)
    got = reference.dequantize_w4(rows["qweight"], rows["qzeros"], rows["scales"])
    assert torch.equal(got, weight), f"seed {seed}"


def test_rows_back_to_checkpoint_is_exact():
    gen, seed = fresh_generator()
    tensors, _ = autoawq.random_linear(32, 128, 64, gen)
    rows = {attr: awq.to_rows(f"x.{attr}", t) for attr, t in tensors.items()}
    back = awq.from_rows(rows["qweight"], rows["qzeros"], rows["scales"])
    for attr, tensor in tensors.items():
        assert torch.equal(back[attr], tensor), f"{attr}, seed {seed}"
        assert awq.checkpoint_shape(f"x.{attr}", tuple(rows[attr].shape)) == tuple(tensor.shape)
    assert awq.checkpoint_shapes("x", 32, 128, 64) == {f"x.{a}": tuple(t.shape) for a, t in tensors.items()}


def test_words_with_the_sign_bit_survive():
    words = torch.tensor([[-1, -(2**31), 2**31 - 1, 0x10000000]], dtype=torch.int32)
    for order in (awq.AWQ_ORDER, awq.NATURAL_ORDER):
        assert torch.equal(awq.pack_nibbles(awq.unpack_nibbles(words, order), order), words)


def test_other_tensors_pass_through():
    t = torch.randn(4, 8)
    assert awq.to_rows("language_model.model.norm.weight", t) is t
    assert awq.checkpoint_shape("mlp1.1.weight", (4, 8)) == (4, 8)


def autoawq_fake_quant(w: torch.Tensor, group: int) -> torch.Tensor:
    """AutoAWQ's pseudo_quantize_tensor (w_bit 4, zero_point), scales rounded to fp16 as it stores them."""
    n, k = w.shape
    g = w.float().reshape(-1, group)
    max_val, min_val = g.amax(dim=1, keepdim=True), g.amin(dim=1, keepdim=True)
    scales = ((max_val - min_val).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    return ((torch.clamp(torch.round(g / scales) + zeros, 0, 15) - zeros) * scales).reshape(n, k)


@pytest.mark.parametrize("group", [32, 128])
def test_quantize_weight_is_autoawq_round_to_nearest(group):
    gen, seed = fresh_generator()
    w = torch.randn(48, 256, generator=gen).bfloat16()  # every group holds both signs
    qweight, qzeros, scales = quantize_weight(w, group)
    assert qweight.shape == (48, 32) and scales.dtype == torch.float16 and qzeros.dtype == torch.uint8
    got = reference.dequantize_w4(qweight, qzeros, scales)
    assert torch.equal(got, autoawq_fake_quant(w, group)), f"seed {seed}"


def test_groups_of_one_sign_stay_within_half_a_step():
    gen, seed = fresh_generator()
    w = torch.randn(6, 64, generator=gen)
    w[0], w[1], w[2] = 0.25, w[1].abs() + 1, -w[2].abs()  # constant, all positive, all negative
    w[3] = 0.0
    qweight, qzeros, scales = quantize_weight(w, 32)
    got = reference.dequantize_w4(qweight, qzeros, scales)
    step = scales.float().repeat_interleave(32, dim=1)
    assert ((got - w).abs() <= step / 2 + 1e-6).all(), f"seed {seed}: an error above half a step"
    assert torch.equal(got[3], w[3]), "an all-zero group must come back as zeros"


def test_quantize_weight_refuses_overflowing_scales():
    from pyvl.errors import CheckpointError

    w = torch.zeros(2, 32)
    w[0, 0] = 1e9
    with pytest.raises(CheckpointError, match="overflows"):
        quantize_weight(w, 32)


def test_the_reference_quantizer_rounds_to_nearest():
    """tests/awq_reference.quantize (AutoAWQ's round-to-nearest and packing), read back by its own dequantize:
    every weight within half a step (plus the fp16 rounding of the stored scale) of the original."""
    gen, seed = fresh_generator()
    w = torch.randn(24, 96, generator=gen) * 0.02
    tensors = autoawq.quantize(w, 32)
    assert tensors["qweight"].shape == (96, 3) and tensors["scales"].shape == (3, 24)
    step = tensors["scales"].float().t().repeat_interleave(32, dim=1)
    got = autoawq.dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"])
    assert ((got - w).abs() <= 0.51 * step).all(), f"seed {seed}"
