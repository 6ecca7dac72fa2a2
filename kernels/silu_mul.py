"""The SwiGLU gate, silu(gate) * up, in one pass over both inputs (Triton).

    out = cast(cast(g * sigmoid(g)) * u)        g, u upcast to float32

Rounded as the reference (``F.silu(gate) * up`` in the input dtype) rounds: silu to the dtype, then the product.
Layout: gate, up [..., I], same shape and dtype, contiguous last dim, leading dims collapsible into one row
stride (so the two halves of a fused [.., 2I] gate/up output can be passed as views). out: contiguous.
Grid: (rows, cdiv(I, BLOCK)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, cast, check_device, interpreting, rows

__all__ = ["silu_mul"]


@triton.jit
def _silu_mul_kernel(
    G, U, Out, stride_g, stride_u, stride_o, WIDTH, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < WIDTH
    g = tl.load(G + row * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + offs, mask=ok, other=0.0).to(tl.float32)
    silu = cast(g / (1.0 + tl.exp(-g)), Out.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(Out + row * stride_o + offs, cast(silu * u, Out.dtype.element_ty, INTERPRET), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, computed in float32 and rounded like the reference (see the module docstring)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in DTYPES:
        raise ValueError(
            f"silu_mul wants gate and up of one shape and one dtype in {DTYPES}; got "
            f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )
    for what, t in (("gate", gate), ("up", up)):
        check_device(t, what)
        if t.device != gate.device:
            raise ValueError(f"silu_mul: {what} is on {t.device}, gate on {gate.device}")
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    elif out.shape != gate.shape or out.dtype != gate.dtype or out.device != gate.device:
        raise ValueError(
            f"silu_mul: out must be {tuple(gate.shape)} {gate.dtype} on {gate.device}; got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    g2, u2, o2 = rows("silu_mul", "gate", gate), rows("silu_mul", "up", up), rows("silu_mul", "out", out)
    n_rows, width = g2.shape
    if n_rows == 0 or width == 0:
        return out
    block = min(triton.next_power_of_2(width), 4096 if interpreting() else 1024)
    _silu_mul_kernel[(n_rows, triton.cdiv(width, block))](
        g2,
        u2,
        o2,
        g2.stride(0),
        u2.stride(0),
        o2.stride(0),
        width,
        BLOCK=block,
        INTERPRET=interpreting(),
        num_warps=4,
    )
    return out
