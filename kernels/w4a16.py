"""A linear layer with 4-bit weights and 16-bit activations (W4A16), in Triton.

    W[n, k]  = (q[n, k] - z[n, k // G]) * s[n, k // G]          q, z in 0..15; G inputs per group
    y[m, n]  = cast(sum_k x[m, k] * cast(W[n, k]) + bias[n])    W rounded to x's dtype, sums in float32

The same numbers as ``pyvl.ops.reference.w4a16_linear``: W is dequantized in float32 (exact: a 4-bit integer
times the scale) and rounded once to x's dtype, as the tensor cores take it. Layout (``pyvl.quant`` converts
AWQ GEMM checkpoints to it at load): qweight int32 [N, K/8], column 8c + j of row n in bits 4j..4j+3 of word
c; qzeros uint8 [N, K/G]; scales [N, K/G] in x's dtype; bias [N] or None; x [..., K] with a contiguous last
dim and leading dims collapsible into one row stride; out [..., N], the same.

One kernel, two inner products, chosen per batch regime as GemLite chooses its kernel families:
  gemv  M <= 4 rows (decode): BLOCK_M covers every row; x * W summed by tl.sum in float32, no tensor cores: at
        one token the work is reading and unpacking the weight, and narrow programs keep every SM loading.
  gemm  M > 4 (prefill, batched decode): tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles, float32
        accumulation.
A step dequantizes its columns in chunks of 32 (16 when G is not a multiple of 32), each chunk with its
group's zero point and scale, so any BLOCK_K and any G that is a multiple of 16 fit together. (The tile seen
as [BLOCK_N, BLOCK_K / 32, 32]; seen per group, [BLOCK_N, BLOCK_K / G, G], it took twice the registers in the
offline sm_90 compile at G 128.) Columns past K (a multiple of G, not always of BLOCK_K) are masked.
Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), m fastest, so the programs running together share one weight tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, cast, check_operands, interpreting, mma, rows

__all__ = ["w4a16_linear", "default_config", "GEMV_MAX_ROWS"]

GEMV_MAX_ROWS = 4  # up to this many rows the gemv product, above it the tensor-core gemm


@triton.jit
def _weight_tile(
    QW,
    QZ,
    S,
    offs_n,
    n_ok,
    k0,
    K,
    stride_qw,
    stride_qz,
    stride_s,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """W[offs_n, k0 : k0 + BLOCK_K] in DTYPE, [BLOCK_N, BLOCK_K]; columns past K come out 0."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = n_ok[:, None] & (offs_w < K // 8)[None, :]
    words = tl.load(QW + offs_n[:, None] * stride_qw + offs_w[None, :], mask=mask, other=0)
    nibbles = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # nibble j of word c: 8c + j
    q = tl.reshape(nibbles, (BLOCK_N, BLOCK_K)).to(tl.float32)
    # Columns in chunks of SPAN (G is a multiple of it): each chunk's zero point and scale are its group's
    SPAN: tl.constexpr = 32 if GROUP % 32 == 0 else 16
    offs_g = (k0 + tl.arange(0, BLOCK_K // SPAN) * SPAN) // GROUP
    mask = n_ok[:, None] & (offs_g < K // GROUP)[None, :]
    zero = tl.load(QZ + offs_n[:, None] * stride_qz + offs_g[None, :], mask=mask, other=0).to(tl.float32)
    scale = tl.load(S + offs_n[:, None] * stride_s + offs_g[None, :], mask=mask, other=0.0).to(tl.float32)
    q = tl.reshape(q, (BLOCK_N, BLOCK_K // SPAN, SPAN))
    w = tl.reshape((q - zero[:, :, None]) * scale[:, :, None], (BLOCK_N, BLOCK_K))
    return cast(w, DTYPE, INTERPRET)


@triton.jit
def _w4a16_kernel(
    X,
    QW,
    QZ,
    S,
    Bias,
    Out,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_qw,
    stride_qz,
    stride_s,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT: tl.constexpr,  # tensor cores (gemm), or float32 products summed (gemv)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm  # prefill rows x K can pass 2**31 elements
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(
            x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & (k0 + offs_k < K)[None, :], other=0.0
        )
        w = _weight_tile(
            QW, QZ, S, offs_n, n_ok, k0, K, stride_qw, stride_qz, stride_s,
            GROUP, BLOCK_N, BLOCK_K, X.dtype.element_ty, INTERPRET,
        )  # fmt: skip
        if DOT:
            acc = mma(x, tl.trans(w), acc, INTERPRET, PRECISION)
        else:  # BLOCK_M x BLOCK_N x BLOCK_K products in registers: few rows only
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = cast(acc, Out.dtype.element_ty, INTERPRET)
    o_ptrs = Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, out, mask=m_ok[:, None] & n_ok[None, :])


def default_config(m: int) -> dict:
    """Inner product ("gemv" or "gemm") and block sizes (BLOCK_K a power of two, at least 32) for M rows.
    Under the interpreter, where each program step costs about a millisecond, few and big blocks."""
    if m <= GEMV_MAX_ROWS:
        block_m = triton.next_power_of_2(m)
        # 16 rows a program: N / 16 programs (384 for a 6144-wide output), every SM busy; one row reads 4 KB
        # of weight a step. Offline sm_90 compile (triton 3.9, G 128): 80 / 112 / 123 registers, no spills.
        return dict(
            kernel="gemv",
            BLOCK_M=block_m,
            BLOCK_N=16,
            BLOCK_K=512 if block_m <= 2 else 128,
            num_warps=8,
            num_stages=4,
        )
    if interpreting():
        return dict(kernel="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=1, num_stages=1)
    # Offline sm_90 compile (triton 3.9, G 128): 146 / 230 / 240 registers, no spills (BLOCK_K 64 at 128 x 128
    # needs 255: the dequantized tile lives in registers beside the accumulator).
    if m <= 16:  # batched decode: the weight read dominates, narrow programs keep every SM loading
        return dict(kernel="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(kernel="gemm", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4)
    return dict(kernel="gemm", BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4)


def _check(x, qweight, qzeros, scales, bias) -> int:
    """The operands' shapes and dtypes, or a ValueError naming the one at fault; returns the group size G."""
    n, words = qweight.shape if qweight.dim() == 2 else (-1, -1)
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError(
            f"w4a16_linear: qweight must be a contiguous int32 [N, K/8]; got {tuple(qweight.shape)} "
            f"{qweight.dtype}"
        )
    k = 8 * words
    if x.dtype not in DTYPES or x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(
            f"w4a16_linear: x must be [..., {k}] in one of {DTYPES} (K = 8 x qweight's {words} words); got "
            f"{tuple(x.shape)} {x.dtype}"
        )
    groups = scales.shape[1] if scales.dim() == 2 else 0
    if scales.shape != (n, groups) or groups == 0 or scales.dtype != x.dtype or not scales.is_contiguous():
        raise ValueError(
            f"w4a16_linear: scales must be a contiguous [{n}, K/G] in x's dtype {x.dtype}; got "
            f"{tuple(scales.shape)} {scales.dtype}"
        )
    if qzeros.shape != (n, groups) or qzeros.dtype != torch.uint8 or not qzeros.is_contiguous():
        raise ValueError(
            f"w4a16_linear: qzeros must be a contiguous uint8 [{n}, {groups}] like scales; got "
            f"{tuple(qzeros.shape)} {qzeros.dtype}"
        )
    if k % groups or (k // groups) % 16:
        raise ValueError(
            f"w4a16_linear: {groups} groups over K = {k} inputs: the group size must be a multiple of 16"
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(
            f"w4a16_linear: bias must be [{n}] in {x.dtype}; got {tuple(bias.shape)} {bias.dtype}"
        )
    return k // groups


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] (see the module docstring). ``config`` overrides
    :func:`default_config` (keys kernel, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), for tuning."""
    group = _check(x, qweight, qzeros, scales, bias)
    named = {"x": x, "qweight": qweight, "qzeros": qzeros, "scales": scales}
    check_operands("w4a16_linear", named | ({} if bias is None else {"bias": bias}))
    n = qweight.shape[0]
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"w4a16_linear: out must be {shape} {x.dtype} on {x.device}; got {tuple(out.shape)} {out.dtype} "
            f"on {out.device}"
        )
    x2, o2 = rows("w4a16_linear", "x", x), rows("w4a16_linear", "out", out)
    m, k = x2.shape
    if m == 0:
        return out
    cfg = dict(default_config(m), **(config or {}))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _w4a16_kernel[grid](
        x2,
        qweight,
        qzeros,
        scales,
        x2 if bias is None else bias,  # any pointer: HAS_BIAS says whether it is read
        o2,
        m,
        n,
        k,
        x2.stride(0),
        o2.stride(0),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        GROUP=group,
        HAS_BIAS=bias is not None,
        DOT=cfg["kernel"] == "gemm",
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        INTERPRET=interpreting(),
        PRECISION="ieee" if x.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out
