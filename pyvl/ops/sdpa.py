"""Attention through ``torch.nn.functional.scaled_dot_product_attention``: the CPU choice for bf16/fp16.

The references compute attention in float32 whatever the input dtype, which on the CPU costs a float32 copy of
Q, K, V and of the whole (S, S) score matrix per head. PyTorch's fused CPU attention reads bf16/fp16 directly,
accumulates in float32 and never materialises the scores, at the same error against the float32 oracle (one
ViT layer of Mini-InternVL at bf16: max error 1.7e-3 both ways). ``pyvl.ops.resolve_ops`` serves these for
bf16/fp16 on the CPU under ``backend="auto"``; float32 keeps the references, which are bit-identical to the
original. Layouts and semantics are the references' (:mod:`pyvl.ops.reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import causal_mask, gather_kv

__all__ = ["vit_attention", "paged_prefill_attention"]


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional softmax(q k^T / sqrt(D)) v over [B, H, S, D], in the input dtype."""
    return F.scaled_dot_product_attention(q, k, v)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of the last Sq positions over Sk keys, [B, H, S, D] as the reference's.

    SDPA's own ``is_causal`` aligns the mask top-left (query i sees keys <= i), right only when Sq == Sk, so
    other cases (a prompt continuing a cached prefix) get an explicit mask aligned bottom-right.
    """
    sq, sk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]  # query head n reads KV head n // (Hq // Hkv): SDPA's enable_gqa grouping
    if sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(sq, sk, q.device), enable_gqa=gqa)


def paged_prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:
    """The reference's paged prefill (keys gathered through the block table) with SDPA's attention."""
    k = gather_kv(k_pool, block_table, context_len)
    v = gather_kv(v_pool, block_table, context_len)
    return _causal_attention(q.transpose(0, 1)[None], k, v)[0].transpose(0, 1).contiguous()
