"""``pyvl bench engine``: what the engine's reuse and batching buy, each as a ratio measured in one run.

  cached_followup  time to first token of a new question about an image already seen (its prefix and features
                   cached) vs the same question about a new image of the same size (a 4:3 photo: 12 tiles + a
                   thumbnail); both get the tiles as a tensor, as ``pyvl.load_image`` returns them
  followup: KIND   (pyvl.bench.followup) a follow-up on a cached photo vs on a cached one-tile image, the
                   image given as a PNG / JPEG path, their bytes, a PIL image or a tiles tensor: "extra ms" is
                   what the large image still costs once cached
  host_bN          host work of a decode step per row (µs), at batch N = 1, 8, 16, against the 50 µs goal
  turn2            time to first token of turn 2 of a chat about that image, with prefix reuse vs an engine with
                   prefix_caching=False (which prefills the whole history again)
  streams_N        total decode tokens/s of N concurrent chat() calls (N = 8, 16) vs the same calls one at a time
  decode_long      decode ms/token with the whole context filled (max_position_embeddings) vs a short prompt
Every ratio is "how many times better the engine side is": baseline / engine for times, engine / baseline for
rates (decode_long's is below 1: a full context decodes slower).
  decode_bN        (CUDA) decode ms/token at batch N = 1, 4, 16 with the CUDA graphs captured at load vs eager

The model is a folder (``--model``, default the demo model) or a preset's exact size with random weights
(``--preset NAME --random-weights``, pyvl.bench.presets: no checkpoint needed). It is built once; each figure
gets an engine of its own on those weights (its own KV pool of ``kv_cache_gb``, caches and settings), freed
before the next. Rows are streamed as they are measured (``--jsonl``), the most telling first.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time

import torch

from ..chat import InternVLChat
from ..engine.engine import Engine, EngineConfig
from ..engine.request import ChatStats
from ..image import load_image
from .followup import followup_rows
from .preprocess import synthetic_photo
from .presets import chat_on, preset_config, random_model
from .report import Report

__all__ = ["run"]

PHOTO = (4032, 3024)  # a 12 MP photo, 4:3 -> a 4 x 3 grid + thumbnail = 13 tiles at max_num 12
STREAMS = (8, 16)
BATCHES = (1, 4, 16)


def _log(message: str) -> None:
    print(f"[bench engine] {message}", file=sys.stderr, flush=True)


def variant(base: InternVLChat, **engine_options) -> InternVLChat:
    """``base``'s weights, tokenizer and prompt rules with a new engine (EngineConfig.for_model's options)."""
    config = EngineConfig.for_model(base.model, base.max_context, **engine_options)
    engine = Engine(base.model, config, salt="pyvl bench engine", bos_id=base.tokenizer.bos_id)
    return InternVLChat(
        base.model, base.tokenizer, base.config, base.folder, base.max_context, base.stop_ids, engine
    )


def _close(chat: InternVLChat) -> None:
    """Stop the engine and give its KV pool back before the next one is allocated."""
    chat.engine.shutdown()
    del chat
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ttft_ms(chat, pixels, question: str, history=None) -> float:
    stats = ChatStats()
    chat.chat(pixels, question, dict(max_new_tokens=1), history=history, stats=stats)
    return stats.time_to_first_token_s * 1e3


def _photo_tiles(round_: int, size: tuple[int, int]) -> torch.Tensor:
    return load_image(synthetic_photo(*size, seed=100 + round_), max_num=12)


def _cached_followup(chat, repeat: int, photo: tuple[int, int]) -> tuple[float, float, int]:
    """(cold ms, cached ms, tiles): each round a never-seen photo, then a second question about it."""
    cold, warm = [], []
    for i in range(repeat + 1):
        tiles = _photo_tiles(i, photo)
        c = _ttft_ms(chat, tiles, "Describe this image.")
        w = _ttft_ms(chat, tiles, "What colours do you see?")
        if i:  # round 0 warms up
            cold.append(c)
            warm.append(w)
    return statistics.median(cold), statistics.median(warm), tiles.shape[0]


def _turn2_ms(chat, repeat: int, photo: tuple[int, int]) -> float:
    times = []
    for i in range(repeat + 1):
        tiles = _photo_tiles(50 + i, photo)
        _, history = chat.chat(tiles, "Describe this image.", dict(max_new_tokens=32), return_history=True)
        if i:
            times.append(_ttft_ms(chat, tiles, "Now count the objects in it.", history=history))
    return statistics.median(times)


def _story_questions(n: int) -> list[str]:
    return [f"Story number {i}: once upon a time" for i in range(n)]


def _tokens_per_s(chat, questions: list[str], new_tokens: int, together: bool) -> float:
    """Total decode tokens/s of ``questions`` (``new_tokens`` each): all at once, from a thread each, or one
    after another."""
    gen = dict(max_new_tokens=new_tokens, eos_token_id=[chat.config.llm.vocab_size])  # no such id: all tokens
    stats = [ChatStats() for _ in questions]
    calls = [lambda q=q, s=s: chat.chat(None, q, gen, stats=s) for q, s in zip(questions, stats)]
    t0 = time.perf_counter()
    if together:
        threads = [threading.Thread(target=call) for call in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for call in calls:
            call()
    return sum(s.new_tokens for s in stats) / (time.perf_counter() - t0)


def _decode_ms(chat, batch: int, new_tokens: int, prompt: list[int] | None = None) -> float:
    """Median decode ms/token of ``batch`` concurrent requests (after one warm-up round), each of ``prompt`` ids
    (default: a short question)."""
    gen = dict(max_new_tokens=new_tokens, eos_token_id=[chat.config.llm.vocab_size])
    stats = [ChatStats() for _ in range(batch)]

    def one(i: int, s: ChatStats) -> None:
        if prompt is None:
            chat.chat(None, f"Tell story {i}.", gen, stats=s)
        else:
            chat.generate(prompt, None, gen, stats=s)

    for _ in range(2):  # round 0 warms up
        threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(stats)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return statistics.median((s.total_s - s.time_to_first_token_s) * 1e3 / (s.new_tokens - 1) for s in stats)


def _base(model_path, preset: str | None, device, dtype) -> InternVLChat:
    """The weights every figure shares, with a small engine of their own that no figure uses."""
    if preset is not None:
        from ..api import _resolve_dtype

        cfg = preset_config(preset)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = random_model(cfg, device, _resolve_dtype(dtype, device, cfg.torch_dtype))
        return chat_on(model, kv_cache_gb=0.05, max_num_seqs=1, cuda_graphs=False)
    import pyvl

    return pyvl.load(
        model_path, device=device, dtype=dtype, kv_cache_gb=0.05, max_num_seqs=1, cuda_graphs=False
    )


class _Rows:
    """Rows by key, each emitted as soon as one side of it is measured and again when the other completes it."""

    def __init__(self, report: Report):
        self.report = report
        self.rows: dict[str, dict] = {}

    def put(
        self,
        key: str,
        figure: str,
        baseline_is: str,
        baseline: float | None = None,
        engine: float | None = None,
        higher_is_better: bool = False,
        extra_ms: float | None = None,
    ) -> None:
        row = self.rows.setdefault(
            key,
            {
                "key": key,
                "figure": figure,
                "baseline": None,
                "engine": None,
                "ratio": None,
                "baseline is": baseline_is,
                "extra ms": None,
            },
        )
        if extra_ms is not None:
            row["extra ms"] = round(extra_ms, 2)
        if baseline is not None:
            row["baseline"] = round(baseline, 3)
        if engine is not None:
            row["engine"] = round(engine, 3)
        if row["baseline"] and row["engine"]:
            ratio = row["engine"] / row["baseline"] if higher_is_better else row["baseline"] / row["engine"]
            row["ratio"] = round(ratio, 2)
        self.report.row(dict(row))

    def attempt(self, key: str, measure) -> bool:
        """Run one figure's measurement; a failure becomes a note (the other figures go on)."""
        try:
            measure()
            return True
        except Exception as exc:
            self.report.note(f"{key} failed: {type(exc).__name__}: {str(exc)[:300]}")
            return False


def _main_engine_figures(
    rows: _Rows, chat, on_cuda: bool, repeat: int, photo, new_tokens: int, long_context: int | None
) -> None:
    """Every figure of an engine with graphs, prefix caching and 16 rows: the engine side of each row."""

    def cached_followup():
        cold, cached, tiles = _cached_followup(chat, repeat, photo)
        rows.put(
            "cached_followup",
            f"time to first token, new question on a cached {tiles}-tile image (ms)",
            "a new image",
            cold,
            cached,
        )

    def followups():
        for r in followup_rows(chat, repeat, large=photo):
            rows.put(
                f"followup: {r['kind']}",
                f"follow-up TTFT on a cached image: {r['tiles']} tiles vs 1 (ms), given as {r['kind']}"
                + (f" (np.asarray of it: {r['asarray_ms']:.1f} ms)" if "asarray_ms" in r else ""),
                "a 1-tile image",
                r["small_ms"],
                r["large_ms"],
                extra_ms=r["extra_ms"],
            )

    def streams():
        _tokens_per_s(chat, _story_questions(2), 2, together=True)  # warm-up
        timing = chat.engine.timing
        timing.reset()
        serial = _tokens_per_s(chat, _story_questions(max(STREAMS)), new_tokens, together=False)
        host = {1: timing.host_us_per_row}
        for n in STREAMS:
            timing.reset()
            together = _tokens_per_s(chat, _story_questions(n), new_tokens, together=True)
            rows.put(
                f"streams_{n}",
                f"decode tokens/s, {n} concurrent chats",
                "the same chats one at a time",
                serial,
                together,
                higher_is_better=True,
            )
            host[n] = timing.host_us_per_row
        for n, us in host.items():
            rows.put(
                f"host_b{n}",
                f"host work per row of a decode step at batch {n} (µs)",
                "the 50 µs goal",
                50.0,
                us,
            )

    def decode_long():
        context = long_context or chat.config.llm.max_position_embeddings
        rows.put(
            "decode_long",
            f"decode ms/token, batch 1, {context} tokens in the context",
            "a short prompt",
            _decode_ms(chat, 1, new_tokens),
            _decode_ms(chat, 1, new_tokens, _long_prompt(context, new_tokens)),
        )

    _log("cached image follow-up")
    rows.attempt("cached_followup", cached_followup)
    _log("follow-ups on cached images, by input kind")
    rows.attempt("followups", followups)
    _log("concurrent streams")
    rows.attempt("streams", streams)
    _log("turn 2 of an image chat")
    rows.attempt(
        "turn2",
        lambda: rows.put(
            "turn2",
            "time to first token, turn 2 of a chat about the image (ms)",
            "prefix_caching=False",
            engine=_turn2_ms(chat, repeat, photo),
        ),
    )
    _log("decode with the whole context filled")
    rows.attempt("decode_long", decode_long)
    for b in BATCHES if on_cuda else ():
        _log(f"decode at batch {b} with CUDA graphs")
        rows.attempt(
            f"decode_b{b}",
            lambda b=b: rows.put(
                f"decode_b{b}",
                f"decode ms/token at batch {b}",
                "eager",
                engine=_decode_ms(chat, b, new_tokens),
            ),
        )


def run(
    model_path=None,
    preset: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    repeat: int = 3,
    photo: tuple[int, int] = PHOTO,
    new_tokens: int = 64,
    kv_cache_gb: float = 8.0,
    long_context: int | None = None,
    report: Report | None = None,
) -> dict:
    """Every figure of the module doc; {"setup", "rows": [{key, figure, baseline, engine, ratio, baseline is}],
    "notes"}, filled into ``report`` (pyvl.bench.report: which can stream each piece as a JSON line) as it is measured.
    long_context: the context decode_long fills (default: max_position_embeddings)."""
    if repeat < 1 or new_tokens < 2 or not kv_cache_gb > 0:
        raise ValueError("bench engine needs --repeat >= 1, at least 2 new tokens and a positive KV pool")
    report = report or Report()
    _log("building the model")
    base = _base(model_path, preset, device, dtype)
    on_cuda = base.device.type == "cuda"
    setup = {
        "model": preset or str(model_path),
        "random_weights": preset is not None,
        "device": torch.cuda.get_device_name(base.device) if on_cuda else "cpu",
        "dtype": str(base.dtype).removeprefix("torch."),
        "ops": dict(base.model.ops.backends),
        "repeat": repeat,
        "photo": list(photo),
        "new_tokens": new_tokens,
        "kv_cache_gb": kv_cache_gb,
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    report.set("setup", setup)
    rows = _Rows(report)
    chat = variant(base, kv_cache_gb=kv_cache_gb, max_num_seqs=max(STREAMS))
    setup["graphs"] = chat.engine.runner.graphs.as_dict()
    report.set("setup", setup)
    _main_engine_figures(rows, chat, on_cuda, repeat, photo, new_tokens, long_context)
    _close(chat)
    if "turn2" in rows.rows:  # the baseline: an engine that prefills the whole history again
        _log("turn 2 without prefix caching")
        chat = variant(base, kv_cache_gb=kv_cache_gb, max_num_seqs=1, prefix_caching=False, cuda_graphs=False)
        rows.attempt("turn2", lambda: rows.put("turn2", "", "", baseline=_turn2_ms(chat, repeat, photo)))
        _close(chat)
    if on_cuda:
        chat = variant(base, kv_cache_gb=kv_cache_gb, max_num_seqs=max(BATCHES), cuda_graphs=False)
        for b in BATCHES:
            _log(f"decode at batch {b}, eager")
            rows.attempt(
                f"decode_b{b}",
                lambda b=b: rows.put(f"decode_b{b}", "", "", baseline=_decode_ms(chat, b, new_tokens)),
            )
        _close(chat)
    _close(base)
    return report.done()


def _long_prompt(context: int, new_tokens: int) -> list[int]:
    """Ids that fill the context but the room for the answer (word ids of the demo vocabulary, under 1000)."""
    n = context - new_tokens - 1
    return [1] + [100 + (i * 37) % 800 for i in range(n - 1)]
