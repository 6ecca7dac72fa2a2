"""Rotate-half rotary embedding of q and k in one launch (Triton).

    x' = x * cos + rotate_half(x) * sin,   rotate_half([x1 | x2]) = [-x2 | x1]   (halves of the head dim)
    i.e.  x1' = x1 * cos1 - x2 * sin1,  x2' = x2 * cos2 + x1 * sin2

Rounded as the reference in the activation dtype: cos/sin are rounded to q.dtype first, and each product and
the sum are rounded to q.dtype, so the result is bit-identical to ``pyvl.ops.reference.apply_rotary`` up to
rare double-rounding ties.

Layouts: q [B, Hq, S, D], k [B, Hkv, S, D] (any strides, contiguous last dim: the model passes views of the
fused qkv output); cos, sin [B or 1, S, D] float32 (any strides, contiguous last dim). Returns new contiguous
tensors, or writes into ``out=(q_out, k_out)``; q_out/k_out may be q/k themselves (in place: each program reads
its elements before writing them). Grid: (B * S,); a program rotates every head of one token, q and k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, cast, check_operands, interpreting

__all__ = ["apply_rotary"]


@triton.jit
def _rotate_heads(
    X,
    Out,
    stride_xh,
    stride_oh,
    n_heads,
    cos1,
    sin1,
    cos2,
    sin2,
    offs_h,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Rotate the [n_heads, D] slab at X (head stride stride_xh) into Out; cos/sin halves are [1, BLOCK_HALF]."""
    heads = tl.arange(0, BLOCK_H)
    ok = (heads[:, None] < n_heads) & (offs_h[None, :] < HALF)
    x_ptrs = X + heads[:, None].to(tl.int64) * stride_xh + offs_h[None, :]
    x1 = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=ok, other=0.0).to(tl.float32)
    dt = Out.dtype.element_ty
    out1 = cast(
        cast(x1 * cos1, dt, INTERPRET).to(tl.float32) - cast(x2 * sin1, dt, INTERPRET).to(tl.float32),
        dt,
        INTERPRET,
    )
    out2 = cast(
        cast(x2 * cos2, dt, INTERPRET).to(tl.float32) + cast(x1 * sin2, dt, INTERPRET).to(tl.float32),
        dt,
        INTERPRET,
    )
    o_ptrs = Out + heads[:, None].to(tl.int64) * stride_oh + offs_h[None, :]
    tl.store(o_ptrs, out1, mask=ok)
    tl.store(o_ptrs + HALF, out2, mask=ok)


@triton.jit
def _apply_rotary_kernel(
    Q,
    K,
    Cos,
    Sin,
    QOut,
    KOut,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_cb,
    stride_cs,
    stride_sb,
    stride_ss,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    S,
    HQ,
    HKV,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_HALF)
    ok = offs_h < HALF
    dt = QOut.dtype.element_ty
    c_ptr = Cos + b * stride_cb + s * stride_cs + offs_h
    s_ptr = Sin + b * stride_sb + s * stride_ss + offs_h
    # The reference rounds the float32 tables to the activation dtype before using them.
    cos1 = cast(tl.load(c_ptr, mask=ok, other=0.0), dt, INTERPRET).to(tl.float32)[None, :]
    cos2 = cast(tl.load(c_ptr + HALF, mask=ok, other=0.0), dt, INTERPRET).to(tl.float32)[None, :]
    sin1 = cast(tl.load(s_ptr, mask=ok, other=0.0), dt, INTERPRET).to(tl.float32)[None, :]
    sin2 = cast(tl.load(s_ptr + HALF, mask=ok, other=0.0), dt, INTERPRET).to(tl.float32)[None, :]
    _rotate_heads(
        Q + b * stride_qb + s * stride_qs,
        QOut + b * stride_qob + s * stride_qos,
        stride_qh,
        stride_qoh,
        HQ,
        cos1,
        sin1,
        cos2,
        sin2,
        offs_h,
        HALF,
        BLOCK_HQ,
        INTERPRET,
    )
    _rotate_heads(
        K + b * stride_kb + s * stride_ks,
        KOut + b * stride_kob + s * stride_kos,
        stride_kh,
        stride_koh,
        HKV,
        cos1,
        sin1,
        cos2,
        sin2,
        offs_h,
        HALF,
        BLOCK_HKV,
        INTERPRET,
    )


def _check_out(what: str, o: torch.Tensor, like: torch.Tensor) -> None:
    if o.shape != like.shape or o.dtype != like.dtype or o.device != like.device or o.stride(-1) != 1:
        raise ValueError(
            f"apply_rotary: {what} must be {tuple(like.shape)} {like.dtype} on {like.device} with a "
            f"contiguous last dim; got {tuple(o.shape)} {o.dtype} on {o.device}, strides {o.stride()}"
        )


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin); see the module docstring."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rotary wants q [B, Hq, S, D], k [B, Hkv, S, D], cos/sin [B, S, D]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    b, hq, s, d = q.shape
    if (
        k.shape[0] != b
        or k.shape[2:] != (s, d)
        or cos.shape[1:] != (s, d)
        or cos.shape[0] not in (1, b)
        or d % 2
    ):
        raise ValueError(
            f"apply_rotary: shapes disagree (or D is odd): q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"cos/sin {tuple(cos.shape)}"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        raise ValueError(f"apply_rotary wants q and k of one dtype in {DTYPES}; got {q.dtype}, {k.dtype}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"apply_rotary wants float32 cos/sin tables; got {cos.dtype}, {sin.dtype}")
    check_operands("apply_rotary", {"q": q, "k": k, "cos": cos, "sin": sin})
    if out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    else:
        q_out, k_out = out
        _check_out("q_out", q_out, q)
        _check_out("k_out", k_out, k)
    hkv = k.shape[1]
    if b * s == 0:
        return q_out, k_out
    half = d // 2
    _apply_rotary_kernel[(b * s,)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        cos.stride(0) if cos.shape[0] == b else 0,
        cos.stride(1),  # a batch-1 table broadcasts
        sin.stride(0) if sin.shape[0] == b else 0,
        sin.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        q_out.stride(2),
        k_out.stride(0),
        k_out.stride(1),
        k_out.stride(2),
        s,
        hq,
        hkv,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HKV=triton.next_power_of_2(hkv),
        INTERPRET=interpreting(),
        num_warps=4,
    )
    return q_out, k_out
