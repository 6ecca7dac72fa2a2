"""Model configuration: frozen dataclasses built from a released ``config.json``.

Only the keys that change the computation are kept. Required keys missing from the file raise
:class:`~pyvl.errors.ConfigError`; keys whose class default is known to be wrong for the released models
(``ps_version``, ``select_layer``) fall back to the original class default with a logged warning (spec 1.1).
Serialisation leftovers such as ``llm_config.use_cache`` or ``max_length`` are ignored on purpose (spec trap 23).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["VisionConfig", "LLMConfig", "ModelConfig", "load_config"]

log = logging.getLogger("pyvl")


def _require(section: dict, key: str, where: str) -> Any:
    if key not in section:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    return section[key]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class VisionConfig:
    """InternViT (6B style: RMSNorm + QK-norm, no qkv bias; 300M style: LayerNorm + qkv bias)."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    image_size: int
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        where = "config.json vision_config"
        _check(self.norm_type in ("rms_norm", "layer_norm"),
               f"{where}: norm_type {self.norm_type!r} is not 'rms_norm' or 'layer_norm'")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"{where}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
               f"{self.num_attention_heads}")
        _check(self.image_size % self.patch_size == 0,
               f"{where}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        where = "config.json vision_config"
        act = d.get("hidden_act", "gelu")
        _check(act == "gelu", f"{where}: hidden_act {act!r} is not supported (expected 'gelu')")
        return cls(
            hidden_size=int(_require(d, "hidden_size", where)),
            num_attention_heads=int(_require(d, "num_attention_heads", where)),
            intermediate_size=int(_require(d, "intermediate_size", where)),
            num_hidden_layers=int(_require(d, "num_hidden_layers", where)),
            image_size=int(_require(d, "image_size", where)),
            patch_size=int(d.get("patch_size", 14)),
            num_channels=int(d.get("num_channels", 3)),
            qkv_bias=bool(d.get("qkv_bias", False)),
            qk_normalization=bool(d.get("qk_normalization", True)),
            # The oldest 6B config has no norm_type key; the class default is rms_norm (spec 1.2).
            norm_type=str(d.get("norm_type", "rms_norm")),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        )


@dataclass(frozen=True)
class LLMConfig:
    """InternLM2 decoder: packed GQA wqkv, rotate-half RoPE (optionally dynamic NTK), SwiGLU, RMSNorm."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2

    def __post_init__(self) -> None:
        where = "config.json llm_config"
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"{where}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
               f"{self.num_attention_heads}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
               f"num_key_value_heads {self.num_key_value_heads}")
        _check(self.rope_scaling_type in (None, "dynamic", "linear"),
               f"{where}: rope_scaling type {self.rope_scaling_type!r} is not supported "
               "(expected 'dynamic', 'linear' or no rope_scaling)")
        _check(self.rope_scaling_factor >= 1.0,
               f"{where}: rope_scaling factor {self.rope_scaling_factor} must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LLMConfig":
        where = "config.json llm_config"
        arch = (d.get("architectures") or ["InternLM2ForCausalLM"])[0]
        _check(arch == "InternLM2ForCausalLM",
               f"{where}: architectures[0] is {arch!r}; pyvl supports InternLM2ForCausalLM only")
        act = d.get("hidden_act", "silu")
        _check(act == "silu", f"{where}: hidden_act {act!r} is not supported (expected 'silu')")
        scaling = d.get("rope_scaling")
        if scaling is not None:
            _check(isinstance(scaling, dict) and "factor" in scaling and "type" in scaling,
                   f"{where}: rope_scaling {scaling!r} must be an object with 'type' and 'factor'")
        if "bias" not in d:
            # The InternLM2 class default is bias=True, which would add biases the released files lack.
            log.warning("%s: key 'bias' is missing; using the class default True (released models set false)",
                        where)
        heads = int(_require(d, "num_attention_heads", where))
        return cls(
            hidden_size=int(_require(d, "hidden_size", where)),
            intermediate_size=int(_require(d, "intermediate_size", where)),
            num_hidden_layers=int(_require(d, "num_hidden_layers", where)),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            vocab_size=int(_require(d, "vocab_size", where)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(d.get("rope_theta", 10000)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_scaling_type=None if scaling is None else str(scaling["type"]),
            rope_scaling_factor=1.0 if scaling is None else float(scaling["factor"]),
            bias=bool(d.get("bias", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=int(d.get("bos_token_id", 1)),
            eos_token_id=int(d.get("eos_token_id", 2)),
            pad_token_id=int(d.get("pad_token_id", 2) if d.get("pad_token_id") is not None else 2),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Top-level ``internvl_chat`` config: vision tower, projector geometry, LLM and chat settings."""

    vision: VisionConfig
    llm: LLMConfig
    select_layer: int = -1
    image_size: int = 448
    downsample_ratio: float = 0.5
    ps_version: str = "v1"
    template: str = "internlm2-chat"
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    system_message: str | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _check(self.ps_version in ("v1", "v2"),
               f"config.json: ps_version {self.ps_version!r} is not 'v1' or 'v2'")
        n_states = self.vision.num_hidden_layers + 1
        _check(-n_states <= self.select_layer < n_states,
               f"config.json: select_layer {self.select_layer} is out of range for "
               f"{self.vision.num_hidden_layers} vision layers (valid: {-n_states}..{n_states - 1})")
        grid = self.image_size // self.vision.patch_size
        merged = grid * self.downsample_ratio
        _check(merged == int(merged) and merged > 0,
               f"config.json: downsample_ratio {self.downsample_ratio} does not divide the "
               f"{grid}x{grid} patch grid into whole tokens")
        _check(self.template == "internlm2-chat",
               f"config.json: template {self.template!r} is not supported (expected 'internlm2-chat')")
        _check(1 <= self.min_dynamic_patch <= self.max_dynamic_patch,
               f"config.json: min_dynamic_patch {self.min_dynamic_patch} / max_dynamic_patch "
               f"{self.max_dynamic_patch} are inconsistent")

    @property
    def num_image_token(self) -> int:
        """Tokens per 448px tile after pixel shuffle: (448/14)^2 * 0.5^2 = 256."""
        grid = self.image_size // self.vision.patch_size
        return int(round(grid * grid * self.downsample_ratio ** 2))

    @property
    def projector_in(self) -> int:
        return int(round(self.vision.hidden_size / self.downsample_ratio ** 2))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        _check(isinstance(d, dict), f"{source}: expected a JSON object at the top level")
        model_type = d.get("model_type", "internvl_chat")
        _check(model_type == "internvl_chat",
               f"{source}: model_type {model_type!r} is not 'internvl_chat'")
        vision = VisionConfig.from_dict(_require(d, "vision_config", source))
        llm = LLMConfig.from_dict(_require(d, "llm_config", source))
        if "ps_version" not in d:
            log.warning("%s: 'ps_version' is missing; using the class default 'v1' "
                        "(the released V1-5 models use 'v2')", source)
        if "select_layer" not in d:
            log.warning("%s: 'select_layer' is missing; using the class default -1 "
                        "(the V1-5-era class default was -4)", source)
        hidden = d.get("hidden_size")
        _check(hidden is None or int(hidden) == llm.hidden_size,
               f"{source}: hidden_size {hidden} contradicts llm_config.hidden_size {llm.hidden_size}")
        image_size = d.get("force_image_size") or vision.image_size
        _check(not d.get("use_backbone_lora") and not d.get("use_llm_lora"),
               f"{source}: LoRA checkpoints (use_backbone_lora/use_llm_lora) are not supported; merge them first")
        return cls(
            vision=vision,
            llm=llm,
            select_layer=int(d.get("select_layer", -1)),
            image_size=int(image_size),
            downsample_ratio=float(d.get("downsample_ratio", 0.5)),
            ps_version=str(d.get("ps_version", "v1")),
            template=str(d.get("template") or "internlm2-chat"),
            use_thumbnail=bool(d.get("use_thumbnail", False)),
            min_dynamic_patch=int(d.get("min_dynamic_patch", 1)),
            max_dynamic_patch=int(d.get("max_dynamic_patch", 6)),
            system_message=d.get("system_message"),
            torch_dtype=str(d.get("torch_dtype", "bfloat16")),
        )


def load_config(folder: str | Path) -> ModelConfig:
    """Read ``folder/config.json`` into a :class:`ModelConfig`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a model folder needs config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return ModelConfig.from_dict(data, source=str(path))

