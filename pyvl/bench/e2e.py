"""``pyvl bench e2e``: pixels to tokens at a preset's real size with random weights, next to HF transformers.

Figures (medians of ``repeat`` runs after one warm-up; on CUDA every timed region starts and ends with a
``torch.cuda.synchronize()``):
  preprocess     pyvl.load_image of a synthetic 3840x2160 photo on the CPU (max_num 12: 8 tiles + thumbnail)
  vision         tiles [T, 3, 448, 448] -> image embeddings [T, 256, H] (ViT + pixel shuffle + mlp1), per --tiles
  prefill        the LLM over the whole prompt of the largest tile count (T * 256 image + --prompt-tokens text
                 tokens: ~3,400 for 13 tiles), into the engine's KV pool
  ttft           token ids + pixel values on the device -> first greedy token, through the engine (a cold call:
                 no prefix or image reuse), and where that time went (ChatStats: host work before the engine,
                 which includes digesting the tiles on the host; ViT; prefill chunks; sampling; the rest)
  decode         ms per token at batch 1 over --decode-tokens greedy steps after that prompt, stop tokens
                 disabled: with the CUDA graphs the engine captured at load, and (CUDA) eagerly, in one run
  graph capture  (CUDA) seconds to capture the decode graphs at load, and which batch buckets have one
  peak memory    torch.cuda.max_memory_allocated from the weights' allocation on (CUDA), or the process' peak
                 RSS, with the weights and the KV pool (--kv-cache-gb; default: just the prompt and its answer)

The model is built from the preset's dimensions directly on the device (pyvl.bench.presets.random_model); the
tokenizer is the demo one (1009 tokens), so the prompt holds only ids < 1009 and the tokenizer's <IMG_CONTEXT>.
HF transformers (when importable, on CUDA) runs its figures with its native InternVLForConditionalGeneration of
the same size (pyvl.bench.e2e_hf) after pyvl's model is freed. ``hf_only=True`` (``--hf-only``) runs HF's
figures alone, so a time-boxed device run can time pyvl first and HF in a later process only if time is left.

Rows are streamed as they are measured (``--jsonl``, pyvl.bench.report): a row is emitted when either system's
figure of it is, and again when the other's completes it. At the end every row exists, with "pyvl", "hf" and
"hf/pyvl" (None where not measured); a stage that raises (an out-of-memory prefill, say) leaves its figure None
with a note saying why, while the other stages still run.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

import torch

from .. import checks, template
from ..api import _resolve_dtype
from ..config import ModelConfig
from ..demo import ASSETS
from ..engine.request import ChatStats
from ..generation_config import GenerationConfig
from ..image import load_image
from ..kv_cache import BLOCK_SIZE, PagedBatch
from ..tokenizer import Tokenizer
from .e2e_hf import hf_figures, hf_unavailable
from .preprocess import pillow_pipeline, synthetic_photo
from .presets import chat_on, parameter_count, preset_config, random_model
from .report import Report
from .timing import device_median_ms, median_seconds, peak_memory_gb

__all__ = ["run", "build_prompt"]

PHOTO = (3840, 2160)
TTFT_STAGES = (
    ("ttft_preprocess", "preprocess_s", "host work before the engine (checks, prompt, tile digests)"),
    ("ttft_vision", "vision_s", "ViT + projector"),
    ("ttft_prefill", "prefill_s", "prefill"),
    ("ttft_sample", "sample_s", "sampling the first token"),
)


def _log(message: str) -> None:
    print(f"[bench e2e] {message}", file=sys.stderr, flush=True)


def build_prompt(tokenizer: Tokenizer, num_tiles: int, text_tokens: int, num_image_token: int) -> list[int]:
    """Chat-template ids of one image of ``num_tiles`` tiles plus filler words, ``text_tokens`` ids besides the
    <IMG_CONTEXT> run (or the template's minimum, if that is more)."""

    def encode(words: int) -> list[int]:
        question = template.IMAGE_PLACEHOLDER + "\n" + " ".join(["the"] * words)
        return tokenizer.encode(
            template.build_query(question, num_patches_list=[num_tiles], num_image_token=num_image_token)
        )

    image_tokens = num_tiles * num_image_token
    words = max(0, text_tokens - (len(encode(0)) - image_tokens))
    ids = encode(words)
    while words > 0 and len(ids) - image_tokens > text_tokens:  # a filler word may cost more than one id
        words -= 1
        ids = encode(words)
    return ids


class _Table:
    """The result's rows by key; each system's figure is put in as it is measured and its row emitted at once."""

    def __init__(self, report: Report, figures: list[tuple[str, str, str]]):
        self.report = report
        self.rows = {
            key: {"key": key, "figure": figure, "unit": unit, "pyvl": None, "hf": None, "hf/pyvl": None}
            for key, figure, unit in figures
        }
        self.emitted: set[str] = set()

    def put(self, system: str, key: str, value: float | None, figure: str | None = None) -> None:
        """Set one system's figure of a row (and, if given, the row's description), and emit the row."""
        row = self.rows[key]
        if figure is not None:
            row["figure"] = figure
        row[system] = None if value is None else round(value, 3)
        mine, theirs = row["pyvl"], row["hf"]
        row["hf/pyvl"] = round(theirs / mine, 2) if mine and theirs is not None else None
        self.report.row(dict(row))
        self.emitted.add(key)

    def attempt(self, system: str, what: str, fn):
        """fn(), or None with a note saying why it failed."""
        try:
            return fn()
        except Exception as exc:  # keep the other stages' figures: one device run must bring back all it can
            self.report.note(f"{system} {what} failed: {type(exc).__name__}: {str(exc)[:300]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None

    def measure(self, system: str, key: str, fn) -> None:
        """Put fn()'s figure, or note why it failed (the figure then stays None; the other stages go on)."""
        value = self.attempt(system, key, fn)
        if value is not None:
            self.put(system, key, value)

    def finish(self) -> None:
        """Emit the rows no system measured, so the table always has every row."""
        for key, row in self.rows.items():
            if key not in self.emitted:
                self.report.row(dict(row))


def _figures(
    device: torch.device,
    tiles: list[int],
    ids: list[int],
    n_text: int,
    n_tiles_photo: int,
    decode_tokens: int,
) -> list[tuple[str, str, str]]:
    cuda = device.type == "cuda"
    figures = [("preprocess", f"preprocess {PHOTO[0]}x{PHOTO[1]} -> {n_tiles_photo} tiles (CPU)", "ms")]
    figures += [(f"vision_{t}", f"vision + projector, {t} tile{'s' * (t > 1)}", "ms") for t in tiles]
    figures += [
        ("prefill", f"LLM prefill, {len(ids)} tokens", "ms"),
        (
            "ttft",
            f"time to first token, {tiles[-1]} tile{'s' * (tiles[-1] > 1)} + {n_text} text tokens",
            "ms",
        ),
    ]
    figures += [(key, f"  of which {what}", "ms") for key, _, what in TTFT_STAGES]
    figures += [
        ("ttft_other", "  of which the rest (queue, host work between the stages)", "ms"),
        (
            "decode",
            f"decode, batch 1, {decode_tokens} new tokens ({'CUDA graphs' if cuda else 'eager'})",
            "ms/token",
        ),
    ]
    if cuda:
        figures += [
            ("decode_eager", "decode, batch 1, eager (cuda_graphs=False)", "ms/token"),
            ("graph_capture", "CUDA-graph capture at load", "s"),
        ]
    figures += [
        ("peak_memory", "peak GPU memory" if cuda else "peak RSS of the process", "GB"),
        ("weights", "weights", "GB"),
        ("kv_pool", "KV pool", "GB"),
    ]
    return figures


def _kv_cache_gb(cfg: ModelConfig, dtype: torch.dtype, tokens: int) -> float:
    """A pool of just ``tokens`` tokens (plus one block of slack)."""
    llm = cfg.llm
    per_block = checks.kv_cache_bytes(
        llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, BLOCK_SIZE, 1, dtype
    )
    return (-(-tokens // BLOCK_SIZE) + 1) * per_block / 1e9


def _first_token_and_decode(chat, ids, pixels, decode_tokens: int, repeat: int) -> list[ChatStats]:
    """Stats of ``repeat`` cold calls (after a warm-up) of ids + pixels, ``decode_tokens`` greedy tokens each."""
    gen = GenerationConfig(
        max_new_tokens=decode_tokens, eos_token_id=(chat.config.llm.vocab_size,)
    )  # no such id
    runs = []
    for run in range(repeat + 1):
        stats = ChatStats()
        chat.generate(ids, pixels, gen, stats=stats)  # returns once the tokens are on the host
        if run:  # run 0 is the warm-up
            runs.append(stats)
    return runs


def _decode_ms(runs: list[ChatStats]) -> float:
    return statistics.median((s.total_s - s.time_to_first_token_s) * 1e3 / (s.new_tokens - 1) for s in runs)


def _put_ttft(table: _Table, runs: list[ChatStats]) -> None:
    median = lambda field: statistics.median(getattr(s, field) for s in runs) * 1e3  # noqa: E731
    chunks = runs[0].prefill_chunks
    table.put("pyvl", "ttft", median("time_to_first_token_s"))
    for key, field, what in TTFT_STAGES:
        more = f" ({chunks} chunk{'s' * (chunks > 1)})" if key == "ttft_prefill" else ""
        table.put("pyvl", key, median(field), figure=f"  of which {what}{more}")
    table.put(
        "pyvl",
        "ttft_other",
        statistics.median(
            s.time_to_first_token_s - sum(getattr(s, field) for _, field, _ in TTFT_STAGES) for s in runs
        )
        * 1e3,
    )


@torch.inference_mode()
def _pyvl_figures(
    table: _Table,
    setup: dict,
    cfg: ModelConfig,
    device,
    dtype,
    backend,
    tiles,
    ids,
    img_id,
    decode_tokens,
    repeat,
    kv_cache_gb: float,
) -> None:
    """pyvl's figures into ``table``; ``setup`` gains what the run used (ops, graphs, KV pool) once it is built."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _log(f"building pyvl's model on {device} ({dtype}, backend {backend})")
    model = random_model(cfg, device, dtype, backend)
    # Every timed run is a cold one: no prefix or image-feature reuse between the repeats.
    options = dict(kv_cache_gb=kv_cache_gb, image_cache_gb=0, max_num_seqs=1, prefix_caching=False)
    chat = chat_on(model, **options)
    graphs = chat.engine.runner.graphs
    setup.update(
        ops=dict(model.ops.backends),
        graphs=graphs.as_dict(),
        kv_pool_GB=round(chat.engine.cache.nbytes / 1e9, 3),
    )
    table.report.set("setup", setup)  # now: a run killed later still says which ops it ran
    if device.type == "cuda":
        table.put(
            "pyvl",
            "graph_capture",
            graphs.capture_s,
            figure=f"CUDA-graph capture at load, buckets {graphs.captured}"
            + (f" (eager: {graphs.eager_reason})" if graphs.eager_reason else ""),
        )
    pixels = torch.randn(
        max(tiles), 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)
    ).to(device, dtype)
    for t in tiles:
        _log(f"pyvl: vision + projector, {t} tiles")
        table.measure(
            "pyvl",
            f"vision_{t}",
            lambda: device_median_ms(lambda: chat.extract_feature(pixels[:t]), device, repeat),
        )

    def prefill() -> float:
        prompt = torch.tensor(ids, device=device)
        embeds = model.embed(prompt[None], model.extract_feature(pixels), img_id)
        positions = torch.arange(len(ids), device=device)[None]
        batch = PagedBatch.contiguous_prefill(
            chat.engine.cache, len(ids)
        )  # the pool's first blocks: it is idle
        return device_median_ms(lambda: model.language_model(embeds, positions, batch), device, repeat)

    _log(f"pyvl: prefill, {len(ids)} tokens")
    table.measure("pyvl", "prefill", prefill)
    _log(f"pyvl: time to first token + {decode_tokens} decode steps")
    runs = table.attempt(
        "pyvl", "ttft+decode", lambda: _first_token_and_decode(chat, ids, pixels, decode_tokens, repeat)
    )
    if runs:
        _put_ttft(table, runs)
        table.put("pyvl", "decode", _decode_ms(runs))
    table.put(
        "pyvl",
        "peak_memory",
        peak_memory_gb(device),
        figure=f"{table.rows['peak_memory']['figure']} (weights and KV pool below)",
    )
    table.put("pyvl", "weights", sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9)
    table.put("pyvl", "kv_pool", chat.engine.cache.nbytes / 1e9)
    if device.type == "cuda":
        chat.engine.shutdown()
        del chat
        gc.collect()
        torch.cuda.empty_cache()
        _log("pyvl: decode without CUDA graphs")
        eager = chat_on(model, **options, cuda_graphs=False)
        table.measure(
            "pyvl",
            "decode_eager",
            lambda: _decode_ms(_first_token_and_decode(eager, ids, pixels, decode_tokens, repeat)),
        )
        eager.engine.shutdown()


def run(
    preset: str,
    device: str | None = None,
    dtype: str | None = None,
    tiles=(1, 7, 13),
    prompt_tokens: int = 70,
    decode_tokens: int = 32,
    backend: str = "auto",
    repeat: int = 3,
    compare_hf: bool = True,
    hf_only: bool = False,
    kv_cache_gb: float | None = None,
    report: Report | None = None,
) -> dict:
    """Run the benchmark; {"setup": {...}, "rows": [{key, figure, unit, pyvl, hf, hf/pyvl}], "notes": [...]},
    filled into ``report`` (pyvl.bench.report: which can stream each piece as a JSON line) as it is measured."""
    if decode_tokens < 2 or repeat < 1 or prompt_tokens < 0 or not tiles or min(tiles) < 1:
        raise ValueError(
            "bench e2e needs --decode-tokens >= 2, --repeat >= 1, --prompt-tokens >= 0 and tile counts >= 1"
        )
    if hf_only and not compare_hf:
        raise ValueError("bench e2e: --hf-only and --no-hf exclude each other")
    if kv_cache_gb is not None and not kv_cache_gb > 0:
        raise ValueError(f"bench e2e --kv-cache-gb must be positive, got {kv_cache_gb}")
    cfg = preset_config(preset)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():  # before minutes of CPU preprocessing
        raise ValueError(
            f"bench e2e --device {device} needs a CUDA GPU (torch.cuda.is_available() is False here)"
        )
    dtype = _resolve_dtype(dtype, device, cfg.torch_dtype)
    tiles = sorted(set(int(t) for t in tiles))
    tokenizer = Tokenizer.from_folder(ASSETS)
    img_id = tokenizer.img_context_id
    ids = build_prompt(tokenizer, tiles[-1], prompt_tokens, cfg.num_image_token)
    skip = hf_unavailable(device) if compare_hf else None
    if skip and hf_only:
        raise ValueError(f"bench e2e --hf-only: {skip}")
    with_hf, with_pyvl = compare_hf and skip is None, not hf_only
    kv_cache_gb = kv_cache_gb or _kv_cache_gb(cfg, dtype, len(ids) + decode_tokens)
    counts = parameter_count(cfg)
    n_text = len(ids) - tiles[-1] * cfg.num_image_token
    setup = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "ops": None,
        "systems": [name for name, ran in (("pyvl", with_pyvl), ("hf", with_hf)) if ran],
        "parameters_B": round(counts["total"] / 1e9, 3),
        "weights_GB": round(counts["total"] * torch.empty((), dtype=dtype).element_size() / 1e9, 2),
        "tiles": tiles,
        "prompt_tokens": len(ids),
        "text_tokens": n_text,
        "decode_tokens": decode_tokens,
        "repeat": repeat,
        "photo": f"{PHOTO[0]}x{PHOTO[1]}",
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if with_hf:
        import transformers

        setup["transformers"] = transformers.__version__
    report = report or Report()
    report.set("setup", setup)
    if not compare_hf:
        report.note("HF comparison not asked for (--no-hf)")
    elif skip:
        report.note(skip)
    _log(f"preprocessing a {PHOTO[0]}x{PHOTO[1]} photo on the CPU")
    photo = synthetic_photo(*PHOTO)
    table = _Table(
        report, _figures(device, tiles, ids, n_text, load_image(photo, max_num=12).shape[0], decode_tokens)
    )
    if with_pyvl:
        table.measure(
            "pyvl",
            "preprocess",
            lambda: median_seconds(lambda: load_image(photo, max_num=12), repeat=repeat) * 1e3,
        )
        try:
            _pyvl_figures(
                table,
                setup,
                cfg,
                device,
                dtype,
                backend,
                tiles,
                ids,
                img_id,
                decode_tokens,
                repeat,
                kv_cache_gb,
            )
        except (
            Exception
        ) as exc:  # the model could not be built (out of memory, a kernel that fails to compile)
            report.note(f"pyvl failed: {type(exc).__name__}: {str(exc)[:300]}")
        gc.collect()  # pyvl's model is gone once _pyvl_figures returns; free its memory before HF's is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if with_hf:
        # what HF users run: the original load_image (Pillow tiles, then ToTensor + Normalize)
        table.measure(
            "hf",
            "preprocess",
            lambda: median_seconds(lambda: pillow_pipeline(photo, 12), repeat=repeat) * 1e3,
        )
        text_id = tokenizer.encode("the", add_bos=False)[0]
        try:
            hf_figures(table, cfg, device, dtype, tiles, ids, img_id, text_id, decode_tokens, repeat)
        except Exception as exc:  # report pyvl's figures even when HF cannot run (an old version, OOM)
            report.note(f"HF comparison failed: {type(exc).__name__}: {str(exc)[:300]}")
        gc.collect()
        torch.cuda.empty_cache()
    table.finish()
    return report.done()
