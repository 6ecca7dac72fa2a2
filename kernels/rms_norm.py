"""RMSNorm, and RMSNorm fused with the residual add that precedes it, in Triton.

    rms_norm(x, w)         = w * cast(x / sqrt(mean(x^2) + eps))                 statistics in float32
    add_rms_norm(x, r, w)  = (rms_norm(h, w), h)   with h = cast(x + r)         one read of x and r

The rounding order is the reference's (pyvl.ops.reference.rms_norm): normalise in float32, round to x.dtype,
then multiply by the weight and round once to the output dtype, promote_types(w.dtype, x.dtype) as torch does.
add_rms_norm rounds the sum to x.dtype before taking its statistics, so it equals rms_norm(x + r) exactly.

Layout: x [..., C] with a contiguous last dim; the leading dims must collapse into one row stride (as a
``view(-1, C)`` would; the ViT's QK-norm passes a chunk of the qkv output, rows 3C apart). Grid: (rows,), one
program per row, the whole row in registers (BLOCK_C = next_pow2(C) <= 65536).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, cast, check_device, interpreting, rows

__all__ = ["rms_norm", "add_rms_norm"]


@triton.jit
def _rms_norm_kernel(
    X,
    R,
    W,
    Out,
    Sum,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    C,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = cast(
            x + tl.load(R + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32),
            Sum.dtype.element_ty,
            INTERPRET,
        )
        tl.store(Sum + row * stride_s + offs, h, mask=ok)
        x = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / C + eps)
    normed = cast(x * inv_rms, X.dtype.element_ty, INTERPRET).to(tl.float32)  # the reference rounds here
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, cast(w * normed, Out.dtype.element_ty, INTERPRET), mask=ok)


def _launch(name, x, residual, weight, eps, out, summed):
    if x.dtype not in DTYPES:
        raise ValueError(f"{name}: x dtype {x.dtype} is not one of {DTYPES}")
    c = x.shape[-1]
    if weight.shape != (c,) or weight.dtype not in DTYPES or weight.stride(0) != 1:
        raise ValueError(
            f"{name}: weight must be a contiguous [{c}] float tensor; got {tuple(weight.shape)} "
            f"{weight.dtype}"
        )
    if c > 65536:
        raise ValueError(f"{name}: rows of {c} elements do not fit one program (at most 65536)")
    for what, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None:
            check_device(t, what)
            if t.device != x.device:
                raise ValueError(f"{name}: {what} is on {t.device}, x on {x.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{name}: residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or out.device != x.device:
        raise ValueError(
            f"{name}: out must be {tuple(x.shape)} {out_dtype} on {x.device}; got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    x2, o2 = rows(name, "x", x), rows(name, "out", out)
    r2 = rows(name, "residual", residual) if residual is not None else x2
    s2 = rows(name, "residual_out", summed) if summed is not None else o2
    if x2.shape[0] == 0:
        return out
    block = triton.next_power_of_2(c)
    warps = 1 if interpreting() else (16 if block >= 8192 else 8 if block >= 2048 else 4)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight,
        o2,
        s2,
        x2.stride(0),
        r2.stride(0),
        o2.stride(0),
        s2.stride(0),
        c,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_C=block,
        INTERPRET=interpreting(),
        num_warps=warps,
    )
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """w * cast(x * rsqrt(mean(x^2) + eps)) over the last dim (see the module docstring)."""
    return _launch("rms_norm", x, None, weight, eps, out, None)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the sum is rounded to x.dtype first.
    ``residual_out`` may be ``x`` or ``residual`` itself (each element is read before it is written)."""
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif residual_out.shape != x.shape or residual_out.dtype != x.dtype or residual_out.device != x.device:
        raise ValueError(
            f"add_rms_norm: residual_out must be {tuple(x.shape)} {x.dtype} on {x.device}; got "
            f"{tuple(residual_out.shape)} {residual_out.dtype} on {residual_out.device}"
        )
    normed = _launch("add_rms_norm", x, residual, weight, eps, out, residual_out)
    return normed, residual_out
