"""Model presets for ``pyvl bench e2e``: released-format configs of the InternVL 1.5 family, and random weights.

A preset is a ``config.json`` dict (the released format, so :meth:`ModelConfig.from_dict` checks it like a
real folder's) with the released models' dimensions:

  internvl-chat-v1-5          InternViT-6B: 45 layers x 3200, 25 heads (D 128), MLP 12800, RMSNorm + QK-norm,
                              no qkv bias; InternLM2-20B: 48 layers x 6144, 48/8 heads, FFN 16384     25.5 B parameters
  mini-internvl-chat-2b-v1-5  InternViT-300M: 24 layers x 1024, 16 heads (D 64), MLP 4096, LayerNorm, qkv bias,
                              no QK-norm; InternLM2-1.8B: 24 layers x 2048, 16/8 heads, FFN 8192        2.2 B parameters
  tiny                        the demo model's config (pyvl.demo.demo_config_dict)                     1.3 M parameters
  internvl-chat-v1-5-awq      internvl-chat-v1-5, its decoder linears 4-bit AWQ GEMM, groups of 128
  tiny-awq                    tiny, its decoder linears 4-bit, groups of 32 (the CPU stand-in of the above)

Both real presets: ps_version v2, 448 px tiles (256 tokens each), vocab 92553, rope theta 1e6, max_position
32768, rms_norm_eps 1e-5. V1-5's rope_scaling factor is 2.0 here: the spec could not read the released value
(internlm2-chat-20b ships 3.0), and 2.0 is what the measured HF baseline (shared/tools/hf_baseline.py) used. It
changes nothing below 32768 tokens.

:func:`random_model` builds the network on the meta device and materialises it directly on the target device in
the target dtype (no float32 copy, no checkpoint written): weights ~ N(0, 0.02), norm gains 1, norm biases 0.
:func:`chat_on` puts the demo tokenizer and an engine of its own on such a model: what ``pyvl.load`` returns,
so the engine benchmarks run at a preset's real size without a checkpoint; several can share one model.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..chat import InternVLChat
from ..config import ModelConfig
from ..demo import ASSETS, demo_config_dict
from ..engine.engine import Engine, EngineConfig
from ..models.random_weights import fill_random
from ..models.vlm import InternVLChatModel
from ..ops import resolve_ops
from ..parallel.launch import Cluster
from ..quant.awq import quantization_config
from ..tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "preset_dict",
    "preset_config",
    "parameter_count",
    "random_model",
    "chat_on",
]


def _llm(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, rope_factor: float) -> dict:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 92553,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": rope_factor},
        "rms_norm_eps": 1e-5,
        "bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def _vision(
    hidden: int, heads: int, mlp: int, layers: int, norm_type: str, qkv_bias: bool, qk_norm: bool
) -> dict:
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_act": "gelu",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "image_size": 448,
        "patch_size": 14,
        "num_channels": 3,
        "norm_type": norm_type,
        "layer_norm_eps": 1e-6,
        "qkv_bias": qkv_bias,
        "qk_normalization": qk_norm,
    }


def _top(vision: dict, llm: dict) -> dict:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "torch_dtype": "bfloat16",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "hidden_size": llm["hidden_size"],
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "vision_config": vision,
        "llm_config": llm,
    }


def _awq(top: dict, group_size: int = 128) -> dict:
    """The same model with 4-bit AWQ GEMM decoder linears (quantization_config where LMDeploy writes it)."""
    quantized = copy.deepcopy(top)
    quantized["llm_config"]["quantization_config"] = quantization_config(group_size)
    return quantized


PRESETS: dict[str, dict] = {
    "internvl-chat-v1-5": _top(
        _vision(3200, 25, 12800, 45, "rms_norm", qkv_bias=False, qk_norm=True),
        _llm(6144, 16384, 48, 48, 8, rope_factor=2.0),
    ),
    "mini-internvl-chat-2b-v1-5": _top(
        _vision(1024, 16, 4096, 24, "layer_norm", qkv_bias=True, qk_norm=False),
        _llm(2048, 8192, 24, 16, 8, rope_factor=2.0),
    ),
    "tiny": demo_config_dict(),
}
PRESETS["internvl-chat-v1-5-awq"] = _awq(PRESETS["internvl-chat-v1-5"])
PRESETS["tiny-awq"] = _awq(PRESETS["tiny"], group_size=32)


def preset_dict(name: str) -> dict:
    """A fresh copy of the preset's config.json dict."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(preset_dict(name), source=f"preset {name}")


def _meta_model(
    cfg: ModelConfig,
    backend: str = "reference",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InternVLChatModel:
    with torch.device("meta"):
        return InternVLChatModel(cfg, resolve_ops(backend, device, dtype=dtype))


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per top-level part and in total, counted on the meta device (nothing is allocated); a 4-bit
    model's weights are counted as the float model's (one each, not one per packed word)."""
    counts: dict[str, int] = {}
    for name, p in _meta_model(dataclasses.replace(cfg, quant=None)).named_parameters():
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts


@torch.no_grad()
def random_model(
    cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, backend: str = "auto", seed: int = 0
) -> InternVLChatModel:
    """An :class:`InternVLChatModel` of ``cfg``'s exact shapes with random weights, allocated once on ``device``
    in ``dtype``: built on meta, cast on meta (so no float32 copy ever exists), then ``to_empty`` + init."""
    device = torch.device(device)
    model = _meta_model(cfg, backend, device, dtype).to(dtype)
    return fill_random(model.to_empty(device=device), device, seed).eval()


def chat_on(
    model: InternVLChatModel, max_context: int | None = None, cluster: Cluster | None = None, **engine_options
) -> InternVLChat:
    """A chat object (the demo tokenizer, ids < 1009 plus its special tokens) with a new engine on ``model``;
    ``engine_options`` are :meth:`EngineConfig.for_model`'s (kv_cache_gb, max_num_seqs, cuda_graphs, ...).
    Default context: the model's max_position_embeddings. ``cluster``: the tensor-parallel group ``model`` is
    rank 0's shard of (pyvl.parallel.launch), which the engine then drives and closes."""
    tokenizer = Tokenizer.from_folder(ASSETS)
    context = max_context or model.cfg.llm.max_position_embeddings
    kv_heads = None if cluster is None else cluster.kv_heads_max
    engine = Engine(
        model,
        EngineConfig.for_model(model, context, **engine_options, kv_heads=kv_heads),
        salt="pyvl bench",
        bos_id=tokenizer.bos_id,
        cluster=cluster,
    )
    return InternVLChat(model, tokenizer, model.cfg, ASSETS, context, (tokenizer.im_end_id,), engine)
