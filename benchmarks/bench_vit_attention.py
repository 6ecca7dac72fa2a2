"""ViT attention: pyvl's Triton kernel against torch SDPA, timed in the same run (GPU only).

    python benchmarks/bench_vit_attention.py [--tiles 13] [--sweep]

Shapes: InternViT-6B (H=25, D=128) and InternViT-300M (H=16, D=64), S = 1025, q/k/v as views of one fused
qkv output (the model's layout). FLOPs = 4 * B * H * S^2 * D (Q K^T and P V). Each line: median ms (CUDA
events via triton.testing.do_bench), TFLOP/s, the fraction of a bf16 GEMM's rate measured in this run, and
SDPA's time over ours. --sweep also times a few block configurations, to pick default_config on a new card.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from pyvl.bench.kernels import gemm_tflops, median_ms
from pyvl.kernels.vit_attention import default_config, vit_attention

SWEEP = [  # BLOCK_M, BLOCK_N, num_warps, num_stages
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 32, 4, 4),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=13)
    parser.add_argument("--sweep", action="store_true", help="also time other block configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_vit_attention needs a CUDA GPU")
    ceiling = gemm_tflops()
    print(
        f"device {torch.cuda.get_device_name()}, bf16 GEMM ceiling {ceiling:.0f} TFLOP/s (8192^3, this run)"
    )
    print(
        f"{'shape':<24} {'config':<18} {'ms':>8} {'TFLOP/s':>8} {'of GEMM':>8} {'SDPA ms':>8} {'SDPA/ours':>9}"
    )
    for h, d in ((25, 128), (16, 64)):
        b, s = args.tiles, 1025
        qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, as the model passes
        flops = 4 * b * h * s * s * d
        ref = F.scaled_dot_product_attention(q, k, v)
        err = ((vit_attention(q, k, v).float() - ref.float()).norm() / ref.float().norm()).item()
        sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        configs = [None] + (
            [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in SWEEP]
            if args.sweep
            else []
        )
        for cfg in configs:
            ms = median_ms(lambda: vit_attention(q, k, v, config=cfg))
            used = cfg or default_config(d, q.dtype)
            name = f"{used['BLOCK_M']}x{used['BLOCK_N']} w{used['num_warps']} s{used['num_stages']}"
            tflops = flops / ms / 1e9
            print(
                f"{b}x{h}x{s}x{d:<11} {name + ('' if cfg else '*'):<18} {ms:8.3f} {tflops:8.1f} "
                f"{tflops / ceiling:8.1%} {sdpa:8.3f} {sdpa / ms:9.2f}"
            )
        print(f"  (relative difference to SDPA: {err:.1e}; * = default_config)")


if __name__ == "__main__":
    main()
