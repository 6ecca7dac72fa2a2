"""store_kv: the reference writes each token at its slot and nothing else; the Triton kernel (pyvl.kernels.store_kv)
gives the reference's pools bit for bit. Pools start as NaN, so any slot written by mistake shows; slots are
shuffled across blocks, with padding rows (slot -1) between real ones, and k_new/v_new are strided views of fused
qkv rows as the model hands them over.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import fresh_generator, randn

from pyvl.kernels.store_kv import store_kv
from pyvl.ops import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(n, hkv, num_blocks, bs, d, dtype, gen, padding=3):
    """n tokens' K/V (views of fused qkv rows) and their slot mapping: n distinct random slots, ``padding``
    of them replaced by -1."""
    qkv = randn(n, 4 + 2 * hkv, d, dtype=dtype, device=DEVICE, gen=gen)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:n]
    slots[torch.randperm(n, generator=gen)[:padding]] = -1
    pools = torch.full((2, num_blocks, hkv, bs, d), float("nan"), dtype=dtype, device=DEVICE)
    return qkv[:, 4 : 4 + hkv], qkv[:, 4 + hkv :], pools[0], pools[1], slots.to(DEVICE)


def test_reference_writes_each_slot_and_nothing_else():
    gen, seed = fresh_generator()
    bs = 16
    k_new, v_new, k_pool, v_pool, slots = make_case(20, 2, 5, bs, 64, torch.bfloat16, gen)
    ref.store_kv(k_new, v_new, k_pool, v_pool, slots)
    written = 0
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_pool[slot // bs, :, slot % bs], k_new[t]), f"token {t}, seed {seed}"
            assert torch.equal(v_pool[slot // bs, :, slot % bs], v_new[t]), f"token {t}, seed {seed}"
            written += 1
    slot_is_set = ~k_pool.isnan().all(-1).all(1)  # [num_blocks, BS]
    assert int(slot_is_set.sum()) == written == 17, f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "hkv, bs, d, slot_dtype", [(1, 16, 64, torch.int64), (6, 32, 128, torch.int64), (2, 64, 64, torch.int32)]
)
def test_kernel_matches_reference(dtype, hkv, bs, d, slot_dtype):
    gen, seed = fresh_generator()
    k_new, v_new, k_pool, v_pool, slots = make_case(13, hkv, 4, bs, d, dtype, gen)
    slots = slots.to(slot_dtype)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    ref.store_kv(k_new, v_new, want_k, want_v, slots)
    assert store_kv(k_new, v_new, k_pool, v_pool, slots) is None
    assert torch.equal(k_pool.nan_to_num(7.0), want_k.nan_to_num(7.0)), f"k, seed {seed}"
    assert torch.equal(v_pool.nan_to_num(7.0), want_v.nan_to_num(7.0)), f"v, seed {seed}"


def test_rejects_bad_inputs():
    k_new = torch.zeros(3, 2, 64, device=DEVICE)
    pool = torch.zeros(4, 2, 16, 64, device=DEVICE)
    slots = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k_new, k_new, pool, pool, slots.float())
    with pytest.raises(ValueError, match="one dtype"):
        store_kv(k_new.bfloat16(), k_new.bfloat16(), pool, pool, slots)
    with pytest.raises(ValueError, match="KV heads or head_dim"):
        store_kv(k_new[:, :1], k_new[:, :1], pool, pool, slots)
    with pytest.raises(ValueError, match="last-dim stride"):
        wide = torch.zeros(3, 2, 128, device=DEVICE)[:, :, ::2]
        store_kv(wide, wide, pool, pool, slots)


@gpu
def test_real_store():
    """A 3400-token prefill's K/V (8 KV heads, D 128) into a pool of 1024 blocks of 64."""
    gen, seed = fresh_generator()
    k_new, v_new, k_pool, v_pool, slots = make_case(3400, 8, 1024, 64, 128, torch.bfloat16, gen, padding=40)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    ref.store_kv(k_new, v_new, want_k, want_v, slots)
    store_kv(k_new, v_new, k_pool, v_pool, slots)
    assert torch.equal(k_pool.nan_to_num(7.0), want_k.nan_to_num(7.0)), f"seed {seed}"
    assert torch.equal(v_pool.nan_to_num(7.0), want_v.nan_to_num(7.0)), f"seed {seed}"
