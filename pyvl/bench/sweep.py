"""``pyvl bench sweep``: a handful of block configurations of ViT and decode attention, checked and timed (CUDA).

Each configuration is launched through the kernel's own launcher with its override arguments
(``vit_attention(config=...)``, ``paged_decode_attention(num_splits=..., config=...)``), compared with the
plain-torch oracle (pyvl.ops.reference on float32 inputs: rel err = ||ours - oracle|| / ||oracle||; NaN or
above 1e-2 is a FAIL), then timed; the launcher's default configuration is always among them, marked, and
every other row gives its time relative to it. A configuration that does not compile (e.g. too much shared
memory) becomes an error row. Each row also carries the launched kernels' registers / spills / shared memory.

    ViT attention   13 x 25 x 1025 x 128 bf16 (InternViT-6B, 13 tiles): BLOCK_M, BLOCK_N, num_warps, num_stages;
                    timed eagerly (do_bench, L2 flushed), TFLOP/s = 4 * B * H * S^2 * D / t
    decode          paged, 48/8 heads x 3400 and x 32768 keys x 128 bf16 (InternLM2-20B) in shuffled 64-token
                    blocks: num_splits, BLOCK_N (at most the block size), num_warps, num_stages; timed as
                    CUDA-graph replays walking over enough K/V pools to exceed twice the L2 (as in pyvl bench
                    kernels), GB/s of K and V read once

The shapes are pyvl.bench.kernels' REAL ones; ``--smoke`` runs the same sweep at its SMOKE shapes on the CPU
under TRITON_INTERPRET=1, timed by a perf_counter median (the code paths, not the speed). Each row goes to the
:class:`~pyvl.bench.report.Report` as soon as it is measured (the launcher's default first, so that every other
row's time relative to it is known then).
"""

from __future__ import annotations

import math

import torch

from ..ops import reference
from .kernels import Shapes, paged_pool, rig_for, rig_setup, rotation_copies
from .report import Report
from .resources import format_resources, launched_kernels
from .timing import format_table

__all__ = [
    "VIT_CONFIGS",
    "DECODE_CONFIGS",
    "vit_rows",
    "decode_rows",
    "vit_shape",
    "decode_shapes",
    "run",
    "format_result",
]

REL_BOUND = 1e-2  # bf16 kernels sit between 1e-3 and 1e-2 (tests/kernel_tolerances.py)
VIT_CONFIGS = (  # the default (added first when missing) plus neighbours in each direction
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
)
DECODE_CONFIGS = (  # num_splits None = the launcher's heuristic; BLOCK_N at most the 64-token KV block
    dict(num_splits=8, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(num_splits=16, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(num_splits=32, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(num_splits=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(num_splits=None, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(num_splits=None, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(num_splits=None, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(num_splits=None, BLOCK_N=64, num_warps=4, num_stages=2),
)


def _rel_err(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((ours.float() - oracle).norm() / oracle.norm())


def _with_default(default: dict, configs) -> list[dict]:
    return [default] + [dict(c) for c in configs if dict(c) != default]


def _describe(cfg: dict) -> str:
    short = {"num_splits": "splits", "num_warps": "warps", "num_stages": "stages"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in cfg.items())


def _row(
    op: str,
    shape: str,
    cfg: dict,
    is_default: bool,
    call,
    rel_err,
    timer,
    calls: int,
    amount: float,
    unit: str,
) -> dict:
    """Check one configuration (``call()`` -> the outputs of ``calls`` launches, ``rel_err(outputs)`` -> the
    worst relative error against the oracle), then time it with ``timer(call) -> ms`` (None: not timed)."""
    row = {
        "op": op,
        "shape": shape,
        "config": _describe(cfg),
        "params": cfg,
        "default": is_default,
        "status": "ok",
        "rel_err": None,
        "ms": None,
        "rate": None,
        "unit": unit,
        "vs_default": None,
        "kernels": [],
    }
    try:
        with launched_kernels() as kernels:
            outs = call()
        row["kernels"] = kernels
        rel = rel_err(outs)
        row["rel_err"] = None if math.isnan(rel) else float(f"{rel:.2e}")
        if not rel <= REL_BOUND:  # NaN fails too
            row["status"] = f"FAIL: rel err {rel:.2e} > {REL_BOUND:g}"
        elif timer is not None:
            ms = timer(call) / calls
            row["ms"] = round(ms, 4)
            row["rate"] = round(amount / ms / (1e9 if unit == "TFLOP/s" else 1e6), 1)
    except Exception as exc:  # a configuration that does not compile or launch: report it, try the next
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return row


def _measured(make_row, configs: list[dict], emit) -> list[dict]:
    """``make_row(cfg)`` for each configuration, the default first; each row gets its speed relative to the
    default's and goes to ``emit`` as soon as it is measured."""
    rows = []
    for cfg in configs:
        row = make_row(cfg)
        base = (rows[0] if rows else row)["ms"]
        if base and row["ms"]:
            row["vs_default"] = round(base / row["ms"], 3)  # > 1: faster than the default
        rows.append(row)
        emit(row)
    return rows


def _no_emit(row: dict) -> None:
    pass


def vit_rows(
    shape, configs=VIT_CONFIGS, device="cuda", dtype=torch.bfloat16, timer=None, emit=_no_emit
) -> list[dict]:
    """One row per configuration of vit_attention at ``shape`` (B, H, S, D), the default first."""
    from pyvl.kernels.vit_attention import default_config, vit_attention

    b, h, s, d = shape
    qkv = torch.randn(b, s, 3, h, d, device=device, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, as the ViT passes
    oracle = reference.vit_attention(q.float(), k.float(), v.float())
    default = default_config(d, dtype, s)
    out = torch.empty(b, h, s, d, device=device, dtype=dtype)

    def make_row(cfg: dict) -> dict:
        return _row(
            "vit_attention",
            "x".join(map(str, shape)),
            cfg,
            cfg == default,
            lambda: [vit_attention(q, k, v, out=out, config=cfg)],
            lambda outs: _rel_err(outs[0], oracle),
            timer,
            1,
            4 * b * h * s * s * d,
            "TFLOP/s",
        )

    return _measured(make_row, _with_default(default, configs), emit)


def decode_rows(
    shape,
    configs=DECODE_CONFIGS,
    device="cuda",
    dtype=torch.bfloat16,
    timer=None,
    copies: int = 1,
    emit=_no_emit,
) -> list[dict]:
    """One row per configuration of paged_decode_attention at ``shape`` (Hq, Hkv, keys, D), the default first;
    each call walks over ``copies`` distinct K/V pools (so that a graph of it reads them from HBM, not the L2)."""
    from pyvl.kernels.paged_attention import decode_config, decode_splits, paged_decode_attention

    hq, hkv, length, d = shape
    q = torch.randn(1, hq, d, device=device, dtype=dtype)
    pools = [paged_pool(1, length, hkv, d, device, dtype)[:2] for _ in range(copies)]
    lens = torch.full((1,), length, dtype=torch.int32, device=device)  # device lengths: graph-capturable
    oracles = [
        reference.paged_decode_attention(q.float(), p[0].float(), p[1].float(), t, lens) for p, t in pools
    ]
    outs = [torch.empty_like(q) for _ in pools]
    block_size, capacity = pools[0][0].shape[3], pools[0][1].shape[1] * pools[0][0].shape[3]
    blocks = decode_config(d, dtype)

    def resolve(cfg: dict) -> dict:  # the split count the launcher would pick, shown
        splits = cfg["num_splits"] or decode_splits(hkv, capacity, min(cfg["BLOCK_N"], block_size), q.device)
        return dict(cfg, num_splits=splits)

    default = resolve(dict(num_splits=None, **blocks))
    configs = [resolve({"num_splits": None, **blocks, **c}) for c in configs]

    def call(cfg):
        tuning = {k: v for k, v in cfg.items() if k != "num_splits"}
        return [
            paged_decode_attention(q, p[0], p[1], t, lens, out=o, num_splits=cfg["num_splits"], config=tuning)
            for (p, t), o in zip(pools, outs)
        ]

    rel_err = lambda got: max(_rel_err(o, r) for o, r in zip(got, oracles))  # noqa: E731

    def make_row(cfg: dict) -> dict:
        return _row(
            "paged_decode_attention",
            f"{hq}/{hkv} x {length} x {d}",
            cfg,
            cfg == default,
            lambda: call(cfg),
            rel_err,
            timer,
            copies,
            2 * hkv * length * d * 2 + 2 * hq * d * 2,
            "GB/s",
        )

    return _measured(make_row, _with_default(default, configs), emit)


def vit_shape(s: Shapes) -> tuple[int, int, int, int]:
    """(tiles, heads, S, head_dim) of the first ViT: 13 x 25 x 1025 x 128 at the REAL shapes."""
    heads, head_dim = s.vit_heads[0]
    return s.vit_tiles, heads, s.vit_seq, head_dim


def decode_shapes(s: Shapes) -> list[tuple[int, int, int, int]]:
    """(query heads, KV heads, cached keys, head_dim) per decode length: 48/8 x 3400 and x 32768 x 128 (REAL)."""
    return [(s.heads, s.kv_heads, length, s.head_dim) for length in s.decode_lengths]


def run(repeat_ms: int = 100, report: Report | None = None, smoke: bool = False) -> dict:
    """The whole sweep (on the GPU, or the smoke on the CPU) into ``report``; returns its result,
    {"setup", "rows", "notes"}."""
    report = report or Report()
    rig = rig_for("sweep", smoke, repeat_ms)
    report.set("setup", {**rig_setup(rig), "rel_bound": REL_BOUND})
    try:
        vit_rows(vit_shape(rig.shapes), device=rig.device, timer=rig.eager_ms, emit=report.row)
    except Exception as exc:  # the decode rows are still worth having
        report.note(f"vit_attention sweep: {type(exc).__name__}: {str(exc)[:300]}")
    torch.cuda.empty_cache()
    for hq, hkv, length, d in decode_shapes(rig.shapes):
        copies = rotation_copies(2 * hkv * length * d * 2, rig.l2_bytes)
        try:
            decode_rows(
                (hq, hkv, length, d), device=rig.device, timer=rig.graph_ms, copies=copies, emit=report.row
            )
        except Exception as exc:
            report.note(f"paged_decode_attention sweep x {length}: {type(exc).__name__}: {str(exc)[:300]}")
        torch.cuda.empty_cache()
    return report.done()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_result(result: dict) -> str:
    s = result["setup"]
    head = (
        f"{s['device']}, torch {s['torch']}, triton {s['triton']}, L2 {s['l2_MB']} MB; * = the launcher's "
        f"default; vs default > 1 is faster"
    )
    rows = [
        {
            "op": r["op"],
            "shape": r["shape"],
            "config": r["config"],
            "default": "*" if r["default"] else "",
            "status": r["status"],
            "rel err": _fmt(r["rel_err"], ".1e"),
            "ms": _fmt(r["ms"], ".4f"),
            "rate": "-" if r["rate"] is None else f"{r['rate']:.0f} {r['unit']}",
            "vs default": _fmt(r["vs_default"], ".2f"),
            "regs/spills/smem": format_resources(r["kernels"]),
        }
        for r in result["rows"]
    ]
    return "\n".join([head, format_table(rows)] + [f"note: {n}" for n in result["notes"]])
