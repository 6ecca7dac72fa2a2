"""``pyvl bench e2e``: pixels to tokens at a preset's real size with random weights, next to HF transformers.

Figures (medians of ``repeat`` runs after one warm-up; on CUDA every timed region starts and ends with a
``torch.cuda.synchronize()``):
  preprocess     pyvl.load_image of a synthetic 3840x2160 photo on the CPU (max_num 12: 8 tiles + thumbnail)
  vision         tiles [T, 3, 448, 448] -> image embeddings [T, 256, H] (ViT + pixel shuffle + mlp1), per --tiles
  prefill        the LLM over the whole prompt of the largest tile count (T * 256 image + --prompt-tokens text
                 tokens: ~3,400 for 13 tiles), into a fresh KV cache
  ttft           token ids + pixel values on the device -> first greedy token (vision + prefill + first sample)
  decode         ms per token over --decode-tokens greedy steps after that prompt, stop tokens disabled
  peak memory    torch.cuda.max_memory_allocated from the weights' allocation on (CUDA), or the process' peak RSS

The model is built from the preset's dimensions directly on the device (pyvl.bench.presets.random_model); the
tokenizer is the demo one (1009 tokens), so the prompt holds only ids < 1009 and the tokenizer's <IMG_CONTEXT>.
HF transformers (when importable, on CUDA) runs the same figures with its native InternVLForConditionalGeneration
of the same size (SDPA, random bf16, as shared/tools/hf_baseline.py), after pyvl's model is freed. Its TTFT is one
forward with logits_to_keep=1 plus an argmax, its prefill the text model alone on the same ids (images replaced
by a text id), its decode (t(generate N) - t(generate 1)) / (N - 1), as the baseline script measures them.
``hf_only=True`` (``--hf-only``) runs HF's figures alone, so a time-boxed device run can time pyvl first and HF
in a later process only if time is left.

The result is complete whatever fails: every row has "pyvl", "hf" and "hf/pyvl" (None where not measured), and
a stage that raises (an out-of-memory prefill, say) leaves its figure None with a note saying why, while the
other stages still run.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time

import torch

from .. import template
from ..api import _resolve_dtype
from ..chat import InternVLChat
from ..config import ModelConfig
from ..demo import ASSETS
from ..generate import GenerationConfig
from ..image import load_image
from ..tokenizer import Tokenizer
from .presets import parameter_count, preset_config, random_model
from .preprocess import pillow_pipeline, synthetic_photo
from .timing import median_seconds

__all__ = ["run", "build_prompt"]

PHOTO = (3840, 2160)


def _log(message: str) -> None:
    print(f"[bench e2e] {message}", file=sys.stderr, flush=True)


def _median_ms(fn, device: torch.device, repeat: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return median_seconds(fn, repeat=repeat, warmup=1, sync=sync) * 1e3


def build_prompt(tokenizer: Tokenizer, num_tiles: int, text_tokens: int, num_image_token: int) -> list[int]:
    """Chat-template ids of one image of ``num_tiles`` tiles plus filler words, ``text_tokens`` ids besides the
    <IMG_CONTEXT> run (or the template's minimum, if that is more)."""
    def encode(words: int) -> list[int]:
        question = template.IMAGE_PLACEHOLDER + "\n" + " ".join(["the"] * words)
        return tokenizer.encode(template.build_query(question, num_patches_list=[num_tiles],
                                                     num_image_token=num_image_token))
    image_tokens = num_tiles * num_image_token
    words = max(0, text_tokens - (len(encode(0)) - image_tokens))
    ids = encode(words)
    while words > 0 and len(ids) - image_tokens > text_tokens:  # a filler word may cost more than one id
        words -= 1
        ids = encode(words)
    return ids


def _stage(figures: dict, notes: list, who: str, key: str, fn) -> None:
    """figures[key] = fn(), or a note naming the failure (the figure then stays out, i.e. None)."""
    try:
        figures[key] = fn()
    except Exception as exc:  # keep the other stages' figures: one device run must bring back all it can
        notes.append(f"{who} {key} failed: {type(exc).__name__}: {str(exc)[:300]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _preprocess(repeat: int, ours: bool, baseline: bool) -> dict:
    photo = synthetic_photo(*PHOTO)
    out = {"tiles": load_image(photo, max_num=12).shape[0]}
    if ours:
        out["pyvl"] = median_seconds(lambda: load_image(photo, max_num=12), repeat=repeat) * 1e3
    if baseline:  # what HF users run: the original load_image (Pillow tiles, then ToTensor + Normalize)
        out["hf"] = median_seconds(lambda: pillow_pipeline(photo, 12), repeat=repeat) * 1e3
    return out


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


@torch.inference_mode()
def _pyvl_figures(cfg: ModelConfig, device, dtype, backend, tiles, ids, img_id, decode_tokens, repeat,
                  notes: list) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _log(f"building pyvl's model on {device} ({dtype}, backend {backend})")
    model = random_model(cfg, device, dtype, backend)
    tokenizer = Tokenizer.from_folder(ASSETS)
    chat = InternVLChat(model, tokenizer, cfg, ASSETS, cfg.llm.max_position_embeddings, (tokenizer.im_end_id,))
    figures = {"backends": dict(model.ops.backends)}
    pixels = torch.randn(max(tiles), 3, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(0)).to(device, dtype)
    for t in tiles:
        _log(f"pyvl: vision + projector, {t} tiles")
        _stage(figures, notes, "pyvl", f"vision_{t}",
               lambda: _median_ms(lambda: chat.extract_feature(pixels[:t]), device, repeat))

    def prefill() -> float:
        prompt = torch.tensor(ids, device=device)
        embeds = model.embed(prompt[None], model.extract_feature(pixels), img_id)
        positions = torch.arange(len(ids), device=device)[None]
        return _median_ms(lambda: model.language_model(embeds, positions, model.new_cache(1, len(ids))), device,
                          repeat)

    _log(f"pyvl: prefill, {len(ids)} tokens")
    _stage(figures, notes, "pyvl", "prefill", prefill)

    def first_token_and_decode() -> tuple[float, float]:
        gen = GenerationConfig(max_new_tokens=decode_tokens, eos_token_id=(cfg.llm.vocab_size,))  # no such id: N steps
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        ttft, decode = [], []
        for run in range(repeat + 1):
            sync()
            start = first = time.perf_counter()
            # _run is the loop chat()/generate() consume; iterating it times the first step and the rest apart.
            for i, _ in enumerate(chat._run([ids], pixels, gen)):
                if i == 0:
                    sync()
                    first = time.perf_counter()
            sync()
            if run:  # run 0 is the warm-up
                ttft.append((first - start) * 1e3)
                decode.append((time.perf_counter() - first) * 1e3 / (decode_tokens - 1))
        return statistics.median(ttft), statistics.median(decode)

    _log(f"pyvl: time to first token + {decode_tokens} decode steps")
    _stage(figures, notes, "pyvl", "ttft+decode", first_token_and_decode)
    if "ttft+decode" in figures:
        figures["ttft"], figures["decode"] = figures.pop("ttft+decode")
    figures["peak_memory"] = _peak_memory_gb(device)
    return figures


def _hf_config(cfg: ModelConfig, img_id: int):
    """transformers' InternVLConfig of ``cfg``'s sizes: InternViT as InternVLVision, InternLM2 as Llama."""
    from transformers import InternVLConfig

    v, lm = cfg.vision, cfg.llm
    vision = dict(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                  use_qk_norm=v.qk_normalization, norm_type=v.norm_type, layer_norm_eps=v.layer_norm_eps,
                  attention_bias=v.qkv_bias, image_size=[cfg.image_size] * 2, patch_size=[v.patch_size] * 2,
                  use_mean_pooling=False)
    text = dict(model_type="llama", hidden_size=lm.hidden_size, num_hidden_layers=lm.num_hidden_layers,
                num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_key_value_heads,
                intermediate_size=lm.intermediate_size, vocab_size=lm.vocab_size, rms_norm_eps=lm.rms_norm_eps,
                rope_theta=lm.rope_theta, max_position_embeddings=lm.max_position_embeddings,
                tie_word_embeddings=False, rope_scaling=None if lm.rope_scaling_type is None else
                {"rope_type": lm.rope_scaling_type, "factor": lm.rope_scaling_factor})
    hf_cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=img_id,
                            downsample_ratio=cfg.downsample_ratio, vision_feature_layer=cfg.select_layer,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    return hf_cfg


def _hf_model(cfg: ModelConfig, device, dtype, img_id: int):
    """HF's native InternVL at ``cfg``'s size, random weights allocated once in ``dtype`` on ``device``."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(_hf_config(cfg, img_id))
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no float32 copy is ever allocated
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad_(False)
            parts = name.split(".")
            if len(parts) > 1 and "norm" in parts[-2]:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():  # rotary tables were buffers on meta: compute them on the device
            if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
                from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

                init = (module.compute_default_rope_parameters if module.rope_type == "default"
                        else ROPE_INIT_FUNCTIONS[module.rope_type])
                inv_freq, module.attention_scaling = init(module.config, device)
                module.inv_freq = inv_freq
                module.original_inv_freq = inv_freq.clone()
    return model.eval()


@torch.inference_mode()
def _hf_figures(cfg: ModelConfig, device, dtype, tiles, ids, img_id, text_id, decode_tokens, repeat,
                notes: list) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _log("building HF transformers' InternVLForConditionalGeneration (SDPA)")
    model = _hf_model(cfg, device, dtype, img_id)
    pixels = torch.randn(max(tiles), 3, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(0)).to(device, dtype)
    figures = {}
    for t in tiles:
        _log(f"HF: vision + projector, {t} tiles")
        _stage(figures, notes, "HF", f"vision_{t}", lambda: _median_ms(lambda: model.model.get_image_features(
            pixel_values=pixels[:t], vision_feature_layer=cfg.select_layer,
            vision_feature_select_strategy="default"), device, repeat))
    prompt = torch.tensor([ids], device=device)
    text = prompt.masked_fill(prompt == img_id, text_id)
    _log("HF: time to first token, prefill, decode")
    _stage(figures, notes, "HF", "ttft", lambda: _median_ms(
        lambda: model(input_ids=prompt, pixel_values=pixels, logits_to_keep=1).logits.argmax(-1), device, repeat))
    _stage(figures, notes, "HF", "prefill",
           lambda: _median_ms(lambda: model.model.language_model(input_ids=text), device, repeat))
    generate = lambda n: model.generate(input_ids=text, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                        do_sample=False, eos_token_id=None, pad_token_id=0)

    def decode() -> float:
        one, many = (_median_ms(lambda: generate(n), device, repeat) for n in (1, decode_tokens))
        return (many - one) / (decode_tokens - 1)

    _stage(figures, notes, "HF", "decode", decode)
    figures["peak_memory"] = _peak_memory_gb(device)
    return figures


def _hf_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"HF comparison runs on CUDA only (device {device}): skipped"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed: HF comparison skipped (pip install transformers)"
    return None


def run(preset: str, device: str | None = None, dtype: str | None = None, tiles=(1, 7, 13), prompt_tokens: int = 70,
        decode_tokens: int = 32, backend: str = "auto", repeat: int = 3, compare_hf: bool = True,
        hf_only: bool = False) -> dict:
    """Run the benchmark; {"setup": {...}, "rows": [{key, figure, unit, pyvl, hf, hf/pyvl}], "notes": [...]}."""
    if decode_tokens < 2 or repeat < 1 or prompt_tokens < 0 or not tiles or min(tiles) < 1:
        raise ValueError("bench e2e needs --decode-tokens >= 2, --repeat >= 1, --prompt-tokens >= 0 and tile "
                         "counts >= 1")
    if hf_only and not compare_hf:
        raise ValueError("bench e2e: --hf-only and --no-hf exclude each other")
    cfg = preset_config(preset)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():  # before minutes of CPU preprocessing
        raise ValueError(f"bench e2e --device {device} needs a CUDA GPU (torch.cuda.is_available() is False here)")
    dtype = _resolve_dtype(dtype, device, cfg.torch_dtype)
    tiles = sorted(set(int(t) for t in tiles))
    tokenizer = Tokenizer.from_folder(ASSETS)
    img_id = tokenizer.img_context_id
    ids = build_prompt(tokenizer, tiles[-1], prompt_tokens, cfg.num_image_token)
    notes = [] if compare_hf else ["HF comparison not asked for (--no-hf)"]
    skip = _hf_unavailable(device) if compare_hf else None
    if skip and hf_only:
        raise ValueError(f"bench e2e --hf-only: {skip}")
    if skip:
        notes.append(skip)
    with_hf, with_pyvl = compare_hf and skip is None, not hf_only
    _log(f"preprocessing a {PHOTO[0]}x{PHOTO[1]} photo on the CPU")
    prep = _preprocess(repeat, ours=with_pyvl, baseline=with_hf)
    ours = {}
    if with_pyvl:
        try:
            ours = _pyvl_figures(cfg, device, dtype, backend, tiles, ids, img_id, decode_tokens, repeat, notes)
        except Exception as exc:  # the model could not be built (out of memory, a kernel that fails to compile)
            notes.append(f"pyvl failed: {type(exc).__name__}: {str(exc)[:300]}")
        gc.collect()  # pyvl's model is gone once _pyvl_figures returns; free its memory before HF's is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hf = {}
    if with_hf:
        text_id = tokenizer.encode("the", add_bos=False)[0]
        try:
            hf = _hf_figures(cfg, device, dtype, tiles, ids, img_id, text_id, decode_tokens, repeat, notes)
        except Exception as exc:  # report pyvl's figures even when HF cannot run (an old version, OOM)
            notes.append(f"HF comparison failed: {type(exc).__name__}: {str(exc)[:300]}")
        gc.collect()
        torch.cuda.empty_cache()

    n_text = len(ids) - tiles[-1] * cfg.num_image_token
    figures = [("preprocess", f"preprocess {PHOTO[0]}x{PHOTO[1]} -> {prep['tiles']} tiles (CPU)", "ms")]
    figures += [(f"vision_{t}", f"vision + projector, {t} tile{'s' * (t > 1)}", "ms") for t in tiles]
    figures += [("prefill", f"LLM prefill, {len(ids)} tokens", "ms"),
                ("ttft", f"time to first token, {tiles[-1]} tiles + {n_text} text tokens", "ms"),
                ("decode", f"decode, {decode_tokens} new tokens (steps after the first)", "ms/token"),
                ("peak_memory", "peak GPU memory" if device.type == "cuda" else "peak RSS of the process", "GB")]
    values = {**{k: v for k, v in ours.items() if k != "backends"}, **({"preprocess": prep["pyvl"]} if ours else {})}
    hf_values = {**hf, **({"preprocess": prep["hf"]} if hf else {})}
    rows = []
    for key, figure, unit in figures:
        mine, theirs = values.get(key), hf_values.get(key)
        rows.append({"key": key, "figure": figure, "unit": unit,
                     "pyvl": None if mine is None else round(mine, 3),
                     "hf": None if theirs is None else round(theirs, 3),
                     "hf/pyvl": round(theirs / mine, 2) if mine and theirs is not None else None})
    counts = parameter_count(cfg)
    setup = {
        "preset": preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "backend": backend, "ops": ours.get("backends"),
        "systems": [name for name, ran in (("pyvl", with_pyvl), ("hf", with_hf)) if ran],
        "parameters_B": round(counts["total"] / 1e9, 3),
        "weights_GB": round(counts["total"] * torch.empty((), dtype=dtype).element_size() / 1e9, 2),
        "tiles": tiles, "prompt_tokens": len(ids), "text_tokens": n_text, "decode_tokens": decode_tokens,
        "repeat": repeat, "photo": f"{PHOTO[0]}x{PHOTO[1]}", "host_cpus": os.cpu_count(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if with_hf:
        import transformers

        setup["transformers"] = transformers.__version__
    return {"setup": setup, "rows": rows, "notes": notes}
