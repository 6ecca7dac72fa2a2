"""pyvl.kernels.rms_norm (rms_norm, add_rms_norm) against pyvl.ops.reference.rms_norm.

Widths: 64 (the golden model), 200 (not a power of two: a masked tail), 3200 (InternViT-6B). Rows come as
a strided view (a chunk of a fused qkv output, as the ViT's QK-norm passes them). Rules: kernel_tolerances.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import assert_matches_oracle, fresh_generator, randn

from pyvl.kernels.rms_norm import add_rms_norm, rms_norm
from pyvl.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EPS = 1e-6


def rows_view(shape, dtype, gen, scale=3.0):
    """x [..., C] whose rows are 3C apart: the first third of a fused [..., 3C] tensor."""
    *lead, c = shape
    return randn(*lead, 3 * c, dtype=dtype, device=DEVICE, gen=gen, scale=scale)[..., :c]


def weight(c, dtype, gen):
    return (torch.rand(c, generator=gen) + 0.5).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 200), (3, 3200)])
def test_matches_reference(dtype, shape):
    gen, seed = fresh_generator()
    x, w = rows_view(shape, dtype, gen), weight(shape[-1], dtype, gen)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    assert rms_norm(x, w, EPS, out=out) is out
    assert_matches_oracle(
        out, ref.rms_norm(x.float(), w.float(), EPS), ref.rms_norm(x, w, EPS), f"seed {seed}"
    )


def _closed_form_case(dtype):
    """Rows of +-a: mean(x^2) = a^2 exactly, so rms_norm(x, 1, eps) = +-a / sqrt(a^2 + eps), known in closed form.

    a^2 = eps (and a^2 = eps / 4, 4 eps) makes eps as large as the variance, so each misplaced eps is off by far
    more than rounding: eps outside the sqrt gives a / (a + eps) ~ 1 instead of 1/sqrt(2); eps added to the rms
    (sqrt(ms) + eps) likewise; eps dropped gives 1; eps squared gives ~1. a is exact in every dtype (a power of 2).
    """
    c = 200  # not a power of two: the masked tail must not count in the mean
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(c // 2)
    amplitudes = torch.tensor([2.0**-10, 2.0**-11, 2.0**-9], dtype=torch.float64)  # a^2 = eps, eps/4, 4 eps
    eps = 2.0**-20
    x = (amplitudes[:, None] * sign).to(dtype=dtype, device=DEVICE)
    exact = amplitudes[:, None] / torch.sqrt(amplitudes[:, None] ** 2 + eps) * sign
    return x, eps, exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_sits_inside_the_sqrt_with_the_mean_square(dtype):
    """Small-variance rows where eps matters: reference and kernel both equal x / sqrt(mean(x^2) + eps)."""
    x, eps, exact = _closed_form_case(dtype)
    w = torch.ones(x.shape[-1], dtype=dtype, device=DEVICE)
    assert abs(exact[0, 0].item() - 2**-0.5) < 1e-12  # a^2 = eps: half-way, not 1 as with a misplaced eps
    tol = 1e-6 if dtype == torch.float32 else 2**-8  # one rounding of the normalised value to dtype
    for name, got in (("reference", ref.rms_norm(x, w, eps)), ("kernel", rms_norm(x, w, eps))):
        err = (got.double().cpu() - exact).abs().max().item()
        assert err <= tol, f"{name} {dtype}: max error {err:.3e} against x / sqrt(mean(x^2) + eps)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_variance_random_rows(dtype):
    """Random rows of rms ~ sqrt(eps): the kernel against the reference where eps is a large part of the sum."""
    gen, seed = fresh_generator()
    eps = 1e-5
    x = rows_view((9, 200), dtype, gen, scale=3e-3)  # mean(x^2) ~ 9e-6 ~ eps
    w = weight(200, dtype, gen)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE)
    rms_norm(x, w, eps, out=out)
    assert_matches_oracle(
        out, ref.rms_norm(x.float(), w.float(), eps), ref.rms_norm(x, w, eps), f"seed {seed}"
    )
    # eps is not negligible here: dropping it would move the result by far more than the tolerance
    assert (
        ref.rms_norm(x.float(), w.float(), eps) - ref.rms_norm(x.float(), w.float(), 0.0)
    ).abs().max() > 0.1


def test_float32_weight_promotes_the_output():
    """weight float32, x bf16: torch's weight * normed.to(bf16) is float32, and so is the kernel's output."""
    gen, seed = fresh_generator()
    x, w = rows_view((4, 64), torch.bfloat16, gen), weight(64, torch.float32, gen)
    out = rms_norm(x, w, EPS)
    same = ref.rms_norm(x, w, EPS)
    assert out.dtype == same.dtype == torch.float32
    torch.testing.assert_close(out, same, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm(dtype):
    gen, seed = fresh_generator()
    x = randn(3, 7, 200, dtype=dtype, device=DEVICE, gen=gen)
    r = randn(3, 7, 200, dtype=dtype, device=DEVICE, gen=gen, scale=4.0)
    w = weight(200, dtype, gen)
    summed = x + r  # rounded to dtype, like the kernel's residual output
    normed, h = add_rms_norm(
        x, r, w, EPS, out=torch.full_like(x, float("nan")), residual_out=torch.full_like(x, float("nan"))
    )
    assert torch.equal(h, summed), f"seed {seed}"
    assert_matches_oracle(
        normed, ref.rms_norm(summed.float(), w.float(), EPS), ref.rms_norm(summed, w, EPS), f"seed {seed}"
    )
    # In place: the sum may overwrite the residual stream it was read from.
    normed2, h2 = add_rms_norm(x, r, w, EPS, residual_out=r)
    assert h2 is r and torch.equal(r, summed) and torch.equal(normed2, normed), f"seed {seed}"
    # the fused path on small-variance sums, where eps is as large as mean(h^2)
    tiny = randn(3, 200, dtype=dtype, device=DEVICE, gen=gen, scale=2e-3)
    normed3, h3 = add_rms_norm(tiny, tiny, w, 1e-5)
    assert_matches_oracle(
        normed3,
        ref.rms_norm(h3.float(), w.float(), 1e-5),
        ref.rms_norm(h3, w, 1e-5),
        f"small variance, seed {seed}",
    )


def test_rejects_bad_inputs():
    x = torch.zeros(4, 6, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="rows of one stride"):
        rms_norm(x.transpose(0, 1), w, EPS)
    with pytest.raises(ValueError, match="last-dim stride"):
        rms_norm(torch.zeros(64, 4, device=DEVICE).t(), w, EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="dtype"):
        rms_norm(x.long(), w, EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, x.bfloat16(), w, EPS)


@gpu
@pytest.mark.parametrize("shape", [(3400, 6144), (13 * 1025, 3200)])  # LLM prefill, ViT-6B 13 tiles
def test_real_shapes(shape):
    gen, seed = fresh_generator()
    x, w = rows_view(shape, torch.bfloat16, gen), weight(shape[-1], torch.bfloat16, gen)
    assert_matches_oracle(
        rms_norm(x, w, EPS), ref.rms_norm(x.float(), w.float(), EPS), ref.rms_norm(x, w, EPS), f"seed {seed}"
    )
