"""LLM attention: pyvl's prefill and split-KV decode kernels against torch SDPA in the same run (GPU only).

    python benchmarks/bench_causal_attention.py [--prompt 3400] [--sweep]

Prefill: causal GQA, 48/8 and 16/8 heads, D = 128, K/V views of a larger cache. FLOPs = 4 * Hq * D * (number of
(query, key) pairs allowed). SDPA runs with enable_gqa, and on K/V repeated to Hq heads outside the timer (HF's
repeat_kv). Decode: one query per row over 3.4k and 32k cached keys, 48/8 heads. Bytes = K and V read once
(2 * Hkv * L * D * 2) + q + out; GB/s against a device-to-device copy measured in this run (read + write).
Decode is timed with do_bench and as a CUDA-graph replay (do_bench_cudagraph), the way the decode step runs.
--sweep times other split counts and block sizes.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from pyvl.bench.kernels import copy_gbps, gemm_tflops, median_ms
from pyvl.kernels.causal_attention import (causal_attention, decode_attention, decode_config, decode_splits,
                                           prefill_config)

BF16 = torch.bfloat16


def cache_views(hkv, length, capacity, d=128):
    cache = torch.randn(2, 1, hkv, capacity, d, device="cuda", dtype=BF16)
    return cache[0, :, :, :length], cache[1, :, :, :length], cache


def bench_prefill(sq, sweep, gemm):
    print(f"\nprefill, {sq} tokens, bf16, D=128 (GEMM ceiling {gemm:.0f} TFLOP/s)")
    print(f"{'heads':<7} {'config':<16} {'ms':>8} {'TFLOP/s':>8} {'of GEMM':>8} {'SDPA gqa':>9} {'SDPA rep':>9} "
          f"{'gqa/ours':>8} {'rep/ours':>8}")
    for hq, hkv in ((48, 8), (16, 8)):
        q = torch.randn(1, sq, hq, 128, device="cuda", dtype=BF16).transpose(1, 2)
        k, v, _ = cache_views(hkv, sq, sq + 512)
        k_rep, v_rep = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
        flops = 4 * hq * 128 * sq * (sq + 1) // 2
        ref = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
        err = ((causal_attention(q, k, v).float() - ref.float()).norm() / ref.float().norm()).item()
        gqa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        rep = median_ms(lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True))
        configs = [None] + ([dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in
                             ((128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4))] if sweep else [])
        for cfg in configs:
            ms = median_ms(lambda: causal_attention(q, k, v, config=cfg))
            used = cfg or prefill_config(128, BF16)
            name = f"{used['BLOCK_M']}x{used['BLOCK_N']} w{used['num_warps']} s{used['num_stages']}"
            tf = flops / ms / 1e9
            print(f"{hq}/{hkv:<4} {name + ('' if cfg else '*'):<16} {ms:8.3f} {tf:8.1f} {tf / gemm:8.1%} {gqa:9.3f} "
                  f"{rep:9.3f} {gqa / ms:8.2f} {rep / ms:8.2f}")
        print(f"  (relative difference to SDPA: {err:.1e}; * = prefill_config)")


def bench_decode(lengths, sweep, copy):
    print(f"\ndecode, 48/8 heads, D=128, bf16 (copy ceiling {copy:.0f} GB/s)")
    print(f"{'keys':<7} {'splits':>6} {'BLOCK_N':>7} {'ms':>8} {'GB/s':>7} {'of copy':>7} {'graph ms':>8} "
          f"{'graph GB/s':>10} {'SDPA ms':>8} {'SDPA GB/s':>9} {'SDPA/ours':>9}")
    hq, hkv, d = 48, 8, 128
    for length in lengths:
        k, v, cache = cache_views(hkv, length, length + 128)
        q = torch.randn(1, hq, 1, d, device="cuda", dtype=BF16)
        lens = torch.full((1,), length, dtype=torch.int32, device="cuda")
        nbytes = 2 * hkv * length * d * 2 + 2 * hq * d * 2
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        err = ((decode_attention(q, cache[0], cache[1], lens).float() - ref.float()).norm() /
               ref.float().norm()).item()
        sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        block_n = decode_config(d, BF16)["BLOCK_N"]
        default = decode_splits(hkv, cache.shape[3], block_n, q.device)
        variants = [(default, block_n)] + ([(s, n) for s in (8, 16, 32, 64, 128) for n in (32, 64, 128)
                                            if (s, n) != (default, block_n)] if sweep else [])
        out = torch.empty_like(q)
        for splits, n in variants:
            fn = lambda: decode_attention(q, cache[0], cache[1], lens, out=out, num_splits=splits,  # noqa: E731
                                          config=dict(BLOCK_N=n))
            ms = median_ms(fn)
            graph_ms = do_bench_cudagraph(fn, rep=200, return_mode="median")
            print(f"{length:<7} {splits:>6} {n:>7} {ms:8.4f} {nbytes / ms / 1e6:7.0f} {nbytes / ms / 1e6 / copy:7.1%} "
                  f"{graph_ms:8.4f} {nbytes / graph_ms / 1e6:10.0f} {sdpa:8.4f} {nbytes / sdpa / 1e6:9.0f} "
                  f"{sdpa / ms:9.2f}")
        print(f"  (relative difference to SDPA: {err:.1e}; first line = defaults)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=3400)
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[3400, 32768])
    parser.add_argument("--sweep", action="store_true", help="also time other splits / block configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_causal_attention needs a CUDA GPU")
    print(f"device {torch.cuda.get_device_name()}")
    bench_prefill(args.prompt, args.sweep, gemm_tflops())
    bench_decode(args.decode_lengths, args.sweep, copy_gbps())


if __name__ == "__main__":
    main()
