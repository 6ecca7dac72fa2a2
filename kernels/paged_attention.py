"""Causal GQA attention over the paged KV pool: a FlashAttention prefill kernel and a split-KV decode kernel.

    out[n, i] = sum_j softmax_j(q[n, i] . k[n // G, j] / sqrt(D)) v[n // G, j],   j <= Sk - Sq + i

The pool of one layer is k_pool/v_pool [num_blocks, Hkv, BLOCK_SIZE, D]; a sequence's keys are read through its
block table of int32 block ids; G = Hq // Hkv. BLOCK_N divides BLOCK_SIZE, so each key tile lies inside one KV
block: one table lookup per tile. Numerics follow the reference: scores and softmax in float32 (log2 domain,
exp2), P rounded to the input dtype before P @ V, products accumulated in float32.

Prefill, :func:`paged_prefill_attention` (one sequence, q [Sq, Hq, D]), grid (cdiv(Sq, BLOCK_M), Hq), last query
blocks (the most keys) launched first: stage 1 streams the key tiles that lie wholly before the block's first
query, with no causal mask; stage 2 streams the tiles that cross the diagonal with the full mask. Key tiles past
the last query are never loaded.
Decode, :func:`paged_decode_attention` (q [B, Hq, D], block tables [B, max_blocks], lengths [B] read on the device,
so a CUDA graph can replay it), flash-decoding: grid (B * Hkv, num_splits), one program serves all G query heads
of a KV head (a [G padded to 16, D] @ [D, BLOCK_N] product), so each K/V byte is read once; the row's keys are cut
into num_splits chunks of whole BLOCK_N tiles (the split count fixed by the table width), each program writes its
chunk's normalised output and log-sum-exp (float32), and a second kernel, grid (B * Hq,), merges the splits. With
one split the first kernel writes the output directly. Rows of length 0 (padding of a CUDA-graph batch) write
zeros.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import DTYPES, INTERPRET_LONG, cast, check_operands, interpreting, mma

__all__ = [
    "paged_prefill_attention",
    "paged_decode_attention",
    "prefill_config",
    "decode_config",
    "decode_splits",
]

_LOG2E = 1.4426950408889634
_NEG = tl.constexpr(
    -1.0e30
)  # initial running max: finite, so a row with no key yet in a block stays NaN-free


@triton.jit
def _online_softmax_step(qk, m_i, l_i, acc, v, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one block of scores (log2 domain, -inf where masked) and its values into (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], INTERPRET, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_reduce_kernel(
    PartO,
    PartLse,
    Out,
    stride_ob,
    stride_oh,
    HQ,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hq + h
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    row = pid.to(tl.int64) * NUM_SPLITS + offs_s
    lse = tl.load(PartLse + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (a row of length 0): weights 0, out 0
    w = tl.exp2(lse - m)
    o = tl.load(PartO + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_d
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty, INTERPRET))


@triton.jit
def _paged_prefill_kernel(
    Q,
    K,
    V,
    Out,
    Table,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_os,
    stride_oh,
    GROUP,
    SQ,
    SK,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = (
        tl.num_programs(0) - 1 - tl.program_id(0)
    )  # the last query blocks see the most keys: start them first
    h = tl.program_id(1)
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    first_pos = SK - SQ + pid_m * BLOCK_M
    pos_m = first_pos + tl.arange(0, BLOCK_M)

    q = tl.load(
        Q + offs_m[:, None] * stride_qs + h * stride_qh + offs_d[None, :],
        mask=offs_m[:, None] < SQ,
        other=0.0,
    )
    k_head = K + hk * stride_kh
    v_head = V + hk * stride_vh
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    diag_lo = (first_pos // BLOCK_N) * BLOCK_N
    for start_n in range(0, diag_lo, BLOCK_N):  # stage 1: keys before every query of the block
        block = tl.load(Table + start_n // BLOCK_SIZE).to(tl.int64)
        row = (start_n % BLOCK_SIZE + offs_n)[:, None]
        k = tl.load(k_head + block * stride_kb + row * stride_ks + offs_d[None, :])
        qk = mma(q, tl.trans(k), None, INTERPRET, PRECISION) * qk_scale
        v = tl.load(v_head + block * stride_vb + row * stride_vs + offs_d[None, :])
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, INTERPRET, PRECISION)

    hi = tl.minimum(SK, first_pos + BLOCK_M)
    for start_n in range(diag_lo, hi, BLOCK_N):  # stage 2: tiles crossing the diagonal, masked
        block = tl.load(Table + start_n // BLOCK_SIZE).to(tl.int64)  # start_n < SK: a block of the sequence
        key = start_n + offs_n
        key_ok = key < SK
        row = (start_n % BLOCK_SIZE + offs_n)[:, None]
        k = tl.load(
            k_head + block * stride_kb + row * stride_ks + offs_d[None, :], mask=key_ok[:, None], other=0.0
        )
        qk = mma(q, tl.trans(k), None, INTERPRET, PRECISION) * qk_scale
        qk = tl.where((key[None, :] <= pos_m[:, None]) & key_ok[None, :], qk, float("-inf"))
        v = tl.load(
            v_head + block * stride_vb + row * stride_vs + offs_d[None, :], mask=key_ok[:, None], other=0.0
        )
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, INTERPRET, PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = Out + offs_m[:, None] * stride_os + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, cast(out, Out.dtype.element_ty, INTERPRET), mask=offs_m[:, None] < SQ)


@triton.jit
def _paged_decode_split_kernel(
    Q,
    K,
    V,
    Tables,
    SeqLens,
    PartO,
    PartLse,
    Out,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_tb,
    stride_ob,
    stride_oh,
    HKV,
    GROUP,
    NUM_SPLITS,
    qk_scale,
    DIRECT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GROUP
    heads = hk * GROUP + offs_g  # the query heads sharing KV head hk
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    seq_len = tl.load(SeqLens + b).to(tl.int32)  # 0: a padding row, no keys at all
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N  # whole tiles per split
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0
    )
    table = Tables + b * stride_tb
    k_head = K + hk * stride_kh
    v_head = V + hk * stride_vh
    m_i = tl.full([BLOCK_G], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        block = tl.load(table + start_n // BLOCK_SIZE).to(tl.int64)
        key_ok = start_n + offs_n < end
        row = (start_n % BLOCK_SIZE + offs_n)[:, None]
        k = tl.load(
            k_head + block * stride_kb + row * stride_ks + offs_d[None, :], mask=key_ok[:, None], other=0.0
        )
        qk = mma(q, tl.trans(k), None, INTERPRET, PRECISION) * qk_scale
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
        v = tl.load(
            v_head + block * stride_vb + row * stride_vs + offs_d[None, :], mask=key_ok[:, None], other=0.0
        )
        m_i, l_i, acc = _online_softmax_step(qk, m_i, l_i, acc, v, INTERPRET, PRECISION)

    has_keys = l_i > 0  # a split past seq_len (or a length-0 row) holds nothing
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # acc is 0 there: zeros, never NaN
    if DIRECT:  # one split: this program saw every key
        o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, cast(out, Out.dtype.element_ty, INTERPRET), mask=g_ok[:, None])
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        row_p = (b * HKV * GROUP + heads) * NUM_SPLITS + split  # partials: [B * Hq, NUM_SPLITS, (D)]
        tl.store(PartLse + row_p, lse, mask=g_ok)
        tl.store(PartO + row_p[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_ok[:, None])


def prefill_config(head_dim: int, dtype: torch.dtype, seq_len: int = 0) -> dict:
    if (
        interpreting()
    ):  # small blocks for the tests' short sequences, big ones for real prompts (vit_attention)
        if seq_len > INTERPRET_LONG:
            return dict(BLOCK_M=64, BLOCK_N=64, num_warps=1, num_stages=1)
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    if interpreting():
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a stand-in so the heuristic still splits long rows


def decode_splits(batch_kv_heads: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Splits per row: about two programs per SM, but at least two key blocks per split, at most 64.
    Depends on the capacity, not on the current lengths, so a captured graph stays valid as they grow."""
    want = triton.cdiv(2 * _num_sms(device), batch_kv_heads)
    return max(1, min(want, triton.cdiv(capacity, 2 * block_n), 64))


def _out(name: str, out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(
            f"{name}: out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last "
            f"dim; got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}"
        )
    return out


def _check_pools(name: str, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> int:
    """q [tokens, Hq, D] against the pools [num_blocks, Hkv, BLOCK_SIZE, D]; returns BLOCK_SIZE."""
    if q.dim() != 3 or k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(
            f"{name} wants q [tokens, Hq, D] and k_pool, v_pool of one shape [num_blocks, Hkv, "
            f"BLOCK_SIZE, D]; got q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, v_pool "
            f"{tuple(v_pool.shape)}"
        )
    if q.dtype not in DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(
            f"{name} wants q, k_pool, v_pool of one dtype in {DTYPES}; got {q.dtype}, "
            f"{k_pool.dtype}, {v_pool.dtype}"
        )
    hq, d = q.shape[1], q.shape[2]
    hkv, block_size = k_pool.shape[1], k_pool.shape[2]
    if k_pool.shape[3] != d:
        raise ValueError(f"{name}: pool head_dim {k_pool.shape[3]} != q head_dim {d}")
    if hq % hkv:
        raise ValueError(f"{name}: {hq} query heads are not a multiple of {hkv} KV heads (GQA)")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"{name}: head_dim {d} must be a power of two in [16, 256]")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"{name}: BLOCK_SIZE {block_size} (pool dim 2) must be a power of two >= 16, so key "
            f"tiles never straddle two blocks"
        )
    check_operands(name, {"q": q, "k_pool": k_pool, "v_pool": v_pool})
    return block_size


def _check_int32(name: str, what: str, t: torch.Tensor, shape: tuple, q: torch.Tensor) -> None:
    """t int32 of ``shape`` (None: any size) on q's device, last dim contiguous."""
    fits = t.dim() == len(shape) and all(w is None or n == w for n, w in zip(t.shape, shape))
    if t.dtype != torch.int32 or not fits:
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"{name}: {what} must be an int32 tensor [{want}]; got {tuple(t.shape)} {t.dtype}")
    check_operands(name, {"q": q, what: t})


def paged_prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Causal GQA attention of one sequence's last Sq positions, q [Sq, Hq, D], over its keys
    0..context_len-1 read through block_table int32 [nb] (cdiv(context_len, BLOCK_SIZE) <= nb) from k_pool,
    v_pool [num_blocks, Hkv, BLOCK_SIZE, D]. Returns out [Sq, Hq, D]. ``config`` overrides
    :func:`prefill_config` (its BLOCK_N is capped at BLOCK_SIZE)."""
    name = "paged_prefill_attention"
    block_size = _check_pools(name, q, k_pool, v_pool)
    _check_int32(name, "block_table", block_table, (None,), q)
    sq, hq, d = q.shape
    if not sq <= context_len <= block_table.shape[0] * block_size:
        raise ValueError(
            f"{name}: context_len {context_len} must hold the {sq} queries and fit the "
            f"{block_table.shape[0]} blocks of {block_size} in block_table"
        )
    out = _out(name, out, q)
    if sq == 0:
        return out
    cfg = dict(prefill_config(d, q.dtype, context_len), **(config or {}))
    block_n = min(cfg["BLOCK_N"], block_size)
    if block_size % block_n:
        raise ValueError(f"{name}: BLOCK_N {block_n} must divide BLOCK_SIZE {block_size}")
    _paged_prefill_kernel[(triton.cdiv(sq, cfg["BLOCK_M"]), hq)](
        q,
        k_pool,
        v_pool,
        out,
        block_table,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        out.stride(0),
        out.stride(1),
        hq // k_pool.shape[1],
        sq,
        context_len,
        d**-0.5 * _LOG2E,
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=block_n,
        INTERPRET=interpreting(),
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """One query per row, q [B, Hq, D] at position context_lens[b] - 1, over keys 0..context_lens[b]-1 read
    through block_tables int32 [B, max_blocks] from k_pool, v_pool [num_blocks, Hkv, BLOCK_SIZE, D].
    context_lens int32 [B] stays on the device (0 <= context_lens[b] <= max_blocks * BLOCK_SIZE, unchecked);
    rows of length 0 output zeros. The split count depends on B, Hkv and max_blocks only, so a captured graph
    replays for any lengths. Returns out [B, Hq, D]."""
    name = "paged_decode_attention"
    block_size = _check_pools(name, q, k_pool, v_pool)
    b, hq, d = q.shape
    _check_int32(name, "block_tables", block_tables, (b, None), q)
    _check_int32(name, "context_lens", context_lens, (b,), q)
    out = _out(name, out, q)
    hkv, group = k_pool.shape[1], hq // k_pool.shape[1]
    cfg = dict(decode_config(d, q.dtype), **(config or {}))
    block_n = min(cfg["BLOCK_N"], block_size)
    if block_size % block_n:
        raise ValueError(f"{name}: BLOCK_N {block_n} must divide BLOCK_SIZE {block_size}")
    capacity = block_tables.shape[1] * block_size
    splits = num_splits or decode_splits(b * hkv, capacity, block_n, q.device)
    if not 1 <= splits <= 1024:
        raise ValueError(f"{name}: num_splits {splits} must be in [1, 1024]")
    if b == 0:
        return out
    if splits > 1:
        part_o = torch.empty((b * hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    interpret = interpreting()
    _paged_decode_split_kernel[(b * hkv, splits)](
        q,
        k_pool,
        v_pool,
        block_tables,
        context_lens,
        part_o,
        part_lse,
        out,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        hkv,
        group,
        splits,
        d**-0.5 * _LOG2E,
        DIRECT=splits == 1,
        BLOCK_SIZE=block_size,
        HEAD_DIM=d,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        INTERPRET=interpret,
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _decode_reduce_kernel[(b * hq,)](
            part_o,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            hq,
            splits,
            HEAD_DIM=d,
            BLOCK_S=triton.next_power_of_2(splits),
            INTERPRET=interpret,
            num_warps=4,
        )
    return out
