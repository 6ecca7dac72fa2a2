"""How the Triton kernels are judged against their plain-torch references: one table, keyed by dtype.

The oracle is the reference op run on float32-upcast inputs. A kernel output in dtype T passes when
  * it holds no NaN or inf (the oracle never does at these sizes), and every element was written (the tests
    poison ``out=`` with NaN first);
  * max |kernel - oracle| <= FACTOR * max |reference(T) - oracle| + atol: at most twice as wrong as the same
    reference run in T (FlashAttention's test rule), plus a small absolute floor for the cases where the
    T reference happens to be exact (a single key, a zero row);
  * ||kernel - oracle|| / ||oracle|| <= rel: the bounds of .library/device/METHOD.md (float32 far under 1e-3,
    bf16 between 1e-3 and 1e-2). float32 attention uses IEEE float32 dots, never tf32.
Timing never appears here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

__all__ = ["TOLERANCES", "Tolerance", "assert_matches_oracle", "fresh_generator", "randn"]


@dataclass(frozen=True)
class Tolerance:
    factor: float  # times the same-dtype reference's max error
    atol: float  # absolute floor added to that
    rel: float  # bound on the normwise relative error


TOLERANCES = {
    torch.float32: Tolerance(factor=2.0, atol=1e-5, rel=1e-5),
    torch.float16: Tolerance(factor=2.0, atol=1e-4, rel=2e-3),
    torch.bfloat16: Tolerance(factor=2.0, atol=1e-3, rel=1e-2),
}


def fresh_generator() -> tuple[torch.Generator, int]:
    """A CPU generator on a new random seed (returned too, for the failure message)."""
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def randn(*shape, dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def assert_matches_oracle(out: torch.Tensor, oracle: torch.Tensor, same_dtype: torch.Tensor, what: str = ""):
    """out (dtype T) against the float32 oracle, allowed FACTOR x the error of ``same_dtype`` (the reference in T)."""
    tol = TOLERANCES[out.dtype]
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}"
    got, want, base = out.float(), oracle.float(), same_dtype.float()
    bad = ~torch.isfinite(got)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {got.numel()} elements are NaN/inf (unwritten or wrong)"
    err = (got - want).abs().max().item()
    allowed = tol.factor * (base - want).abs().max().item() + tol.atol
    assert err <= allowed, f"{what}: max error {err:.3e} > {allowed:.3e} ({tol.factor} x same-dtype + {tol.atol})"
    norm = want.norm().item()
    if norm > 0:
        rel = (got - want).norm().item() / norm
        assert rel <= tol.rel, f"{what}: relative error {rel:.3e} > {tol.rel:.0e} for {out.dtype}"
