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

Seeds: every ``fresh_generator()`` call draws a new seed from ``secrets`` (so each run tries new inputs) and
prints it, so a failing test's "Captured stdout" shows it next to the failure (the tests also put it in their
assertion messages). To reproduce a failure, set the environment variable ``PYVL_TEST_SEED=<int>``: every
generator then uses that seed, e.g. ``PYVL_TEST_SEED=123 python -m pytest tests/test_rms_norm.py``.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch

__all__ = [
    "SEED_VARIABLE",
    "TOLERANCES",
    "Tolerance",
    "assert_matches_oracle",
    "chosen_seed",
    "fresh_generator",
    "randn",
]

SEED_VARIABLE = "PYVL_TEST_SEED"


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


def chosen_seed() -> int:
    """$PYVL_TEST_SEED when set (to reproduce a failure), else a fresh random 31-bit seed."""
    fixed = os.environ.get(SEED_VARIABLE, "").strip()
    if not fixed:
        return secrets.randbits(31)
    try:
        return int(fixed, 0)
    except ValueError:
        raise ValueError(f"{SEED_VARIABLE}={fixed!r} is not an integer seed") from None


def fresh_generator() -> tuple[torch.Generator, int]:
    """A CPU generator on chosen_seed(), the seed returned for the failure message and printed (pytest shows a
    failing test's captured output, so the seed is reported even where an assertion has no message)."""
    seed = chosen_seed()
    print(f"kernel test seed {seed} (reproduce with {SEED_VARIABLE}={seed})")
    return torch.Generator().manual_seed(seed), seed


def randn(*shape, dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def assert_matches_oracle(
    out: torch.Tensor,
    oracle: torch.Tensor,
    same_dtype: torch.Tensor,
    what: str = "",
    factor: float | None = None,
):
    """out (dtype T) against the float32 oracle, allowed FACTOR x the error of ``same_dtype`` (the reference in T);
    ``factor`` overrides the table's for a kernel whose rounding steps differ from the reference's by design."""
    tol = TOLERANCES[out.dtype]
    if factor is not None:
        tol = Tolerance(factor=factor, atol=tol.atol, rel=tol.rel)
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}"
    got, want, base = out.float(), oracle.float(), same_dtype.float()
    bad = ~torch.isfinite(got)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {got.numel()} elements are NaN/inf (unwritten or wrong)"
    )
    err = (got - want).abs().max().item()
    allowed = tol.factor * (base - want).abs().max().item() + tol.atol
    assert err <= allowed, (
        f"{what}: max error {err:.3e} > {allowed:.3e} ({tol.factor} x same-dtype + {tol.atol})"
    )
    norm = want.norm().item()
    if norm > 0:
        rel = (got - want).norm().item() / norm
        assert rel <= tol.rel, f"{what}: relative error {rel:.3e} > {tol.rel:.0e} for {out.dtype}"
