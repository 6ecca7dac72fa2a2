"""pyvl.kernels.silu_mul against pyvl.ops.reference.silu_mul (rules: kernel_tolerances.py).

Widths with a masked tail (200, 1100) and gate/up as the two halves of one fused [..., 2I] tensor.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import assert_matches_oracle, fresh_generator, randn

from pyvl.kernels.silu_mul import silu_mul
from pyvl.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fused_gate_up(shape, dtype, gen):
    *lead, i = shape
    both = randn(*lead, 2 * i, dtype=dtype, device=DEVICE, gen=gen, scale=3.0)  # [..., 2I], gate | up
    return both[..., :i], both[..., i:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 200), (2, 5, 1100)])
def test_matches_reference(dtype, shape):
    gen, seed = fresh_generator()
    gate, up = fused_gate_up(shape, dtype, gen)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    assert silu_mul(gate, up, out=out) is out
    assert_matches_oracle(out, ref.silu_mul(gate.float(), up.float()), ref.silu_mul(gate, up), f"seed {seed}")


def test_contiguous_inputs_and_default_out():
    gen, seed = fresh_generator()
    gate = randn(4, 64, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    up = randn(4, 64, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    out = silu_mul(gate, up)
    assert out.is_contiguous() and out.dtype == torch.bfloat16
    assert_matches_oracle(out, ref.silu_mul(gate.float(), up.float()), ref.silu_mul(gate, up), f"seed {seed}")


def test_rejects_bad_inputs():
    g = torch.zeros(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(g, g[:, :32])
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(g, g.bfloat16())
    with pytest.raises(ValueError, match="last-dim stride"):
        silu_mul(g.t(), g.t())


@gpu
def test_real_shape():
    gen, seed = fresh_generator()
    gate, up = fused_gate_up((3400, 16384), torch.bfloat16, gen)  # InternLM2-20B FFN at 3.4k tokens
    assert_matches_oracle(
        silu_mul(gate, up), ref.silu_mul(gate.float(), up.float()), ref.silu_mul(gate, up), f"seed {seed}"
    )
