"""Write new tokens' K/V into the paged KV pool through a slot mapping held on the device.

    k_pool[slot // BLOCK_SIZE, :, slot % BLOCK_SIZE] = k_new[t]   (and v), slot = slot_mapping[t]

k_new, v_new: [N, Hkv, D] (views of the fused qkv output are fine: strided, last dim contiguous); k_pool, v_pool:
[num_blocks, Hkv, BLOCK_SIZE, D]; slot_mapping: [N] int64 (or int32). Slots < 0 are padding rows of a CUDA-graph
batch and write nothing. One program per token copies its Hkv x D tile of K and of V; no host sync, no shape that
depends on the slots, so a captured step can replay it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import DTYPES, check_operands

__all__ = ["store_kv"]


@triton.jit
def _store_kv_kernel(
    KNew,
    VNew,
    KPool,
    VPool,
    Slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kpb,
    stride_kph,
    stride_kps,
    stride_vpb,
    stride_vph,
    stride_vps,
    HKV,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    if slot >= 0:  # slot < 0: a padding row, skipped
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)[:, None]
        offs_d = tl.arange(0, HEAD_DIM)[None, :]
        ok = offs_h < HKV
        k = tl.load(KNew + t * stride_kt + offs_h * stride_kh + offs_d, mask=ok)
        v = tl.load(VNew + t * stride_vt + offs_h * stride_vh + offs_d, mask=ok)
        tl.store(KPool + block * stride_kpb + offs_h * stride_kph + offset * stride_kps + offs_d, k, mask=ok)
        tl.store(VPool + block * stride_vpb + offs_h * stride_vph + offset * stride_vps + offs_d, v, mask=ok)


def store_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token t's K/V into the pools at slot_mapping[t] (see the module docstring), in place. Slots must be
    < num_blocks * BLOCK_SIZE and distinct (unchecked: they are never read on the host)."""
    name = "store_kv"
    if k_new.dim() != 3 or v_new.shape != k_new.shape or k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(
            f"{name} wants k_new, v_new of one shape [N, Hkv, D] and k_pool, v_pool of one shape "
            f"[num_blocks, Hkv, BLOCK_SIZE, D]; got {tuple(k_new.shape)}, {tuple(v_new.shape)}, "
            f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}"
        )
    n, hkv, d = k_new.shape
    if k_pool.shape[1] != hkv or k_pool.shape[3] != d:
        raise ValueError(
            f"{name}: k_new {tuple(k_new.shape)} does not match the pool {tuple(k_pool.shape)} in "
            f"KV heads or head_dim"
        )
    if k_new.dtype not in DTYPES or any(t.dtype != k_new.dtype for t in (v_new, k_pool, v_pool)):
        raise ValueError(
            f"{name} wants k_new, v_new, k_pool, v_pool of one dtype in {DTYPES}; got "
            f"{k_new.dtype}, {v_new.dtype}, {k_pool.dtype}, {v_pool.dtype}"
        )
    if d & (d - 1):
        raise ValueError(f"{name}: head_dim {d} must be a power of two")
    if slot_mapping.shape != (n,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: slot_mapping must be an int64/int32 tensor [{n}]; got "
            f"{tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    check_operands(
        name,
        {"k_new": k_new, "v_new": v_new, "k_pool": k_pool, "v_pool": v_pool, "slot_mapping": slot_mapping},
    )
    if n == 0:
        return
    _store_kv_kernel[(n,)](
        k_new,
        v_new,
        k_pool,
        v_pool,
        slot_mapping,
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        hkv,
        BLOCK_SIZE=k_pool.shape[2],
        HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(hkv),
        num_warps=1,
    )
