"""HF transformers' side of ``pyvl bench e2e``: its native InternVLForConditionalGeneration at a preset's size.

InternViT is InternVLVision and InternLM2 is Llama there; the model is built on meta, cast on meta (so no float32
copy is ever allocated) and initialised on the device as shared/tools/hf_baseline.py does (SDPA, random bf16).
Its TTFT is one forward with logits_to_keep=1 plus an argmax, its prefill the text model alone on the same ids
(images replaced by a text id), its decode (t(generate N) - t(generate 1)) / (N - 1), as the baseline script
measures them.
"""

from __future__ import annotations

import sys

import torch

from ..config import ModelConfig
from .timing import device_median_ms, peak_memory_gb

__all__ = ["hf_unavailable", "hf_config", "hf_figures"]


def hf_config(cfg: ModelConfig, img_id: int):
    """transformers' InternVLConfig of ``cfg``'s sizes: InternViT as InternVLVision, InternLM2 as Llama."""
    from transformers import InternVLConfig

    v, lm = cfg.vision, cfg.llm
    vision = dict(
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size,
        use_qk_norm=v.qk_normalization,
        norm_type=v.norm_type,
        layer_norm_eps=v.layer_norm_eps,
        attention_bias=v.qkv_bias,
        image_size=[cfg.image_size] * 2,
        patch_size=[v.patch_size] * 2,
        use_mean_pooling=False,
    )
    text = dict(
        model_type="llama",
        hidden_size=lm.hidden_size,
        num_hidden_layers=lm.num_hidden_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_key_value_heads,
        intermediate_size=lm.intermediate_size,
        vocab_size=lm.vocab_size,
        rms_norm_eps=lm.rms_norm_eps,
        rope_theta=lm.rope_theta,
        max_position_embeddings=lm.max_position_embeddings,
        tie_word_embeddings=False,
        rope_scaling=None
        if lm.rope_scaling_type is None
        else {"rope_type": lm.rope_scaling_type, "factor": lm.rope_scaling_factor},
    )
    hf_cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=img_id,
        downsample_ratio=cfg.downsample_ratio,
        vision_feature_layer=cfg.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    return hf_cfg


def _hf_model(cfg: ModelConfig, device, dtype, img_id: int):
    """HF's native InternVL at ``cfg``'s size, random weights allocated once in ``dtype`` on ``device``."""
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(hf_config(cfg, img_id))
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

                init = (
                    module.compute_default_rope_parameters
                    if module.rope_type == "default"
                    else ROPE_INIT_FUNCTIONS[module.rope_type]
                )
                inv_freq, module.attention_scaling = init(module.config, device)
                module.inv_freq = inv_freq
                module.original_inv_freq = inv_freq.clone()
    return model.eval()


def _log(message: str) -> None:
    print(f"[bench e2e] {message}", file=sys.stderr, flush=True)


@torch.inference_mode()
def hf_figures(
    table, cfg: ModelConfig, device, dtype, tiles, ids, img_id, text_id, decode_tokens, repeat
) -> None:
    """HF's figures into ``table`` (pyvl.bench.e2e's, system "hf") as each is measured."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _log("building HF transformers' InternVLForConditionalGeneration (SDPA)")
    model = _hf_model(cfg, device, dtype, img_id)
    pixels = torch.randn(
        max(tiles), 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)
    ).to(device, dtype)
    for t in tiles:
        _log(f"HF: vision + projector, {t} tiles")
        table.measure(
            "hf",
            f"vision_{t}",
            lambda: device_median_ms(
                lambda: model.model.get_image_features(
                    pixel_values=pixels[:t],
                    vision_feature_layer=cfg.select_layer,
                    vision_feature_select_strategy="default",
                ),
                device,
                repeat,
            ),
        )
    prompt = torch.tensor([ids], device=device)
    text = prompt.masked_fill(prompt == img_id, text_id)
    _log("HF: time to first token, prefill, decode")
    table.measure(
        "hf",
        "ttft",
        lambda: device_median_ms(
            lambda: model(input_ids=prompt, pixel_values=pixels, logits_to_keep=1).logits.argmax(-1),
            device,
            repeat,
        ),
    )
    table.measure(
        "hf",
        "prefill",
        lambda: device_median_ms(lambda: model.model.language_model(input_ids=text), device, repeat),
    )

    def generate(n: int):
        return model.generate(
            input_ids=text,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )

    def decode() -> float:
        one, many = (device_median_ms(lambda: generate(n), device, repeat) for n in (1, decode_tokens))
        return (many - one) / (decode_tokens - 1)

    table.measure("hf", "decode", decode)
    table.put("hf", "peak_memory", peak_memory_gb(device))


def hf_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"HF comparison runs on CUDA only (device {device}): skipped"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed: HF comparison skipped (pip install transformers)"
    return None
