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

Shapes (bf16): ViT attention 13 tiles x 25 heads x 1025 x 128 (6B) and x 16 heads x 64 (300M), q/k/v views of
one fused qkv output; prefill 3400 tokens, 48/8 and 16/8 heads; decode 48/8 heads over 3400 and 32768 cached
keys (and 16 rows x 3400); rms_norm / silu_mul / apply_rotary at the InternLM2-20B widths for 3400 tokens
(prefill) and 1 token (decode); pixel_shuffle of 13 tiles of InternViT-6B output.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

from ..errors import PyvlError
from ..kv_cache import BLOCK_SIZE
from ..ops import _TRITON_OPS, reference
from .resources import format_resources, launched_kernels
from .timing import format_table

__all__ = ["require_gpu", "median_ms", "graph_ms", "copy_gbps", "gemm_tflops", "l2_bytes", "rotation_copies",
           "paged_pool", "run", "format_result"]

BF16 = torch.bfloat16
DEVICE = "cuda"
VIT_TILES, VIT_SEQ, VIT_WIDTH = 13, 1025, 3200  # 13 tiles of 1 CLS + 32 x 32 patches; InternViT-6B width
VIT_HEADS = ((25, 128), (16, 64))  # (heads, head_dim): InternViT-6B, InternViT-300M
PROMPT = 3400  # 13 tiles x 256 image tokens + 72 text tokens
PREFILL_HEADS = ((48, 8), (16, 8))  # (query heads, KV heads): InternLM2-20B, InternLM2-1.8B
DECODE_LENGTHS = (3400, 32768)
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 6144, 16384, 48, 8, 128  # InternLM2-20B
TARGETS = {("vit_attention", "13x25x1025x128"): ">= 450 TFLOP/s",
           ("paged_decode_attention", "decode 48/8 x 3400 x 128"): ">= 1500 GB/s",
           ("paged_decode_attention", "decode 48/8 x 32768 x 128"): ">= 3000 GB/s"}  # issue 3


def median_ms(fn, rep_ms: int = 200) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def graph_ms(fn, rep_ms: int = 200) -> float:
    """Median of CUDA-graph replays of ``fn``: the GPU time without the host's launch cost."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def l2_bytes() -> int:
    """The device's L2 size (60 MB, an H200's, when torch does not report it)."""
    size = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    return size if isinstance(size, int) and size > 0 else 60 * 2**20


def rotation_copies(bytes_per_call: int, l2: int) -> int:
    """Distinct buffer copies one graph must walk so that together they exceed twice the L2 (at least 2)."""
    return max(2, math.ceil(2 * l2 / bytes_per_call))


def copy_gbps(nbytes: int = 1 << 30, rep_ms: int = 200) -> float:
    """Device copy bandwidth, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes // 2, device=DEVICE, dtype=BF16).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src), rep_ms) / 1e6


def gemm_tflops(n: int = 8192, rep_ms: int = 200) -> float:
    a, b = (torch.randn(n, n, device=DEVICE, dtype=BF16) for _ in range(2))
    return 2 * n ** 3 / median_ms(lambda: a @ b, rep_ms) / 1e9


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

    def __init__(self, ceilings: dict, rep_ms: int):
        self.ceilings, self.rep_ms = ceilings, rep_ms

    def row(self, op, shape, ours, base, base_name, amount, unit, graph=False, timing=None, calls=1) -> dict:
        """``calls``: how many kernel calls one ``ours()`` / ``base()`` makes; ms and rate are per call."""
        with launched_kernels() as kernels:
            first = ours()  # compiles; also the output compared below
        timer = graph_ms if graph else median_ms
        ms = timer(ours, self.rep_ms) / calls
        try:
            base_ms = timer(base, self.rep_ms) / calls
        except Exception as exc:  # e.g. a torch op that cannot be captured in a graph: keep our figure
            base_ms, base_name = None, f"{base_name} failed: {type(exc).__name__}"
        rate = amount / ms / (1e9 if unit == "TFLOP/s" else 1e6)
        ceiling = self.ceilings["gemm_bf16_TFLOPs"] if unit == "TFLOP/s" else self.ceilings["copy_GBps"]
        timing = timing or ("graph" if graph else "eager, L2 flushed")
        return {"op": op, "shape": shape, "timing": timing, "ms": round(ms, 4),
                "rate": round(rate, 1), "unit": unit, "of_ceiling": round(rate / ceiling, 3),
                "baseline": base_name, "baseline_ms": None if base_ms is None else round(base_ms, 4),
                "baseline/ours": None if base_ms is None else round(base_ms / ms, 2),
                "rel_diff": float(f"{_rel_diff(first, base()):.2e}"), "target": TARGETS.get((op, shape), ""),
                "kernels": kernels}


def _vit_attention(case: _Case) -> list[dict]:
    kernel, rows = _kernel("vit_attention"), []
    for h, d in VIT_HEADS:
        b, s = VIT_TILES, VIT_SEQ
        qkv = torch.randn(b, s, 3, h, d, device=DEVICE, dtype=BF16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, as the model passes
        rows.append(case.row("vit_attention", f"{b}x{h}x{s}x{d}", lambda: kernel(q, k, v),
                             lambda: F.scaled_dot_product_attention(q, k, v), "SDPA", 4 * b * h * s * s * d,
                             "TFLOP/s"))
    return rows


def paged_pool(batch: int, length: int, hkv: int, d: int, device=DEVICE, dtype=BF16):
    """A K/V pool [2, blocks, Hkv, BLOCK_SIZE, D] holding ``batch`` sequences of ``length`` keys through shuffled
    block tables int32 [batch, blocks per sequence], and those keys gathered contiguous [2, batch, Hkv, length, D]
    (what a non-paged cache would read)."""
    n_blocks = -(-length // BLOCK_SIZE)
    pool = torch.randn(2, batch * n_blocks + 8, hkv, BLOCK_SIZE, d, device=device, dtype=dtype)
    tables = torch.randperm(pool.shape[1] - 8, device=device)[:batch * n_blocks].view(batch, n_blocks).int()
    kv = pool[:, tables.long()].permute(0, 1, 3, 2, 4, 5).reshape(2, batch, hkv, -1, d)[:, :, :, :length]
    return pool, tables, kv.contiguous()


def _paged_prefill_attention(case: _Case) -> list[dict]:
    """A whole prompt through a shuffled block table, against SDPA causal on the same keys gathered."""
    kernel, rows, d = _kernel("paged_prefill_attention"), [], HEAD_DIM
    for hq, hkv in PREFILL_HEADS:
        pool, tables, kv = paged_pool(1, PROMPT, hkv, d)
        q = torch.randn(PROMPT, hq + 2 * hkv, d, device=DEVICE, dtype=BF16)[:, :hq]  # a view of fused qkv rows
        qt = q.transpose(0, 1)[None]  # (1, Hq, S, D)
        rows.append(case.row("paged_prefill_attention", f"prefill {hq}/{hkv} x {PROMPT} x {d}",
                             lambda: kernel(q, pool[0], pool[1], tables[0], PROMPT),
                             lambda: F.scaled_dot_product_attention(qt, kv[0], kv[1], is_causal=True,
                                                                    enable_gqa=True)[0].transpose(0, 1),
                             "SDPA gqa (gathered)", 4 * hq * d * PROMPT * (PROMPT + 1) // 2, "TFLOP/s"))
    return rows


def _paged_decode_attention(case: _Case) -> list[dict]:
    """The engine's decode over shuffled block tables, against SDPA on the same keys gathered contiguous."""
    kernel, rows, d, hq, hkv, l2 = _kernel("paged_decode_attention"), [], HEAD_DIM, HEADS, KV_HEADS, l2_bytes()
    for length in DECODE_LENGTHS:
        shape, nbytes = f"decode {hq}/{hkv} x {length} x {d}", 2 * hkv * length * d * 2 + 2 * hq * d * 2
        lens = torch.full((1,), length, dtype=torch.int32, device=DEVICE)  # device lengths: graph-capturable
        q = torch.randn(1, hq, d, device=DEVICE, dtype=BF16)
        copies = rotation_copies(nbytes, l2)
        pools = [paged_pool(1, length, hkv, d) for _ in range(copies)]
        outs = [torch.empty_like(q) for _ in range(copies)]
        ours = lambda c=pools[0], o=outs[0]: kernel(q, c[0][0], c[0][1], c[1], lens, out=o)  # noqa: E731
        base = lambda c=pools[0]: F.scaled_dot_product_attention(  # noqa: E731
            q[:, :, None], c[2][0], c[2][1], enable_gqa=True)[:, :, 0]
        rows.append(case.row("paged_decode_attention", shape, ours, base, "SDPA gqa (gathered)", nbytes, "GB/s"))
        rows.append(case.row("paged_decode_attention", shape, ours, base, "SDPA gqa (gathered)", nbytes, "GB/s",
                             graph=True, timing="graph, hot L2"))
        rows.append(case.row("paged_decode_attention", shape, lambda: [ours(c, o) for c, o in zip(pools, outs)],
                             lambda: [base(c) for c in pools], "SDPA gqa (gathered)", nbytes, "GB/s", graph=True,
                             timing=f"graph, {copies} K/V copies", calls=copies))
    batch, length = 16, DECODE_LENGTHS[0]  # a full decode batch
    pool, tables, kv = paged_pool(batch, length, hkv, d)
    lens = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, hq, d, device=DEVICE, dtype=BF16)
    rows.append(case.row("paged_decode_attention", f"decode {batch} x {hq}/{hkv} x {length} x {d}",
                         lambda: kernel(q, pool[0], pool[1], tables, lens),
                         lambda: F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], enable_gqa=True)[:, :, 0],
                         "SDPA gqa (gathered)", batch * (2 * hkv * length * d * 2 + 2 * hq * d * 2), "GB/s",
                         graph=True))
    return rows


def _rms_norm(case: _Case) -> list[dict]:
    from pyvl.kernels.rms_norm import add_rms_norm

    kernel, rows, c = _kernel("rms_norm"), [], HIDDEN
    w = torch.randn(c, device=DEVICE, dtype=BF16)
    for tokens in (PROMPT, 1):
        x, r = (torch.randn(tokens, c, device=DEVICE, dtype=BF16) for _ in range(2))
        rows.append(case.row("rms_norm", f"{tokens} x {c}", lambda: kernel(x, w, 1e-5),
                             lambda: reference.rms_norm(x, w, 1e-5), "reference", 2 * x.numel() * 2 + c * 2,
                             "GB/s", graph=tokens == 1))
        rows.append(case.row("rms_norm (+residual)", f"{tokens} x {c}", lambda: add_rms_norm(x, r, w, 1e-5),
                             lambda: (reference.rms_norm(x + r, w, 1e-5), x + r), "reference",
                             4 * x.numel() * 2 + c * 2, "GB/s", graph=tokens == 1))
    return rows


def _silu_mul(case: _Case) -> list[dict]:
    kernel, rows, width = _kernel("silu_mul"), [], FFN
    for tokens in (PROMPT, 1):
        gate, up = (torch.randn(tokens, width, device=DEVICE, dtype=BF16) for _ in range(2))
        rows.append(case.row("silu_mul", f"{tokens} x {width}", lambda: kernel(gate, up),
                             lambda: reference.silu_mul(gate, up), "reference", 3 * gate.numel() * 2, "GB/s",
                             graph=tokens == 1))
    return rows


def _apply_rotary(case: _Case) -> list[dict]:
    kernel, rows, hq, hkv, d = _kernel("apply_rotary"), [], HEADS, KV_HEADS, HEAD_DIM
    for tokens in (PROMPT, 1):
        qkv = torch.randn(1, tokens, (hq + 2 * hkv) * d, device=DEVICE, dtype=BF16)  # the wqkv output
        q = qkv[..., :hq * d].view(1, tokens, hq, d).transpose(1, 2)  # (1, Hq, S, D) view
        k = qkv[..., hq * d:(hq + hkv) * d].view(1, tokens, hkv, d).transpose(1, 2)
        cos, sin = (torch.randn(1, tokens, d, device=DEVICE) for _ in range(2))
        nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 4
        rows.append(case.row("apply_rotary", f"{tokens} x ({hq}+{hkv}) x {d}", lambda: kernel(q, k, cos, sin),
                             lambda: reference.apply_rotary(q, k, cos, sin), "reference", nbytes, "GB/s",
                             graph=tokens == 1))
    return rows


def _pixel_shuffle(case: _Case) -> list[dict]:
    kernel, n, c, g = _kernel("pixel_shuffle"), VIT_TILES, VIT_WIDTH, math.isqrt(VIT_SEQ - 1)
    vit = torch.randn(n, VIT_SEQ, c, device=DEVICE, dtype=BF16)
    grid = vit[:, 1:].reshape(n, g, g, c)  # (N, 32, 32, C) view past the CLS row, as shuffle_tokens passes
    return [case.row("pixel_shuffle", f"{n} x {g} x {g} x {c} v2", lambda: kernel(grid, 0.5, "v2"),
                     lambda: reference.pixel_shuffle(grid, 0.5, "v2"), "reference", 2 * grid.numel() * 2, "GB/s")]


CASES = {"vit_attention": _vit_attention, "paged_prefill_attention": _paged_prefill_attention,
         "paged_decode_attention": _paged_decode_attention, "rms_norm": _rms_norm,
         "silu_mul": _silu_mul, "apply_rotary": _apply_rotary, "pixel_shuffle": _pixel_shuffle}


def require_gpu(command: str) -> None:
    """PyvlError naming the missing device, before anything touches CUDA."""
    if not torch.cuda.is_available():
        raise PyvlError(f"bench {command} needs a CUDA GPU: it times the Triton kernels on the device "
                        "(torch.cuda.is_available() is False here)")
    from pyvl.kernels.vit_attention import _interpreting

    if _interpreting():
        raise PyvlError(f"bench {command}: TRITON_INTERPRET=1 is set; unset it to time the kernels on the GPU")


def run(ops=None, repeat_ms: int = 200) -> dict:
    """Time the registered kernels (all, or ``ops``); {"setup", "ceilings", "rows", "notes"}."""
    require_gpu("kernels")
    unknown = sorted(set(ops or ()) - set(_TRITON_OPS))
    if unknown:
        raise PyvlError(f"bench kernels: unknown ops {unknown}; registered kernels: {sorted(_TRITON_OPS)}")
    import triton

    ceilings = {"copy_GBps": round(copy_gbps(rep_ms=repeat_ms), 1),
                "gemm_bf16_TFLOPs": round(gemm_tflops(rep_ms=repeat_ms), 1)}
    case, rows, notes = _Case(ceilings, repeat_ms), [], []
    default = [op for op in CASES if op in _TRITON_OPS] + [op for op in _TRITON_OPS if op not in CASES]
    for op in ops or default:
        if op not in CASES:
            notes.append(f"{op}: registered kernel without a benchmark case in pyvl/bench/kernels.py")
            continue
        try:
            rows += CASES[op](case)
        except Exception as exc:  # one broken kernel should not hide the others' figures
            notes.append(f"{op}: {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()
    setup = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "l2_MB": round(l2_bytes() / 2**20, 1)}
    return {"setup": setup, "ceilings": ceilings, "rows": rows, "notes": notes}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_result(result: dict) -> str:
    s, c = result["setup"], result["ceilings"]
    head = (f"{s['device']}, torch {s['torch']}, triton {s['triton']}; ceilings measured now: copy "
            f"{c['copy_GBps']:.0f} GB/s (read + write), bf16 GEMM 8192^3 {c['gemm_bf16_TFLOPs']:.0f} TFLOP/s")
    rows = [{"op": r["op"], "shape": r["shape"], "timing": r["timing"], "ms": f"{r['ms']:.4f}",
             "rate": f"{r['rate']:.0f} {r['unit']}", "of ceiling": f"{r['of_ceiling']:.1%}",
             "baseline": r["baseline"], "baseline ms": _fmt(r["baseline_ms"], ".4f"),
             "baseline/ours": _fmt(r["baseline/ours"], ".2f"), "rel diff": f"{r['rel_diff']:.1e}",
             "regs/spills/smem": format_resources(r["kernels"]), "target": r["target"]} for r in result["rows"]]
    return "\n".join([head, format_table(rows)] + [f"note: {n}" for n in result["notes"]])
