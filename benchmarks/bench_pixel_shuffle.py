"""Pixel shuffle: pyvl's Triton gather-copy vs the reference view/permute sequence, against a copy (GPU only).

    python benchmarks/bench_pixel_shuffle.py [--version v2]

The ViT output [N, 1025, C] bf16 -> [N, 256, 4C]: InternViT-6B (C = 3200, InternVL 1.5) and InternViT-300M
(C = 1024), N = 1, 13 (12 tiles + thumbnail) and 41 tiles. Bytes = the patches read once + the output written
once (2 * N * 1024 * C * 2); GB/s against a device-to-device copy of the same bytes measured in this run. The
reference is what the plain-torch path runs: vit[:, 1:].reshape(N, 32, 32, C) then reference.pixel_shuffle
(two .contiguous() copies for v2). Times are medians of triton.testing.do_bench.
"""

from __future__ import annotations

import argparse

import torch

from pyvl.bench.kernels import median_ms
from pyvl.kernels.pixel_shuffle import pixel_shuffle_from_vit
from pyvl.ops import reference as ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="v2", choices=("v1", "v2"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_pixel_shuffle needs a CUDA device")
    print(f"pixel shuffle {args.version}, bf16, on {torch.cuda.get_device_name()}")
    print(
        f"{'N':>3} {'C':>5} {'MB':>7} {'ours us':>8} {'GB/s':>7} {'of copy':>7} {'ref us':>8} {'ref/ours':>8} "
        f"{'copy us':>8}"
    )
    for c in (3200, 1024):
        for n in (1, 13, 41):
            vit = torch.randn(n, 1025, c, device="cuda", dtype=torch.bfloat16)
            want = ref.pixel_shuffle(vit[:, 1:].reshape(n, 32, 32, c), 0.5, args.version)
            out = torch.empty_like(want)
            assert torch.equal(pixel_shuffle_from_vit(vit, args.version, out=out), want)
            nbytes = 2 * want.numel() * want.element_size()  # read + write
            src = vit[:, 1:].contiguous()
            copy_dst = torch.empty_like(src)
            ours = median_ms(lambda: pixel_shuffle_from_vit(vit, args.version, out=out))
            reference = median_ms(
                lambda: ref.pixel_shuffle(vit[:, 1:].reshape(n, 32, 32, c), 0.5, args.version)
            )
            copy = median_ms(lambda: copy_dst.copy_(src))
            gbps = nbytes / ours / 1e6
            print(
                f"{n:>3} {c:>5} {nbytes / 1e6:7.1f} {ours * 1e3:8.1f} {gbps:7.0f} {copy / ours:7.1%} "
                f"{reference * 1e3:8.1f} {reference / ours:8.2f} {copy * 1e3:8.1f}"
            )


if __name__ == "__main__":
    main()
