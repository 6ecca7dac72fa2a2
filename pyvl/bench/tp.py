"""``pyvl bench tp``: tensor parallelism at a preset's size with random weights, TP=1 beside TP=N.

Rows, each with a figure per size and their ratio (TP=1 / TP=N: above 1 means TP=N is faster, or holds less):
  ttft       time to first token of one image of --tiles tiles + --prompt-tokens text tokens, a cold call
             (no prefix or image reuse): ViT, projector and prefill, through the engine
  decode     ms per token at batch 1 over --decode-tokens greedy steps after that prompt (CUDA graphs as
             captured at load, or eagerly on the CPU)
  weights    the most bytes of weights one rank holds, from the shard plan (pyvl.parallel.plan)
Medians of --repeat runs after one warm-up. TP=1 is pyvl.bench.presets.random_model with its own engine;
TP=N starts N-1 workers (pyvl.parallel.launch) that draw random weights for their shards, so no checkpoint is
written. Each size's model is freed before the next is built (V1-5 fits one H100/H200 at TP=1, not two copies).
On CUDA TP=N needs N visible GPUs; on the CPU the ranks are processes on gloo (the figures then say what the
collectives cost on this host, not what GPUs do).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import torch

from ..api import _resolve_dtype
from ..demo import ASSETS
from ..parallel import launch
from ..parallel.plan import ShardPlan
from ..parallel.spec import ShardSpec
from ..tokenizer import Tokenizer
from .e2e import _decode_ms, _first_token_and_decode, _kv_cache_gb, build_prompt
from .presets import chat_on, preset_config, preset_dict, random_model
from .report import Report

__all__ = ["run"]


def _log(message: str) -> None:
    print(f"[bench tp] {message}", file=sys.stderr, flush=True)


def _chat(
    preset: str, world: int, device: torch.device, dtype: torch.dtype, backend: str, kv_cache_gb: float
):
    """A cold-call chat object (no caches, batch 1) on random weights, on one process or ``world`` ranks."""
    options = dict(kv_cache_gb=kv_cache_gb, image_cache_gb=0, max_num_seqs=1, prefix_caching=False)
    if world == 1:
        return chat_on(random_model(preset_config(preset), device, dtype, backend), **options)
    spec = ShardSpec(device.type, str(dtype).removeprefix("torch."), backend, config=preset_dict(preset))
    cluster = launch.start(spec, world)
    return chat_on(cluster.model, cluster=cluster, **options)


def run(
    preset: str,
    world: int = 2,
    device: str | None = None,
    dtype: str | None = None,
    tiles: int = 13,
    prompt_tokens: int = 70,
    decode_tokens: int = 32,
    backend: str = "auto",
    repeat: int = 3,
    kv_cache_gb: float | None = None,
    report: Report | None = None,
) -> dict:
    """Measure TP=1 then TP=``world``; {"setup", "rows": [{key, figure, unit, tp1, tpN, ratio}], "notes"}."""
    if world < 2 or decode_tokens < 2 or repeat < 1 or tiles < 1 or prompt_tokens < 0:
        raise ValueError(
            "bench tp needs --tensor-parallel-size >= 2, --decode-tokens >= 2, --repeat >= 1 and --tiles >= 1"
        )
    cfg = preset_config(preset)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(
            f"bench tp --tensor-parallel-size {world} on CUDA needs {world} GPUs; "
            f"{torch.cuda.device_count()} visible"
        )
    dtype = _resolve_dtype(dtype, device, cfg.torch_dtype)
    ids = build_prompt(Tokenizer.from_folder(ASSETS), tiles, prompt_tokens, cfg.num_image_token)
    pixels = torch.randn(tiles, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    kv_cache_gb = kv_cache_gb or _kv_cache_gb(cfg, dtype, len(ids) + decode_tokens)
    sizes = (1, world)
    per_rank = {n: [ShardPlan.for_rank(cfg, r, n).nbytes(cfg, dtype) for r in range(n)] for n in sizes}
    report = report or Report()
    report.set(
        "setup",
        {
            "preset": preset,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
            "dtype": str(dtype).removeprefix("torch."),
            "backend": backend,
            "sizes": list(sizes),
            "weights_per_rank_GB": {f"tp{n}": [round(b / 1e9, 3) for b in per_rank[n]] for n in sizes},
            "prompt_tokens": len(ids),
            "tiles": tiles,
            "decode_tokens": decode_tokens,
            "repeat": repeat,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    )
    tp_n = f"tp{world}"
    rows = {
        "ttft": {
            "figure": f"time to first token, {tiles} tiles + {len(ids) - tiles * cfg.num_image_token} text tokens",
            "unit": "ms",
        },
        "decode": {"figure": "decode, batch 1", "unit": "ms/token"},
        "weights": {"figure": "weights, the largest rank", "unit": "GB"},
    }
    rows = {key: {"key": key, **row, "tp1": None, tp_n: None, "ratio": None} for key, row in rows.items()}

    def put(key: str, size: int, value: float) -> None:
        row = rows[key]
        row["tp1" if size == 1 else tp_n] = round(value, 3)
        if row["tp1"] and row[tp_n]:
            row["ratio"] = round(row["tp1"] / row[tp_n], 2)
        report.row(dict(row))

    for size in sizes:
        _log(f"TP={size}: building {preset} with random weights on {device} ({dtype})")
        try:
            chat = _chat(preset, size, device, dtype, backend, kv_cache_gb)
            try:
                _log(f"TP={size}: time to first token + {decode_tokens} decode steps")
                runs = _first_token_and_decode(chat, ids, pixels, decode_tokens, repeat)
                put("ttft", size, statistics.median(s.time_to_first_token_s for s in runs) * 1e3)
                put("decode", size, _decode_ms(runs))
            finally:
                chat.close()
                del chat
        except Exception as exc:  # the other size's figures still count
            report.note(f"TP={size} failed: {type(exc).__name__}: {str(exc)[:300]}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    put("weights", 1, max(per_rank[1]) / 1e9)
    put("weights", world, max(per_rank[world]) / 1e9)
    return report.done()
