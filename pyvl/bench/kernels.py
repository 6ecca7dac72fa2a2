"""``pyvl bench kernels``: every registered Triton kernel against torch at InternVL-Chat-V1-5's real shapes (CUDA).

Each row: the median time (timing "eager": triton.testing.do_bench, CUDA events, L2 flushed before each call;
"graph": CUDA-graph replays with do_bench_cudagraph, as the decode step runs: decode attention, the one-token
shapes of the other ops), the rate, its fraction of the device ceilings measured in the same run, the baseline
timed the same way in the same run (torch SDPA for attention, the plain-torch reference op of
pyvl.ops.reference, what backend="reference" runs, for the rest), rel diff = |ours - baseline| / |baseline| over
the whole output, and registers per thread / spills / shared memory of each Triton kernel launched
(pyvl.bench.resources; None where unavailable).

Paged attention reads K/V through shuffled block tables of 64-token blocks; the SDPA baseline reads the same keys
gathered contiguous. Decode attention is timed three ways: eager; "graph, hot L2" (the same 14 MB of K/V every
replay: at 3400 keys it stays in the L2 and the GB/s is inflated); and "graph, N K/V copies": one graph walks over
N distinct K/V pools, N * K/V bytes >= 2x the L2 (torch.cuda.get_device_properties().L2_cache_size, else 60 MB), so
every call reads its K/V from HBM as in a real decode step; its ms is per call (replay time / N).

    attention     TFLOP/s = 4 * B * H * S_q * S_k * D / t (causal: only the allowed (query, key) pairs)
                  decode: GB/s of K and V read once (2 * Hkv * L * D * 2 bytes) + q + out
    other ops     GB/s = bytes read + bytes written once / t
    ceilings      a 1 GiB device-to-device copy (read + write bytes) and a bf16 8192^3 GEMM

Shapes (bf16, REAL): ViT attention 13 tiles x 25 heads x 1025 x 128 (6B) and x 16 heads x 64 (300M), q/k/v views
of one fused qkv output; prefill 3400 tokens, 48/8 and 16/8 heads; decode 48/8 heads over 3400 and 32768 cached
keys (and 16 rows x 3400); rms_norm / silu_mul / apply_rotary at the InternLM2-20B widths for 3400 tokens
(prefill) and 1 token (decode); pixel_shuffle of 13 tiles of InternViT-6B output; w4a16_linear on
InternLM2-20B's wqkv, wo, w13 and w2 (groups of 128) at 1 token, 16 (w13) and 3400 (w13, w2).

``--smoke`` (SMOKE shapes, :func:`smoke_rig`) runs the same cases on the CPU under TRITON_INTERPRET=1 at tiny
sizes, timed by a perf_counter median (no CUDA events, no graphs), against ceilings measured the same way: it
checks the code paths before a GPU run, its figures mean nothing. With a :class:`~pyvl.bench.report.Report`
that streams, each row is printed as soon as it is measured.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..errors import PyvlError
from ..kv_cache import BLOCK_SIZE
from ..ops import _TRITON_OPS, reference
from .report import Report
from .resources import format_resources, launched_kernels
from .timing import format_table, median_seconds

__all__ = [
    "Shapes",
    "REAL",
    "SMOKE",
    "Rig",
    "gpu_rig",
    "smoke_rig",
    "rig_for",
    "require_gpu",
    "require_interpreter",
    "rig_setup",
    "median_ms",
    "graph_ms",
    "copy_gbps",
    "gemm_tflops",
    "l2_bytes",
    "rotation_copies",
    "paged_pool",
    "run",
    "format_result",
]

BF16 = torch.bfloat16
DEVICE = "cuda"


@dataclass(frozen=True)
class Shapes:
    """The sizes a run measures at (shared with pyvl.bench.sweep)."""

    vit_tiles: int
    vit_seq: int  # 1 CLS row + a square grid of patches
    vit_width: int  # the ViT's hidden size: pixel_shuffle's channels
    vit_heads: tuple[tuple[int, int], ...]  # (heads, head_dim) per ViT
    prompt: int  # prefill tokens
    prefill_heads: tuple[tuple[int, int], ...]  # (query heads, KV heads) per LLM
    decode_lengths: tuple[int, ...]  # cached keys
    decode_batch: int  # rows of the full-batch decode case
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    copy_bytes: int  # the copy ceiling's buffer
    gemm_n: int  # the GEMM ceiling's n^3
    w4_group: int  # inputs per zero point and scale of the 4-bit linears


REAL = Shapes(  # InternViT-6B / -300M, InternLM2-20B / -1.8B; a 3400-token prompt is 13 tiles x 256 + 72 text
    vit_tiles=13,
    vit_seq=1025,
    vit_width=3200,
    vit_heads=((25, 128), (16, 64)),
    prompt=3400,
    prefill_heads=((48, 8), (16, 8)),
    decode_lengths=(3400, 32768),
    decode_batch=16,
    hidden=6144,
    ffn=16384,
    heads=48,
    kv_heads=8,
    head_dim=128,
    copy_bytes=1 << 30,
    gemm_n=8192,
    w4_group=128,  # AWQ's usual group
)
SMOKE = Shapes(  # the interpreter spends about a millisecond per program step: a few programs per launch
    vit_tiles=2,
    vit_seq=17,
    vit_width=32,
    vit_heads=((2, 64), (2, 32)),
    prompt=8,  # above w4a16's GEMV_MAX_ROWS: the prefill rows take its gemm kernel, as at the real size
    prefill_heads=((4, 2), (2, 2)),
    decode_lengths=(16, 70),
    decode_batch=2,
    hidden=64,
    ffn=128,
    heads=2,
    kv_heads=1,
    head_dim=64,
    copy_bytes=1 << 22,
    gemm_n=128,
    w4_group=32,
)
SMOKE_L2_BYTES = 1 << 12  # a stand-in, so that the K/V rotation walks two copies at the smoke lengths
TARGETS = {
    ("vit_attention", "13x25x1025x128"): ">= 450 TFLOP/s",
    ("paged_decode_attention", "decode 48/8 x 3400 x 128"): ">= 1500 GB/s",
    ("paged_decode_attention", "decode 48/8 x 32768 x 128"): ">= 3000 GB/s",
}  # the project's targets


def median_ms(fn, rep_ms: int = 200) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def graph_ms(fn, rep_ms: int = 200) -> float:
    """Median of CUDA-graph replays of ``fn``: the GPU time without the host's launch cost."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def _perf_counter_ms(fn) -> float:
    """The smoke timer: a plain wall-clock median of a few calls on the CPU."""
    return median_seconds(fn, repeat=3, warmup=0) * 1e3  # the row's first call compiled it


def l2_bytes() -> int:
    """The device's L2 size (60 MB, an H200's, when torch does not report it)."""
    size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    return size if isinstance(size, int) and size > 0 else 60 * 2**20


def rotation_copies(bytes_per_call: int, l2: int) -> int:
    """Distinct buffer copies one graph must walk so that together they exceed twice the L2 (at least 2)."""
    return max(2, math.ceil(2 * l2 / bytes_per_call))


@dataclass(frozen=True)
class Rig:
    """Where and how a kernel benchmark measures: its shapes, its device, two timers (fn -> median ms of one
    call: plain, and as the decode step runs) and the L2 size that the K/V rotation must exceed twice."""

    shapes: Shapes
    device: str
    device_name: str
    eager_ms: Callable[[Callable], float]
    graph_ms: Callable[[Callable], float]
    l2_bytes: int


def gpu_rig(rep_ms: int) -> Rig:
    """REAL shapes on the GPU: do_bench (CUDA events, L2 flushed) and CUDA-graph replays."""
    return Rig(
        REAL,
        DEVICE,
        torch.cuda.get_device_name(),
        partial(median_ms, rep_ms=rep_ms),
        partial(graph_ms, rep_ms=rep_ms),
        l2_bytes(),
    )


def smoke_rig() -> Rig:
    """SMOKE shapes on the CPU under the Triton interpreter, every figure a perf_counter median."""
    return Rig(
        SMOKE,
        "cpu",
        "cpu (smoke: tiny shapes, Triton interpreter, perf_counter medians)",
        _perf_counter_ms,
        _perf_counter_ms,
        SMOKE_L2_BYTES,
    )


def copy_gbps(nbytes: int = 1 << 30, rep_ms: int = 200, device: str = DEVICE, timer=None) -> float:
    """Copy bandwidth, counting the bytes read and the bytes written (``timer``: fn -> ms, default do_bench)."""
    src = torch.empty(nbytes // 2, device=device, dtype=BF16).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer or partial(median_ms, rep_ms=rep_ms))(lambda: dst.copy_(src)) / 1e6


def gemm_tflops(n: int = 8192, rep_ms: int = 200, device: str = DEVICE, timer=None) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=BF16) for _ in range(2))
    return 2 * n**3 / (timer or partial(median_ms, rep_ms=rep_ms))(lambda: a @ b) / 1e9


def _rounded(value: float) -> float:
    """One decimal, as the GPU figures are shown; three significant digits below 1 (the smoke's tiny rates)."""
    return round(value, 1) if abs(value) >= 1 else float(f"{value:.3g}")


def _ceilings(rig: Rig) -> dict:
    s = rig.shapes
    return {
        "copy_GBps": _rounded(copy_gbps(s.copy_bytes, device=rig.device, timer=rig.eager_ms)),
        "gemm_bf16_TFLOPs": _rounded(gemm_tflops(s.gemm_n, device=rig.device, timer=rig.eager_ms)),
    }


def _kernel(op: str):
    module, func = _TRITON_OPS[op].split(":")
    return getattr(importlib.import_module(module), func)


def _rel_diff(ours, ref) -> float:
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    a = torch.cat([t.float().flatten() for t in ours])
    b = torch.cat([t.float().flatten() for t in ref])
    return float((a - b).norm() / b.norm())


class _Case:
    """Times one kernel against its baseline and turns the two into a row."""

    def __init__(self, rig: Rig, ceilings: dict):
        self.rig, self.shapes, self.ceilings = rig, rig.shapes, ceilings

    def randn(self, *shape, dtype=BF16) -> torch.Tensor:
        return torch.randn(*shape, device=self.rig.device, dtype=dtype)

    def row(self, op, shape, ours, base, base_name, amount, unit, graph=False, timing=None, calls=1) -> dict:
        """``calls``: how many kernel calls one ``ours()`` / ``base()`` makes; ms and rate are per call."""
        with launched_kernels() as kernels:
            first = ours()  # compiles; also the output compared below
        timer = self.rig.graph_ms if graph else self.rig.eager_ms
        ms = timer(ours) / calls
        try:
            base_ms = timer(base) / calls
        except Exception as exc:  # e.g. a torch op that cannot be captured in a graph: keep our figure
            base_ms, base_name = None, f"{base_name} failed: {type(exc).__name__}"
        rate = amount / ms / (1e9 if unit == "TFLOP/s" else 1e6)
        ceiling = self.ceilings["gemm_bf16_TFLOPs"] if unit == "TFLOP/s" else self.ceilings["copy_GBps"]
        timing = timing or ("graph" if graph else "eager, L2 flushed")
        return {
            "op": op,
            "shape": shape,
            "timing": timing,
            "ms": round(ms, 4),
            "rate": _rounded(rate),
            "unit": unit,
            "of_ceiling": round(rate / ceiling, 3),
            "baseline": base_name,
            "baseline_ms": None if base_ms is None else round(base_ms, 4),
            "baseline/ours": None if base_ms is None else round(base_ms / ms, 2),
            "rel_diff": float(f"{_rel_diff(first, base()):.2e}"),
            "target": TARGETS.get((op, shape), ""),
            "kernels": kernels,
        }


# Each case yields its rows one at a time, so that a streaming Report prints each as soon as it is measured.


def _vit_attention(case: _Case):
    kernel, s = _kernel("vit_attention"), case.shapes
    for h, d in s.vit_heads:
        b, n = s.vit_tiles, s.vit_seq
        qkv = case.randn(b, n, 3, h, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, as the model passes
        yield case.row(
            "vit_attention",
            f"{b}x{h}x{n}x{d}",
            lambda: kernel(q, k, v),
            lambda: F.scaled_dot_product_attention(q, k, v),
            "SDPA",
            4 * b * h * n * n * d,
            "TFLOP/s",
        )


def paged_pool(batch: int, length: int, hkv: int, d: int, device=DEVICE, dtype=BF16):
    """A K/V pool [2, blocks, Hkv, BLOCK_SIZE, D] holding ``batch`` sequences of ``length`` keys through shuffled
    block tables int32 [batch, blocks per sequence], and those keys gathered contiguous [2, batch, Hkv, length, D]
    (what a non-paged cache would read)."""
    n_blocks = -(-length // BLOCK_SIZE)
    pool = torch.randn(2, batch * n_blocks + 8, hkv, BLOCK_SIZE, d, device=device, dtype=dtype)
    tables = torch.randperm(pool.shape[1] - 8, device=device)[: batch * n_blocks].view(batch, n_blocks).int()
    kv = pool[:, tables.long()].permute(0, 1, 3, 2, 4, 5).reshape(2, batch, hkv, -1, d)[:, :, :, :length]
    return pool, tables, kv.contiguous()


def _paged_prefill_attention(case: _Case):
    """A whole prompt through a shuffled block table, against SDPA causal on the same keys gathered."""
    kernel, s, d = _kernel("paged_prefill_attention"), case.shapes, case.shapes.head_dim
    for hq, hkv in s.prefill_heads:
        pool, tables, kv = paged_pool(1, s.prompt, hkv, d, case.rig.device)
        q = case.randn(s.prompt, hq + 2 * hkv, d)[:, :hq]  # a view of fused qkv rows
        qt = q.transpose(0, 1)[None]  # (1, Hq, S, D)
        yield case.row(
            "paged_prefill_attention",
            f"prefill {hq}/{hkv} x {s.prompt} x {d}",
            lambda: kernel(q, pool[0], pool[1], tables[0], s.prompt),
            lambda: F.scaled_dot_product_attention(qt, kv[0], kv[1], is_causal=True, enable_gqa=True)[
                0
            ].transpose(0, 1),
            "SDPA gqa (gathered)",
            4 * hq * d * s.prompt * (s.prompt + 1) // 2,
            "TFLOP/s",
        )


def _paged_decode_attention(case: _Case):
    """The engine's decode over shuffled block tables, against SDPA on the same keys gathered contiguous."""
    kernel, s, device = _kernel("paged_decode_attention"), case.shapes, case.rig.device
    d, hq, hkv = s.head_dim, s.heads, s.kv_heads
    for length in s.decode_lengths:
        shape, nbytes = f"decode {hq}/{hkv} x {length} x {d}", 2 * hkv * length * d * 2 + 2 * hq * d * 2
        lens = torch.full((1,), length, dtype=torch.int32, device=device)  # device lengths: graph-capturable
        q = case.randn(1, hq, d)
        copies = rotation_copies(nbytes, case.rig.l2_bytes)
        pools = [paged_pool(1, length, hkv, d, device) for _ in range(copies)]
        outs = [torch.empty_like(q) for _ in range(copies)]
        ours = lambda c=pools[0], o=outs[0]: kernel(q, c[0][0], c[0][1], c[1], lens, out=o)  # noqa: E731
        base = lambda c=pools[0]: F.scaled_dot_product_attention(  # noqa: E731
            q[:, :, None], c[2][0], c[2][1], enable_gqa=True
        )[:, :, 0]
        yield case.row("paged_decode_attention", shape, ours, base, "SDPA gqa (gathered)", nbytes, "GB/s")
        yield case.row(
            "paged_decode_attention",
            shape,
            ours,
            base,
            "SDPA gqa (gathered)",
            nbytes,
            "GB/s",
            graph=True,
            timing="graph, hot L2",
        )
        yield case.row(
            "paged_decode_attention",
            shape,
            lambda: [ours(c, o) for c, o in zip(pools, outs)],
            lambda: [base(c) for c in pools],
            "SDPA gqa (gathered)",
            nbytes,
            "GB/s",
            graph=True,
            timing=f"graph, {copies} K/V copies",
            calls=copies,
        )
    batch, length = s.decode_batch, s.decode_lengths[0]  # a full decode batch
    pool, tables, kv = paged_pool(batch, length, hkv, d, device)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    q = case.randn(batch, hq, d)
    yield case.row(
        "paged_decode_attention",
        f"decode {batch} x {hq}/{hkv} x {length} x {d}",
        lambda: kernel(q, pool[0], pool[1], tables, lens),
        lambda: F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], enable_gqa=True)[:, :, 0],
        "SDPA gqa (gathered)",
        batch * (2 * hkv * length * d * 2 + 2 * hq * d * 2),
        "GB/s",
        graph=True,
    )


def _rms_norm(case: _Case):
    from pyvl.kernels.rms_norm import add_rms_norm

    kernel, s, c = _kernel("rms_norm"), case.shapes, case.shapes.hidden
    w = case.randn(c)
    for tokens in (s.prompt, 1):
        x, r = (case.randn(tokens, c) for _ in range(2))
        yield case.row(
            "rms_norm",
            f"{tokens} x {c}",
            lambda: kernel(x, w, 1e-5),
            lambda: reference.rms_norm(x, w, 1e-5),
            "reference",
            2 * x.numel() * 2 + c * 2,
            "GB/s",
            graph=tokens == 1,
        )
        yield case.row(
            "rms_norm (+residual)",
            f"{tokens} x {c}",
            lambda: add_rms_norm(x, r, w, 1e-5),
            lambda: (reference.rms_norm(x + r, w, 1e-5), x + r),
            "reference",
            4 * x.numel() * 2 + c * 2,
            "GB/s",
            graph=tokens == 1,
        )


def _silu_mul(case: _Case):
    kernel, s, width = _kernel("silu_mul"), case.shapes, case.shapes.ffn
    for tokens in (s.prompt, 1):
        gate, up = (case.randn(tokens, width) for _ in range(2))
        yield case.row(
            "silu_mul",
            f"{tokens} x {width}",
            lambda: kernel(gate, up),
            lambda: reference.silu_mul(gate, up),
            "reference",
            3 * gate.numel() * 2,
            "GB/s",
            graph=tokens == 1,
        )


def _apply_rotary(case: _Case):
    kernel, s = _kernel("apply_rotary"), case.shapes
    hq, hkv, d = s.heads, s.kv_heads, s.head_dim
    for tokens in (s.prompt, 1):
        qkv = case.randn(1, tokens, (hq + 2 * hkv) * d)  # the wqkv output
        q = qkv[..., : hq * d].view(1, tokens, hq, d).transpose(1, 2)  # (1, Hq, S, D) view
        k = qkv[..., hq * d : (hq + hkv) * d].view(1, tokens, hkv, d).transpose(1, 2)
        cos, sin = (case.randn(1, tokens, d, dtype=torch.float32) for _ in range(2))
        nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 4
        yield case.row(
            "apply_rotary",
            f"{tokens} x ({hq}+{hkv}) x {d}",
            lambda: kernel(q, k, cos, sin),
            lambda: reference.apply_rotary(q, k, cos, sin),
            "reference",
            nbytes,
            "GB/s",
            graph=tokens == 1,
        )


def _pixel_shuffle(case: _Case):
    kernel, s = _kernel("pixel_shuffle"), case.shapes
    n, c, g = s.vit_tiles, s.vit_width, math.isqrt(s.vit_seq - 1)
    vit = case.randn(n, s.vit_seq, c)
    grid = vit[:, 1:].reshape(n, g, g, c)  # (N, g, g, C) view past the CLS row, as shuffle_tokens passes
    yield case.row(
        "pixel_shuffle",
        f"{n} x {g} x {g} x {c} v2",
        lambda: kernel(grid, 0.5, "v2"),
        lambda: reference.pixel_shuffle(grid, 0.5, "v2"),
        "reference",
        2 * grid.numel() * 2,
        "GB/s",
    )


def _w4a16_linear(case: _Case):
    """InternLM2's decoder linears with 4-bit weights (random, groups of w4_group) against cuBLAS bf16 on the
    same weights dequantized. One token and a full decode batch: GB/s of the packed weight (+ x and out), CUDA
    graphs walking enough weight copies to pass twice the L2 (every call reads its weight from HBM, as a
    decode step does); baseline/ours is the 4-bit speed-up. A prompt: TFLOP/s, eager with L2 flushed."""
    kernel, s, device = _kernel("w4a16_linear"), case.shapes, case.rig.device
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    linears = {"wqkv": (qkv, s.hidden), "wo": (s.hidden, s.heads * s.head_dim), "w13": (2 * s.ffn, s.hidden)}
    linears["w2"] = (s.hidden, s.ffn)

    def weight(n: int, k: int):
        qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device)
        qzeros = torch.randint(0, 16, (n, k // s.w4_group), dtype=torch.uint8, device=device)
        scales = torch.rand(n, k // s.w4_group, device=device).mul(0.02).add(0.002).to(BF16)
        return qweight, qzeros, scales

    for name, (n, k) in linears.items():
        for m in (1, s.decode_batch) if name == "w13" else (1,):
            packed = (
                n * k // 2 + n * (k // s.w4_group) * 3 + (m * k + m * n) * 2
            )  # words, zeros, scales, x, out
            copies = rotation_copies(packed, case.rig.l2_bytes)
            weights = [weight(n, k) for _ in range(copies)]
            dense = [reference.dequantize_w4(*w).to(BF16) for w in weights]
            x = case.randn(m, k)
            outs = [torch.empty(m, n, device=device, dtype=BF16) for _ in range(copies)]
            yield case.row(
                "w4a16_linear",
                f"{name} {m} x {k} -> {n}, g{s.w4_group}",
                lambda x=x, ws=weights, os=outs: [kernel(x, *w, out=o) for w, o in zip(ws, os)],
                lambda x=x, ds=dense: [F.linear(x, d) for d in ds],
                "cuBLAS bf16 (dequantized)",
                packed,
                "GB/s",
                graph=True,
                timing=f"graph, {copies} weight copies",
                calls=copies,
            )
            del weights, dense
    for name in ("w13", "w2"):
        (n, k), m = linears[name], s.prompt
        w = weight(n, k)
        dense, x = reference.dequantize_w4(*w).to(BF16), case.randn(m, k)
        yield case.row(
            "w4a16_linear",
            f"{name} {m} x {k} -> {n}, g{s.w4_group}",
            lambda x=x, w=w: kernel(x, *w),
            lambda x=x, d=dense: F.linear(x, d),
            "cuBLAS bf16 (dequantized)",
            2 * m * n * k,
            "TFLOP/s",
        )


CASES = {
    "vit_attention": _vit_attention,
    "paged_prefill_attention": _paged_prefill_attention,
    "paged_decode_attention": _paged_decode_attention,
    "rms_norm": _rms_norm,
    "silu_mul": _silu_mul,
    "apply_rotary": _apply_rotary,
    "pixel_shuffle": _pixel_shuffle,
    "w4a16_linear": _w4a16_linear,
}


def require_gpu(command: str) -> None:
    """PyvlError naming the missing device, before anything touches CUDA."""
    if not torch.cuda.is_available():
        raise PyvlError(
            f"bench {command} needs a CUDA GPU: it times the Triton kernels on the device "
            "(torch.cuda.is_available() is False here; --smoke runs it on the CPU)"
        )
    from pyvl.kernels._common import interpreting

    if interpreting():
        raise PyvlError(
            f"bench {command}: TRITON_INTERPRET=1 is set; unset it to time the kernels on the GPU"
        )


def require_interpreter(command: str) -> None:
    """PyvlError unless the kernels were decorated under TRITON_INTERPRET=1 (the smoke runs them on the CPU)."""
    from pyvl.kernels._common import interpreting

    if not interpreting():
        raise PyvlError(
            f"bench {command} --smoke runs the kernels on the CPU under the Triton interpreter: "
            "set TRITON_INTERPRET=1"
        )


def rig_for(command: str, smoke: bool, rep_ms: int) -> Rig:
    """The smoke rig (the interpreter must be on), else the GPU rig (a GPU must be there)."""
    if smoke:
        require_interpreter(command)
        return smoke_rig()
    require_gpu(command)
    return gpu_rig(rep_ms)


def rig_setup(rig: Rig) -> dict:
    """The result's "setup": what measured, where."""
    import triton

    return {
        "device": rig.device_name,
        "shapes": "smoke" if rig.shapes == SMOKE else "real",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "l2_MB": round(rig.l2_bytes / 2**20, 1),
    }


def run(ops=None, repeat_ms: int = 200, report: Report | None = None, smoke: bool = False) -> dict:
    """Time the registered kernels (all, or ``ops``) into ``report``; returns its result,
    {"setup", "ceilings", "rows", "notes"}."""
    report = report or Report()
    rig = rig_for("kernels", smoke, repeat_ms)
    unknown = sorted(set(ops or ()) - set(_TRITON_OPS))
    if unknown:
        raise PyvlError(f"bench kernels: unknown ops {unknown}; registered kernels: {sorted(_TRITON_OPS)}")
    report.set("setup", rig_setup(rig))
    ceilings = _ceilings(rig)
    report.set("ceilings", ceilings)
    case = _Case(rig, ceilings)
    default = [op for op in CASES if op in _TRITON_OPS] + [op for op in _TRITON_OPS if op not in CASES]
    for op in ops or default:
        if op not in CASES:
            report.note(f"{op}: registered kernel without a benchmark case in pyvl/bench/kernels.py")
            continue
        try:
            for row in CASES[op](case):
                report.row(row)
        except Exception as exc:  # one broken kernel should not hide the others' figures
            report.note(f"{op}: {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()
    return report.done()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_result(result: dict) -> str:
    s, c = result["setup"], result["ceilings"]
    head = (
        f"{s['device']}, torch {s['torch']}, triton {s['triton']}; ceilings measured now: copy "
        f"{c['copy_GBps']:.0f} GB/s (read + write), bf16 GEMM {c['gemm_bf16_TFLOPs']:.0f} TFLOP/s"
    )
    rows = [
        {
            "op": r["op"],
            "shape": r["shape"],
            "timing": r["timing"],
            "ms": f"{r['ms']:.4f}",
            "rate": f"{r['rate']:.0f} {r['unit']}",
            "of ceiling": f"{r['of_ceiling']:.1%}",
            "baseline": r["baseline"],
            "baseline ms": _fmt(r["baseline_ms"], ".4f"),
            "baseline/ours": _fmt(r["baseline/ours"], ".2f"),
            "rel diff": f"{r['rel_diff']:.1e}",
            "regs/spills/smem": format_resources(r["kernels"]),
            "target": r["target"],
        }
        for r in result["rows"]
    ]
    return "\n".join([head, format_table(rows)] + [f"note: {n}" for n in result["notes"]])
