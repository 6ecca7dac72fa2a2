"""pyvl.kernels.causal_attention (prefill and split-KV decode) against pyvl.ops.reference.causal_attention.

K/V are always views into a larger preallocated cache [2, B, Hkv, capacity, D] (strided, as the KV cache hands
them over) and q a view of a fused qkv output. Cases cover GQA ratios 1, 2 and 6, head_dim 64 and 128, lengths
k*16 + 1 against 16-key blocks, chunked prefill (Sq < Sk), left-padded rows (kv_start), and decode with several
splits and lengths that are not a multiple of the split size. Rules: kernel_tolerances.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # triton reads it when @triton.jit runs, i.e. at the kernel's import
pytest.importorskip("triton")

from pyvl.kernels.causal_attention import causal_attention, decode_attention  # noqa: E402
from pyvl.ops import reference as ref  # noqa: E402
from kernel_tolerances import assert_matches_oracle, fresh_generator, randn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(b, hq, hkv, sq, sk, d, dtype, gen, spare=7):
    """q [B, Hq, Sq, D] as a view of fused qkv rows; k, v [B, Hkv, Sk, D] as views of a bigger cache."""
    q = randn(b, sq, hq + 2 * hkv, d, dtype=dtype, device=DEVICE, gen=gen)[:, :, :hq].transpose(1, 2)
    cache = randn(2, b, hkv, sk + spare, d, dtype=dtype, device=DEVICE, gen=gen)
    return q, cache[0, :, :, :sk], cache[1, :, :, :sk]


def check(q, k, v, kv_start, what):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # poison
    got = causal_attention(q, k, v, kv_start, out=out)
    assert got is out
    oracle = ref.causal_attention(q.float(), k.float(), v.float(), kv_start)
    assert_matches_oracle(got, oracle, ref.causal_attention(q, k, v, kv_start), what)


PREFILL = [  # hq, hkv, sq, sk, d, kv_start (None, or one entry per row)
    (2, 2, 17, 17, 64, None),
    (4, 2, 33, 33, 128, [0, 5]),
    (6, 1, 17, 40, 64, [3, 20]),  # chunked prefill over cached keys; row 1 padded past the first query
    (6, 1, 33, 33, 64, [30, 0]),  # padding rows inside the query block: they see only their own key
    (4, 2, 2, 9, 64, None),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq, hkv, sq, sk, d, pads", PREFILL)
def test_prefill_matches_reference(dtype, hq, hkv, sq, sk, d, pads):
    gen, seed = fresh_generator()
    b = len(pads) if pads else 1
    q, k, v = make_inputs(b, hq, hkv, sq, sk, d, dtype, gen)
    kv_start = torch.tensor(pads, device=DEVICE) if pads else None
    check(q, k, v, kv_start, f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq, hkv, sk, d, pads", [
    (4, 2, 65, 64, [0, 7]), (6, 1, 33, 128, [10, 0]), (2, 2, 1, 64, None), (6, 2, 17, 64, None)])
def test_decode_step_matches_reference(dtype, hq, hkv, sk, d, pads):
    """Sq == 1 goes through decode_attention with every row's length = Sk."""
    gen, seed = fresh_generator()
    b = len(pads) if pads else 1
    q, k, v = make_inputs(b, hq, hkv, 1, sk, d, dtype, gen)
    kv_start = torch.tensor(pads, device=DEVICE) if pads else None
    check(q, k, v, kv_start, f"seed {seed}")


@pytest.mark.parametrize("dtype, splits", [(torch.bfloat16, 1), (torch.bfloat16, 2), (torch.bfloat16, 3),
                                           (torch.bfloat16, 7), (torch.float32, 3), (torch.float32, 7)])
def test_decode_attention_splits_and_lengths(dtype, splits):
    """Rows of different lengths (37, 80 = capacity, 5), padding, and splits that are empty for short rows."""
    gen, seed = fresh_generator()
    b, hq, hkv, cap, d = 3, 6, 2, 80, 64
    q = randn(b, hq, 1, d, dtype=dtype, device=DEVICE, gen=gen)
    cache = randn(2, b, hkv, cap, d, dtype=dtype, device=DEVICE, gen=gen)
    lens = torch.tensor([37, 80, 5], dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor([3, 0, 4], device=DEVICE)
    out = decode_attention(q, cache[0], cache[1], lens, kv_start, num_splits=splits,
                           out=torch.full_like(q, float("nan")))
    for i, n in enumerate(lens.tolist()):
        k, v, qi, ks = cache[0, i:i + 1, :, :n], cache[1, i:i + 1, :, :n], q[i:i + 1], kv_start[i:i + 1]
        oracle = ref.causal_attention(qi.float(), k.float(), v.float(), ks)
        assert_matches_oracle(out[i:i + 1], oracle, ref.causal_attention(qi, k, v, ks), f"row {i}, seed {seed}")


def test_decode_lengths_are_read_on_the_device():
    """One seq_lens tensor updated in place between calls, as a replayed CUDA graph would see it."""
    gen, seed = fresh_generator()
    q = randn(1, 4, 1, 64, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    cache = randn(2, 1, 2, 48, 64, dtype=torch.bfloat16, device=DEVICE, gen=gen)
    lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for n in (9, 33, 48):
        lens.fill_(n)
        out = decode_attention(q, cache[0], cache[1], lens, num_splits=2)
        k, v = cache[0, :, :, :n], cache[1, :, :, :n]
        assert_matches_oracle(out, ref.causal_attention(q.float(), k.float(), v.float()),
                              ref.causal_attention(q, k, v), f"length {n}, seed {seed}")


def test_rejects_bad_inputs():
    q = torch.zeros(1, 3, 4, 64, device=DEVICE)
    kv = torch.zeros(1, 2, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        causal_attention(q, kv, kv)
    with pytest.raises(ValueError, match="queries but only"):
        causal_attention(torch.zeros(1, 2, 9, 64, device=DEVICE), kv, kv)
    with pytest.raises(ValueError, match="kv_start"):
        causal_attention(q[:, :2], kv, kv, torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q[:, :2, :1], kv, kv, torch.zeros(1, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="one query"):
        decode_attention(q[:, :2], kv, kv, torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="last-dim stride"):
        causal_attention(q[:, :2], kv, torch.zeros(1, 2, 64, 8, device=DEVICE).transpose(2, 3))


@gpu
@pytest.mark.parametrize("hq, hkv, sk", [(48, 8, 3400), (16, 8, 3400)])
def test_real_prefill(hq, hkv, sk):
    gen, seed = fresh_generator()
    q, k, v = make_inputs(1, hq, hkv, sk, sk, 128, torch.bfloat16, gen)
    check(q, k, v, None, f"prefill {hq}/{hkv} x {sk}, seed {seed}")


@gpu
@pytest.mark.parametrize("sk", [3400, 32768])
def test_real_decode(sk):
    gen, seed = fresh_generator()
    q, k, v = make_inputs(1, 48, 8, 1, sk, 128, torch.bfloat16, gen)
    check(q, k, v, None, f"decode 48/8 x {sk}, seed {seed}")
