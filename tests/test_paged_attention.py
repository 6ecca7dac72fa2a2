"""Paged attention: pyvl.ops.reference's paged ops against today's contiguous reference, and the Triton kernels
(pyvl.kernels.paged_attention) against the paged reference.

Pools are [num_blocks, Hkv, BLOCK_SIZE, D] filled with NaN, then only the sequences' tokens are written (a test-side
scatter, independent of store_kv): a kernel that reads a slot past a sequence's length, a block outside its table or
the table past its length gives NaN, which the tolerance rule rejects. Tables are shuffled block ids; unused table
entries point at a poisoned block. Cases cover BLOCK_SIZE 16/32/64, partly filled last blocks, sequences ending on a
block boundary, chunked prefill over a cached prefix, decode rows sharing prefix blocks, rows of length 0, GQA ratios
1/2/6, head_dim 64/128, bf16 and fp32. Rules: kernel_tolerances.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_tolerances import assert_matches_oracle, fresh_generator, randn

from pyvl.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from pyvl.ops import reference as ref
from pyvl.ops import resolve_ops, sdpa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_pools(num_blocks, hkv, bs, d, dtype):
    pools = torch.full((2, num_blocks, hkv, bs, d), float("nan"), dtype=dtype, device=DEVICE)
    return pools[0], pools[1]  # views of one allocation, like a layer of the engine's pool


def write_sequence(k_pool, v_pool, table, k, v):
    """Keys/values [Hkv, L, D] of one sequence into the blocks its table lists, block by block."""
    bs = k_pool.shape[2]
    for i, block in enumerate(table.tolist()[: -(-k.shape[1] // bs)]):
        n = min(bs, k.shape[1] - i * bs)
        k_pool[block, :, :n] = k[:, i * bs : i * bs + n]
        v_pool[block, :, :n] = v[:, i * bs : i * bs + n]


def fused_q(tokens, hq, hkv, d, dtype, gen):
    """q [tokens, Hq, D] as a strided view of fused qkv rows, as the model hands it over."""
    return randn(tokens, hq + 2 * hkv, d, dtype=dtype, device=DEVICE, gen=gen)[:, :hq]


PREFILL = [  # hq, hkv, block_size, d, sq, context_len
    (2, 2, 16, 64, 17, 17),  # a whole prompt, last block holding one token
    (4, 2, 16, 128, 32, 32),  # ends exactly on a block boundary
    (6, 1, 32, 64, 9, 40),  # chunked prefill over 31 cached keys, partly filled last block
    (4, 2, 64, 64, 20, 64),  # the engine's block size, new tokens ending on the boundary
    (6, 1, 16, 64, 1, 33),  # a single query
]


def prefill_case(hq, hkv, bs, d, sq, length, dtype, gen):
    n_blocks = -(-length // bs)
    k_pool, v_pool = make_pools(n_blocks + 5, hkv, bs, d, dtype)
    table = torch.randperm(n_blocks + 5, generator=gen)[:n_blocks].to(torch.int32).to(DEVICE)
    k, v = (randn(hkv, length, d, dtype=dtype, device=DEVICE, gen=gen) for _ in range(2))
    write_sequence(k_pool, v_pool, table, k, v)
    return fused_q(sq, hq, hkv, d, dtype, gen), k_pool, v_pool, table, k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq, hkv, bs, d, sq, length", PREFILL)
def test_reference_paged_prefill_is_contiguous_attention(dtype, hq, hkv, bs, d, sq, length):
    gen, seed = fresh_generator()
    q, k_pool, v_pool, table, k, v = prefill_case(hq, hkv, bs, d, sq, length, dtype, gen)
    got = ref.paged_prefill_attention(q, k_pool, v_pool, table, length)
    want = ref.causal_attention(q.transpose(0, 1)[None], k[None], v[None])[0].transpose(0, 1)
    assert got.shape == (sq, hq, d) and torch.equal(got, want), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq, hkv, bs, d, sq, length", PREFILL)
def test_paged_prefill_kernel_matches_reference(dtype, hq, hkv, bs, d, sq, length):
    gen, seed = fresh_generator()
    q, k_pool, v_pool, table, _, _ = prefill_case(hq, hkv, bs, d, sq, length, dtype, gen)
    out = torch.full((sq, hq, d), float("nan"), dtype=dtype, device=DEVICE)  # poison
    got = paged_prefill_attention(q, k_pool, v_pool, table, length, out=out)
    assert got is out
    oracle = ref.paged_prefill_attention(q.float(), k_pool.float(), v_pool.float(), table, length)
    same = ref.paged_prefill_attention(q, k_pool, v_pool, table, length)
    assert_matches_oracle(got, oracle, same, f"seed {seed}")


def test_paged_prefill_over_shared_prefix_blocks():
    """Sequence B reuses A's first two full blocks (a cached prefix) and prefills only its own 13 tokens."""
    gen, seed = fresh_generator()
    dtype, hq, hkv, bs, d = torch.bfloat16, 4, 2, 16, 64
    k_pool, v_pool = make_pools(12, hkv, bs, d, dtype)
    ids = torch.randperm(12, generator=gen).to(torch.int32).to(DEVICE)
    table_a, table_b = ids[:3], torch.cat([ids[:2], ids[3:5]])
    k_a, v_a = (randn(hkv, 40, d, dtype=dtype, device=DEVICE, gen=gen) for _ in range(2))
    write_sequence(k_pool, v_pool, table_a, k_a, v_a)
    k_own, v_own = (randn(hkv, 13, d, dtype=dtype, device=DEVICE, gen=gen) for _ in range(2))
    write_sequence(k_pool, v_pool, table_b[2:], k_own, v_own)
    k_b, v_b = torch.cat([k_a[:, :32], k_own], 1), torch.cat([v_a[:, :32], v_own], 1)
    q = fused_q(13, hq, hkv, d, dtype, gen)
    got = paged_prefill_attention(q, k_pool, v_pool, table_b, 45)
    want = ref.causal_attention(q.transpose(0, 1)[None], k_b[None], v_b[None])[0].transpose(0, 1)
    oracle = ref.causal_attention(q.float().transpose(0, 1)[None], k_b[None].float(), v_b[None].float())
    assert_matches_oracle(got, oracle[0].transpose(0, 1), want, f"seed {seed}")


def decode_batch(hq, hkv, bs, d, dtype, gen, unit=None, max_blocks=4):
    """Five rows: padding (0), one token past a unit (default: a block), three units (a block boundary), one
    key, two and a half units; rows 1 and 2 share their first block (one physical copy), tables shuffled,
    unused entries pointing at a poisoned block."""
    unit = unit or bs
    lengths = [0, unit + 1, 3 * unit, 1, 2 * unit + unit // 2]
    num_blocks = sum(-(-n // bs) for n in lengths) + 2
    k_pool, v_pool = make_pools(num_blocks, hkv, bs, d, dtype)
    free = torch.randperm(num_blocks - 1, generator=gen).tolist()  # the last block is never written: poison
    tables = torch.full((len(lengths), max_blocks), num_blocks - 1, dtype=torch.int32)
    keys = []
    for row, n in enumerate(lengths):
        k, v = (randn(hkv, n, d, dtype=dtype, device=DEVICE, gen=gen) for _ in range(2))
        n_blocks = -(-n // bs)
        if row == 2:  # shares row 1's first block, so also its first bs keys
            tables[row, 0] = tables[1, 0]
            k[:, :bs], v[:, :bs] = keys[1][0][:, :bs], keys[1][1][:, :bs]
            tables[row, 1:n_blocks] = torch.tensor(
                [free.pop() for _ in range(n_blocks - 1)], dtype=torch.int32
            )
        else:
            tables[row, :n_blocks] = torch.tensor([free.pop() for _ in range(n_blocks)], dtype=torch.int32)
        write_sequence(k_pool, v_pool, tables[row].to(DEVICE), k, v)
        keys.append((k, v))
    q = fused_q(len(lengths), hq, hkv, d, dtype, gen)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q, k_pool, v_pool, tables.to(DEVICE), lens, keys


def test_reference_paged_decode_is_contiguous_attention():
    gen, seed = fresh_generator()
    q, k_pool, v_pool, tables, lens, keys = decode_batch(6, 2, 16, 64, torch.bfloat16, gen)
    got = ref.paged_decode_attention(q, k_pool, v_pool, tables, lens)
    assert got.shape == q.shape and torch.equal(got[0], torch.zeros_like(got[0])), f"seed {seed}"
    for row, (k, v) in enumerate(keys[1:], 1):
        want = ref.causal_attention(q[row][None, :, None], k[None], v[None])[0, :, 0]
        assert torch.equal(got[row], want), f"row {row}, seed {seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "hq, hkv, bs, d, splits",
    [(2, 2, 16, 64, None), (4, 2, 32, 128, 1), (6, 1, 16, 64, 3), (12, 2, 16, 128, 4), (6, 2, 16, 64, 7)],
)  # more splits than key tiles: every row has empty splits
def test_paged_decode_kernel_matches_reference(dtype, hq, hkv, bs, d, splits):
    gen, seed = fresh_generator()
    q, k_pool, v_pool, tables, lens, _ = decode_batch(hq, hkv, bs, d, dtype, gen)
    out = torch.full_like(q, float("nan"))  # poison
    got = paged_decode_attention(q, k_pool, v_pool, tables, lens, out=out, num_splits=splits)
    assert got is out
    assert torch.equal(got[0], torch.zeros_like(got[0])), "a length-0 row must give zeros"
    oracle = ref.paged_decode_attention(q.float(), k_pool.float(), v_pool.float(), tables, lens)
    same = ref.paged_decode_attention(q, k_pool, v_pool, tables, lens)
    # Split-KV rounds each split's P to the input dtype against that split's own running maximum, not the row's,
    # so with several splits its bf16 error can exceed twice the reference's (seen once: 6.2e-3 vs 6.1e-3 allowed).
    assert_matches_oracle(
        got,
        oracle,
        same,
        f"seed {seed}, splits {splits}",
        factor=3.0 if splits != 1 and dtype != torch.float32 else None,
    )


def test_paged_decode_lengths_are_read_on_the_device():
    """One context_lens tensor updated in place between calls, as a replayed CUDA graph sees it."""
    gen, seed = fresh_generator()
    q, k_pool, v_pool, tables, lens, _ = decode_batch(4, 2, 16, 64, torch.bfloat16, gen)
    full = lens.clone()
    for shrink in (0, 5, 16):
        lens.copy_((full - shrink).clamp(min=0))
        got = paged_decode_attention(q, k_pool, v_pool, tables, lens, num_splits=2)
        oracle = ref.paged_decode_attention(q.float(), k_pool.float(), v_pool.float(), tables, lens)
        same = ref.paged_decode_attention(q, k_pool, v_pool, tables, lens)
        assert_matches_oracle(got, oracle, same, f"lengths {lens.tolist()}, seed {seed}")


def test_sdpa_paged_prefill_matches_oracle():
    gen, seed = fresh_generator()
    q, k_pool, v_pool, table, _, _ = prefill_case(6, 2, 16, 64, 9, 40, torch.bfloat16, gen)
    q, k_pool, v_pool, table = q.cpu(), k_pool.cpu(), v_pool.cpu(), table.cpu()
    got = sdpa.paged_prefill_attention(q, k_pool, v_pool, table, 40)
    oracle = ref.paged_prefill_attention(q.float(), k_pool.float(), v_pool.float(), table, 40)
    assert_matches_oracle(
        got, oracle, ref.paged_prefill_attention(q, k_pool, v_pool, table, 40), f"seed {seed}"
    )


def test_op_table_serves_the_paged_ops():
    bf16 = resolve_ops("auto", "cpu", dtype=torch.bfloat16)
    assert bf16.paged_prefill_attention is sdpa.paged_prefill_attention
    assert bf16.paged_decode_attention is ref.paged_decode_attention and bf16.store_kv is ref.store_kv
    kernels = resolve_ops("triton", DEVICE)
    assert kernels.paged_prefill_attention is paged_prefill_attention
    assert kernels.paged_decode_attention is paged_decode_attention


def test_rejects_bad_inputs():
    k_pool = torch.zeros(4, 2, 16, 64, device=DEVICE)
    table = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    q = torch.zeros(3, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="BLOCK_SIZE 24"):
        pool = torch.zeros(4, 2, 24, 64, device=DEVICE)
        paged_prefill_attention(q, pool, pool, table, 10)
    with pytest.raises(ValueError, match="block_table must be an int32"):
        paged_prefill_attention(q, k_pool, k_pool, table.long(), 10)
    with pytest.raises(ValueError, match="context_len 33"):
        paged_prefill_attention(q, k_pool, k_pool, table, 33)
    with pytest.raises(ValueError, match="context_len 2"):
        paged_prefill_attention(q, k_pool, k_pool, table, 2)
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention(torch.zeros(3, 3, 64, device=DEVICE), k_pool, k_pool, table, 10)
    with pytest.raises(ValueError, match="context_lens must be an int32"):
        paged_decode_attention(
            q, k_pool, k_pool, table.expand(3, 2), torch.ones(3, dtype=torch.int64, device=DEVICE)
        )
    with pytest.raises(ValueError, match="last-dim stride"):
        tables = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE).t()
        paged_decode_attention(q, k_pool, k_pool, tables, torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(
            q.bfloat16(), k_pool, k_pool, table.expand(3, 2), torch.ones(3, dtype=torch.int32, device=DEVICE)
        )


@gpu
@pytest.mark.parametrize("hq, sq", [(48, 3400), (48, 300), (16, 3400)])
def test_real_paged_prefill(hq, sq):
    """V1-5 attention shapes (48/8 and 16/8 heads, D 128), 3400 keys in shuffled 64-token blocks; 300 = chunked."""
    gen, seed = fresh_generator()
    q, k_pool, v_pool, table, _, _ = prefill_case(hq, 8, 64, 128, sq, 3400, torch.bfloat16, gen)
    got = paged_prefill_attention(q, k_pool, v_pool, table, 3400)
    oracle = ref.paged_prefill_attention(q.float(), k_pool.float(), v_pool.float(), table, 3400)
    same = ref.paged_prefill_attention(q, k_pool, v_pool, table, 3400)
    assert_matches_oracle(got, oracle, same, f"Sq {sq}, seed {seed}")


@gpu
@pytest.mark.parametrize("unit, max_blocks", [(2048, 128), (10240, 512)])
def test_real_paged_decode(unit, max_blocks):
    """Five rows up to 3 units of keys (6144 / 30720) at 48/8 heads, D 128, block 64, tables of max_blocks
    blocks (8192 / 32768 keys)."""
    gen, seed = fresh_generator()
    q, k_pool, v_pool, tables, lens, _ = decode_batch(
        48, 8, 64, 128, torch.bfloat16, gen, unit=unit, max_blocks=max_blocks
    )
    got = paged_decode_attention(q, k_pool, v_pool, tables, lens)
    oracle = ref.paged_decode_attention(q.float(), k_pool.float(), v_pool.float(), tables, lens)
    same = ref.paged_decode_attention(q, k_pool, v_pool, tables, lens)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert_matches_oracle(got, oracle, same, f"seed {seed}")
