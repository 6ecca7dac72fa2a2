"""The built-in demo model: a tiny random-weight checkpoint in the exact released InternVL-Chat-V1-5 format.

``pyvl chat`` without ``--model`` runs on it, so a fresh install can exercise the whole pipeline (tiling,
ViT, projector, tokenizer, template, generation) with no download. The weights are random, so the answers are
gibberish; the folder layout (config.json, two bf16 safetensors shards + index, SentencePiece tokenizer with
the InternLM2/InternVL added tokens) is the real one. It is generated deterministically (fixed seed) into a
cache folder the first time it is needed, atomically, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .models.vlm import InternVLChatModel
from .ops import resolve_ops

__all__ = ["DEMO_NOTICE", "demo_config_dict", "demo_model_path", "write_demo_checkpoint"]

DEMO_VERSION = 1
DEMO_NOTICE = (
    "pyvl demo model: tiny RANDOM weights in the released InternVL format; answers are gibberish. "
    "Pass --model PATH for a real InternVL-Chat-V1-5 or Mini-InternVL-Chat-2B-V1-5 folder."
)
ASSETS = Path(__file__).parent / "demo_assets"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")


def demo_config_dict() -> dict:
    """A Mini-InternVL-Chat-2B-V1-5-shaped config (300M-style ViT, ps v2), shrunk to a few MB."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "torch_dtype": "bfloat16",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "hidden_size": 128,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_act": "gelu",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "image_size": 448,
            "patch_size": 14,
            "num_channels": 3,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "qk_normalization": False,
        },
        "llm_config": {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "hidden_act": "silu",
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1009,
            "max_position_embeddings": 4096,
            "rope_theta": 1000000,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
            "rms_norm_eps": 1e-5,
            "bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
        },
    }


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    last = name.rsplit(".", 1)[-1]
    if "norm" in name and last == "weight" or last in ("ls1", "ls2") or name.startswith("mlp1.0.weight"):
        return 0.75 + 0.5 * torch.rand(shape, generator=gen)  # norm gains and layer scales near 1
    fan_in = shape[-1] if len(shape) > 1 else 1
    if len(shape) == 4:  # patch embedding conv
        fan_in = shape[1] * shape[2] * shape[3]
    std = 0.02 if len(shape) == 1 else fan_in**-0.5
    return torch.randn(shape, generator=gen) * std


def write_demo_checkpoint(folder: Path, seed: int = 0, config: dict | None = None) -> None:
    """Write the demo checkpoint into ``folder`` (which must not exist yet); ``config`` (a config.json dict with
    the demo tokenizer's 1009 ids) gives other shapes in the same format."""
    cfg_dict = demo_config_dict() if config is None else config
    cfg = ModelConfig.from_dict(cfg_dict)
    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in InternVLChatModel(cfg, resolve_ops("reference")).state_dict().items()
        }
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(name, shape, gen).to(torch.bfloat16) for name, shape in sorted(shapes.items())
    }
    folder.mkdir(parents=True)
    # Two shards plus an index, like the released V1-5 folder: vision + projector, then the language model.
    shards = {
        "model-00001-of-00002.safetensors": {
            k: v for k, v in tensors.items() if not k.startswith("language_model.")
        },
        "model-00002-of-00002.safetensors": {
            k: v for k, v in tensors.items() if k.startswith("language_model.")
        },
    }
    weight_map = {}
    for file, part in shards.items():
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    for name in TOKENIZER_FILES:
        shutil.copyfile(ASSETS / name, folder / name)


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """The demo folder, generated on first use under ``cache_dir`` (default $PYVL_CACHE or ~/.cache/pyvl)."""
    root = Path(cache_dir or os.environ.get("PYVL_CACHE") or Path.home() / ".cache" / "pyvl")
    target = root / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        write_demo_checkpoint(staging / "model")
        try:
            os.replace(staging / "model", target)  # atomic: a reader never sees a half-written folder
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
