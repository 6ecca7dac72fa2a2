"""Bidirectional (ViT) attention: FlashAttention-2 style forward in Triton.

    out[b, h] = softmax(q[b, h] k[b, h]^T / sqrt(D)) v[b, h]        q, k, v, out: [B, H, S, D]

One program owns BLOCK_M query rows of one (b, h) and streams the keys in BLOCK_N blocks, keeping the online
softmax state per row in float32: running max m (log2 domain), running sum l and the unnormalised output acc.
The scores are scaled by D^-0.5 * log2(e) so the exponentials are exp2. P is rounded to the input dtype before
the P @ V product (the tensor cores' operand type); both products accumulate in float32.

S need not be a multiple of the blocks (the ViT has S = 1025): q/k/v are never padded in memory. Every key
block is loaded with a row mask (other=0, so stale memory never reaches P @ V) and scores past S are -inf; only
the last block is partial. (A variant with unmasked full blocks plus a separate tail block spilled registers
when compiled offline for sm_90 with Triton 3.9, so the one masked loop is the default.) Rows past S are
computed on zeros and never stored.

Layouts: q/k/v may be any strided views whose last dim is contiguous (the ViT passes
``x.view(N, S, H, d).transpose(1, 2)``); out defaults to a contiguous [B, H, S, D] tensor, and an ``out=`` of
any strides with a contiguous last dim is accepted (e.g. a [B, S, H, D] buffer seen through transpose(1, 2)).
Grid: (cdiv(S, BLOCK_M), B * H). D must be a power of two in [16, 256] (tl.dot needs >= 16).

Shared helpers (the jit ``mma`` and ``cast``, the operand checks): ``_common.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, INTERPRET_LONG, cast, check_operands, interpreting, mma

__all__ = ["vit_attention", "default_config"]

_LOG2E = 1.4426950408889634


@triton.jit
def _vit_attention_kernel(
    Q,
    K,
    V,
    Out,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    H,
    S,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch * stride can pass 2^31 on large tile batches
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < S, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row whose block is all -inf stays NaN-free
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for start_n in range(0, S, BLOCK_N):  # the last block is partial when S % BLOCK_N != 0 (1025 = 16*64 + 1)
        key_ok = (start_n + offs_n) < S
        k = tl.load(
            k_base + (start_n + offs_n)[:, None] * stride_ks + offs_d[None, :],
            mask=key_ok[:, None],
            other=0.0,
        )
        qk = mma(q, tl.trans(k), None, INTERPRET, PRECISION) * qk_scale
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + (start_n + offs_n)[:, None] * stride_vs + offs_d[None, :],
            mask=key_ok[:, None],
            other=0.0,
        )  # other=0: stale memory past S must not reach P @ V
        acc = mma(cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], INTERPRET, PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty, INTERPRET), mask=offs_m[:, None] < S)


def default_config(head_dim: int, dtype: torch.dtype, seq_len: int = 0) -> dict:
    """Block sizes and launch settings: Hopper defaults on the GPU; under the interpreter, where each program
    step costs about a millisecond, small blocks for the tests' short sequences (so S = k*16 + 1 exercises the
    tail) and big ones for real lengths such as the ViT's 1025 (tail masked the same way, 64x fewer steps)."""
    if interpreting():
        if seq_len > INTERPRET_LONG:
            return dict(BLOCK_M=128, BLOCK_N=128, num_warps=1, num_stages=1)
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # 4-byte operands: half the tile to stay inside shared memory
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 128:  # offline sm_90 compile (triton 3.9): 188 regs at D=64, 255 and no spills at D=128
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def vit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over [B, H, S, D] (see the module docstring). ``config`` overrides
    :func:`default_config` (keys BLOCK_M, BLOCK_N, num_warps, num_stages), for tuning."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"vit_attention wants q, k, v of one shape [B, H, S, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"vit_attention wants q, k, v of one dtype in {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    b, h, s, d = q.shape
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"vit_attention: head_dim {d} must be a power of two in [16, 256]")
    check_operands("vit_attention", {"q": q, "k": k, "v": v})
    if out is None:
        out = torch.empty((b, h, s, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"vit_attention: out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous "
            f"last dim; got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}"
        )
    if q.numel() == 0:
        return out
    cfg = dict(default_config(d, q.dtype, q.shape[2]), **(config or {}))
    grid = (triton.cdiv(s, cfg["BLOCK_M"]), b * h)
    _vit_attention_kernel[grid](
        q,
        k,
        v,
        out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        h,
        s,
        d**-0.5 * _LOG2E,
        HEAD_DIM=d,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        INTERPRET=interpreting(),
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out
