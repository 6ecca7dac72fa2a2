"""``pyvl bench engine``: what the engine's reuse and batching buy, each as a ratio measured in one run.

  cached image     time to first token of a new question about an image already seen (its prefix and features
                   cached) vs the same question about a new image of the same size (9 tiles by default)
  turn 4           time to first token of the 4th turn of a text chat, with prefix reuse vs a model loaded with
                   prefix_caching=False (every turn prefills the whole history)
  8 streams        total decode tokens/s of 8 concurrent chat() calls vs the same 8 calls one after another
  graphs (CUDA)    decode ms/token with CUDA graphs vs eager, at batch 1, 4 and 16

Public API only: pyvl.load with the demo model (or --model), chat/stream with ``stats=``, threads. On the CPU
use the demo model; on CUDA pass a real folder (--model) for meaningful figures.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time

import torch

from ..engine.request import ChatStats
from ..image import load_image
from .preprocess import synthetic_photo

__all__ = ["run"]


def _load(path, **kwargs):
    import pyvl

    return pyvl.load(path, **kwargs)


def _ttft_ms(model, pixels, question: str, history=None) -> float:
    stats = ChatStats()
    model.chat(pixels, question, dict(max_new_tokens=1), history=history, stats=stats)
    return stats.time_to_first_token_s * 1e3


def _cached_image(path, device, tiles_photo: tuple[int, int], repeat: int) -> dict:
    model = _load(path, device=device)
    cold, warm = [], []
    for i in range(repeat + 1):  # each round: a never-seen photo, then a second question about it
        photo = load_image(synthetic_photo(*tiles_photo, seed=100 + i), max_num=12)
        c = _ttft_ms(model, photo, "Describe this image.")
        w = _ttft_ms(model, photo, "What colours do you see?")
        if i:  # round 0 warms up
            cold.append(c)
            warm.append(w)
    return {"tiles": photo.shape[0], "cold_ms": statistics.median(cold), "cached_ms": statistics.median(warm)}


def _turn4(path, device, repeat: int) -> dict:
    figures = {}
    for name, caching in (("reuse", True), ("no_reuse", False)):
        model = _load(path, device=device, prefix_caching=caching)
        times = []
        for i in range(repeat + 1):
            history = None
            for turn in range(4):
                question = f"Round {i}, turn {turn}: tell me one more thing about rivers."
                stats = ChatStats()
                answer, history = model.chat(None, question, dict(max_new_tokens=32), history=history,
                                             return_history=True, stats=stats)
            if i:
                times.append(stats.time_to_first_token_s * 1e3)
        figures[name] = statistics.median(times)
    return figures


def _streams(path, device, n: int, new_tokens: int) -> dict:
    model = _load(path, device=device, max_num_seqs=max(n, 1))
    gen = dict(max_new_tokens=new_tokens, eos_token_id=[model.config.llm.vocab_size])  # no such id: all tokens
    questions = [f"Story number {i}: once upon a time" for i in range(n)]
    model.chat(None, "warm up", dict(max_new_tokens=2))

    def tokens_per_s(run) -> float:
        stats = [ChatStats() for _ in questions]
        t0 = time.perf_counter()
        run(stats)
        return sum(s.new_tokens for s in stats) / (time.perf_counter() - t0)

    def serial(stats):
        for q, s in zip(questions, stats):
            model.chat(None, q, gen, stats=s)

    def concurrent(stats):
        threads = [threading.Thread(target=model.chat, args=(None, q, gen), kwargs={"stats": s})
                   for q, s in zip(questions, stats)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return {"serial_tok_s": tokens_per_s(serial), "concurrent_tok_s": tokens_per_s(concurrent)}


def _decode_ms(path, device, batch: int, cuda_graphs: bool, new_tokens: int) -> float:
    """Median decode ms/token of ``batch`` concurrent requests (CUDA graphs on or off)."""
    model = _load(path, device=device, cuda_graphs=cuda_graphs, max_num_seqs=max(batch, 1))
    gen = dict(max_new_tokens=new_tokens, eos_token_id=[model.config.llm.vocab_size])
    stats = [ChatStats() for _ in range(batch)]
    for run in range(2):  # run 0 captures the graphs and warms up
        threads = [threading.Thread(target=model.chat, args=(None, f"Tell story {i}.", gen), kwargs={"stats": s})
                   for i, s in enumerate(stats)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ms = statistics.median((s.total_s - s.time_to_first_token_s) * 1e3 / (s.new_tokens - 1) for s in stats)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def run(path, device: str | None = None, repeat: int = 3, photo: tuple[int, int] = (1920, 1080),
        streams: int = 8, new_tokens: int = 64) -> dict:
    """Every figure of the module doc; {"rows": [{figure, baseline, engine, ratio, baseline is}], "setup"}."""
    cached = _cached_image(path, device, photo, repeat)
    turn4 = _turn4(path, device, repeat)
    batch = _streams(path, device, streams, new_tokens)
    rows = [
        {"figure": f"time to first token, new question on a cached {cached['tiles']}-tile image (ms)",
         "baseline": round(cached["cold_ms"], 2), "engine": round(cached["cached_ms"], 2),
         "ratio": round(cached["cold_ms"] / cached["cached_ms"], 1), "baseline is": "a new image"},
        {"figure": "time to first token, turn 4 of a chat (ms)", "baseline": round(turn4["no_reuse"], 2),
         "engine": round(turn4["reuse"], 2), "ratio": round(turn4["no_reuse"] / turn4["reuse"], 1),
         "baseline is": "prefix_caching=False"},
        {"figure": f"decode tokens/s, {streams} concurrent chats", "baseline": round(batch["serial_tok_s"], 1),
         "engine": round(batch["concurrent_tok_s"], 1),
         "ratio": round(batch["concurrent_tok_s"] / batch["serial_tok_s"], 1), "baseline is": "one at a time"},
    ]
    on_cuda = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    for b in (1, 4, 16) if on_cuda else ():
        eager, graphs = (_decode_ms(path, device, b, g, new_tokens) for g in (False, True))
        rows.append({"figure": f"decode ms/token at batch {b}", "baseline": round(eager, 3),
                     "engine": round(graphs, 3), "ratio": round(eager / graphs, 2), "baseline is": "eager"})
    return {"setup": {"model": str(path), "device": device or "auto", "repeat": repeat, "photo": list(photo),
                      "new_tokens": new_tokens, "host_cpus": os.cpu_count()}, "rows": rows}
