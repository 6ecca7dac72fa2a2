"""Model configuration: frozen dataclasses built from a released ``config.json``, validated before use.

Only the keys that change the computation are kept. Required keys missing from the file raise
:class:`~pyvl.errors.ConfigError`; keys whose class default is known to be wrong for the released models
(``ps_version``, ``select_layer``) fall back to the original class default with a logged warning.
Serialisation leftovers such as ``llm_config.use_cache`` or ``max_length`` are ignored on purpose (spec trap 23).

Every kept value is checked in ``__post_init__`` (so no model is ever built from an unchecked config): ints
must be JSON ints (not 1.5, ``true`` or ``"64"``), floats JSON numbers (not booleans or strings) and finite,
booleans JSON booleans. Each has a range; the ceilings sit far above the largest released model
(InternVL-Chat-V1-5: ViT 45 x 3200, MLP 12800; LLM 48 x 6144, FFN 16384, vocab 92553, 32768 positions) and
only stop configs that would build for minutes or allocate absurd sizes before any weight is read.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["VisionConfig", "LLMConfig", "AWQConfig", "ModelConfig", "load_config", "LIMITS"]

log = logging.getLogger("pyvl")

# Ceilings (inclusive). Released maxima in brackets.
LIMITS = {
    "layers": 1024,  # [48]
    "width": 65536,  # hidden sizes [6144]
    "ffn_width": 262144,  # intermediate sizes [16384]
    "heads": 1024,  # [48]
    "vocab": 2**20,  # [92553]
    "positions": 2**22,  # max_position_embeddings [32768]
    "image_size": 4480,  # tile side in pixels [448]; 448000 would make 256M-token prompts
    "dynamic_patch": 256,  # tiles per image [12]
    "eps": 1e-2,  # norm epsilons [1e-5, 1e-6]
    "rope_theta": 1e12,  # [1e6]
    "rope_factor": 1024.0,  # [2, 3]
}
_MISSING = object()


def _require(section: dict, key: str, where: str) -> Any:
    if key not in section:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    return section[key]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _section(d: Any, where: str) -> dict:
    _check(isinstance(d, dict), f"{where}: expected a JSON object, got {type(d).__name__} {d!r:.80}")
    return d


def _check_int(where: str, value: Any, lo: int, hi: int) -> int:
    _check(
        isinstance(value, int) and not isinstance(value, bool),
        f"{where} = {value!r:.80}: expected an integer (a JSON int) in [{lo}, {hi}]",
    )
    _check(lo <= value <= hi, f"{where} = {value}: out of range, expected an integer in [{lo}, {hi}]")
    return value


def _check_float(where: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    _check(
        isinstance(value, (int, float)) and not isinstance(value, bool),
        f"{where} = {value!r:.80}: expected a number (a JSON number) in {rng}",
    )
    ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    _check(ok, f"{where} = {value}: out of range, expected a finite number in {rng}")
    return float(value)


def _check_bool(where: str, value: Any) -> bool:
    _check(isinstance(value, bool), f"{where} = {value!r:.80}: expected true or false (a JSON boolean)")
    return value


def _check_choice(where: str, value: Any, choices: tuple) -> Any:
    _check(
        isinstance(value, (str, type(None))) and value in choices,
        f"{where} = {value!r:.80}: expected one of {list(choices)}",
    )
    return value


def _validate_fields(obj: Any, where: str, spec: dict[str, tuple]) -> None:
    """Check every field against ``spec`` (field -> (json key, kind, *bounds)); floats are stored as float."""
    for f in fields(obj):
        if f.name not in spec:
            continue
        key, kind, *bounds = spec[f.name]
        value, name = getattr(obj, f.name), f"{where}.{key}" if where else key
        if kind == "int":
            _check_int(name, value, *bounds)
        elif kind == "float":
            object.__setattr__(obj, f.name, _check_float(name, value, *bounds))
        elif kind == "bool":
            _check_bool(name, value)
        else:
            _check_choice(name, value, bounds[0])


def _get(d: dict, key: str, default: Any, none_is_default: bool = False) -> Any:
    """``d[key]`` without coercion; the default when absent (or null, where the original treats null so)."""
    value = d.get(key, default)
    return default if value is None and none_is_default else value


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
        where = "vision_config"
        _validate_fields(
            self,
            where,
            {
                "hidden_size": ("hidden_size", "int", 1, LIMITS["width"]),
                "num_attention_heads": ("num_attention_heads", "int", 1, LIMITS["heads"]),
                "intermediate_size": ("intermediate_size", "int", 1, LIMITS["ffn_width"]),
                "num_hidden_layers": ("num_hidden_layers", "int", 1, LIMITS["layers"]),
                "image_size": ("image_size", "int", 1, LIMITS["image_size"]),
                "patch_size": ("patch_size", "int", 1, LIMITS["image_size"]),
                # pyvl's preprocessing makes RGB tiles only.
                "num_channels": ("num_channels", "int", 3, 3),
                "qkv_bias": ("qkv_bias", "bool"),
                "qk_normalization": ("qk_normalization", "bool"),
                "norm_type": ("norm_type", "choice", ("rms_norm", "layer_norm")),
                "layer_norm_eps": ("layer_norm_eps", "float", 0.0, LIMITS["eps"], True),
            },
        )
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            f"{where}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
            f"{self.num_attention_heads}",
        )
        _check(
            self.image_size % self.patch_size == 0,
            f"{where}: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Any) -> VisionConfig:
        where = "vision_config"
        d = _section(d, where)
        act = d.get("hidden_act", "gelu")
        _check(act == "gelu", f"{where}.hidden_act = {act!r:.80}: not supported (expected 'gelu')")
        return cls(
            hidden_size=_require(d, "hidden_size", where),
            num_attention_heads=_require(d, "num_attention_heads", where),
            intermediate_size=_require(d, "intermediate_size", where),
            num_hidden_layers=_require(d, "num_hidden_layers", where),
            image_size=_require(d, "image_size", where),
            patch_size=_get(d, "patch_size", 14),
            num_channels=_get(d, "num_channels", 3),
            qkv_bias=_get(d, "qkv_bias", False),
            qk_normalization=_get(d, "qk_normalization", True),
            # The oldest 6B config has no norm_type key; the class default is rms_norm.
            norm_type=_get(d, "norm_type", "rms_norm"),
            layer_norm_eps=_get(d, "layer_norm_eps", 1e-6),
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
        where = "llm_config"
        _validate_fields(
            self,
            where,
            {
                "hidden_size": ("hidden_size", "int", 1, LIMITS["width"]),
                "intermediate_size": ("intermediate_size", "int", 1, LIMITS["ffn_width"]),
                "num_hidden_layers": ("num_hidden_layers", "int", 1, LIMITS["layers"]),
                "num_attention_heads": ("num_attention_heads", "int", 1, LIMITS["heads"]),
                "num_key_value_heads": ("num_key_value_heads", "int", 1, LIMITS["heads"]),
                "vocab_size": ("vocab_size", "int", 1, LIMITS["vocab"]),
                "max_position_embeddings": ("max_position_embeddings", "int", 1, LIMITS["positions"]),
                "rope_theta": ("rope_theta", "float", 0.0, LIMITS["rope_theta"], True),
                "rms_norm_eps": ("rms_norm_eps", "float", 0.0, LIMITS["eps"], True),
                "rope_scaling_type": ("rope_scaling.type", "choice", (None, "dynamic", "linear")),
                "rope_scaling_factor": ("rope_scaling.factor", "float", 1.0, LIMITS["rope_factor"]),
                "bias": ("bias", "bool"),
                "tie_word_embeddings": ("tie_word_embeddings", "bool"),
            },
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            _check_int(f"{where}.{key}", getattr(self, key), 0, self.vocab_size - 1)
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            f"{where}: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
            f"{self.num_attention_heads}",
        )
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        _check(
            self.head_dim % 2 == 0,
            f"{where}: head_dim hidden_size/num_attention_heads = {self.head_dim} must be even "
            "(rotate-half RoPE splits it in two)",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: Any) -> LLMConfig:
        where = "llm_config"
        d = _section(d, where)
        archs = d.get("architectures") or ["InternLM2ForCausalLM"]
        arch = archs[0] if isinstance(archs, list) else archs
        _check(
            arch == "InternLM2ForCausalLM",
            f"{where}.architectures[0] = {arch!r:.80}; pyvl supports InternLM2ForCausalLM only",
        )
        act = d.get("hidden_act", "silu")
        _check(act == "silu", f"{where}.hidden_act = {act!r:.80}: not supported (expected 'silu')")
        scaling = d.get("rope_scaling")
        if scaling is not None:
            _check(
                isinstance(scaling, dict) and "factor" in scaling and "type" in scaling,
                f"{where}.rope_scaling = {scaling!r:.80}: must be an object with 'type' and 'factor'",
            )
            _check(
                scaling["type"] in ("dynamic", "linear"),
                f"{where}.rope_scaling type {scaling['type']!r:.80} is not supported "
                "(expected 'dynamic', 'linear' or no rope_scaling)",
            )
        if "bias" not in d:
            # The InternLM2 class default is bias=True, which would add biases the released files lack.
            log.warning(
                "%s: key 'bias' is missing; using the class default True (released models set false)", where
            )
        heads = _require(d, "num_attention_heads", where)
        return cls(
            hidden_size=_require(d, "hidden_size", where),
            intermediate_size=_require(d, "intermediate_size", where),
            num_hidden_layers=_require(d, "num_hidden_layers", where),
            num_attention_heads=heads,
            # null or absent: one KV head per query head, as the original.
            num_key_value_heads=_get(d, "num_key_value_heads", heads, none_is_default=True),
            vocab_size=_require(d, "vocab_size", where),
            max_position_embeddings=_get(d, "max_position_embeddings", 2048),
            rope_theta=_get(d, "rope_theta", 10000),
            rms_norm_eps=_get(d, "rms_norm_eps", 1e-6),
            rope_scaling_type=None if scaling is None else scaling["type"],
            rope_scaling_factor=1.0 if scaling is None else scaling["factor"],
            bias=_get(d, "bias", True),
            tie_word_embeddings=_get(d, "tie_word_embeddings", False),
            bos_token_id=_get(d, "bos_token_id", 1),
            eos_token_id=_get(d, "eos_token_id", 2),
            pad_token_id=_get(d, "pad_token_id", 2, none_is_default=True),
        )


@dataclass(frozen=True)
class AWQConfig:
    """``quantization_config`` of an AWQ checkpoint (AutoAWQ, LMDeploy ``auto_awq``): every InternLM2 decoder
    linear holds 4-bit weights with a zero point and a scale per ``group_size`` inputs (-1: one group per
    row), packed as AWQ GEMM (see pyvl.quant.awq). Only that form is read: bits 4, zero_point true, gemm."""

    group_size: int

    def __post_init__(self) -> None:
        g = self.group_size
        _check_int("quantization_config.group_size", g, -1, LIMITS["ffn_width"])
        _check(
            g == -1 or (g > 0 and g % 16 == 0),
            f"quantization_config.group_size = {g}: expected -1 or a positive multiple of 16 (32, 64, 128)",
        )

    def group(self, in_features: int) -> int:
        """Inputs per group of a linear with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_dict(cls, d: Any, where: str) -> AWQConfig:
        d = _section(d, where)
        method = d.get("quant_method")
        _check(method == "awq", f"{where}.quant_method = {method!r:.80}: pyvl reads 'awq' checkpoints only")
        bits = d.get("bits", d.get("w_bit"))
        _check(bits == 4 and type(bits) is int, f"{where}.bits = {bits!r:.80}: pyvl reads 4-bit AWQ only")
        zero_point = d.get("zero_point", True)
        _check(zero_point is True, f"{where}.zero_point = {zero_point!r:.80}: expected true (asymmetric AWQ)")
        version = d.get("version", "gemm")
        _check(
            isinstance(version, str) and version.lower() == "gemm",
            f"{where}.version = {version!r:.80}: pyvl reads the AWQ GEMM packing only (expected 'gemm')",
        )
        skipped = d.get("modules_to_not_convert")
        _check(
            not skipped,
            f"{where}.modules_to_not_convert = {skipped!r:.80}: partly quantized decoders are not supported",
        )
        if "group_size" not in d and "q_group_size" in d:  # AutoAWQ's older name
            return cls(group_size=d["q_group_size"])
        return cls(group_size=_require(d, "group_size", where))


def _quantization(d: dict) -> AWQConfig | None:
    """``quantization_config`` at the top level (transformers-style) or in llm_config (where LMDeploy's
    auto_awq writes it for InternVL); both present must agree."""
    found = {
        where: AWQConfig.from_dict(section["quantization_config"], where)
        for where, section in (
            ("quantization_config", d),
            ("llm_config.quantization_config", d["llm_config"]),
        )
        if section.get("quantization_config") is not None
    }
    _check(
        len(set(found.values())) <= 1,
        f"quantization_config and llm_config.quantization_config disagree ({list(found.values())})",
    )
    return next(iter(found.values()), None)


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
    quant: AWQConfig | None = None  # an AWQ checkpoint's 4-bit decoder linears

    def __post_init__(self) -> None:
        n_states = self.vision.num_hidden_layers + 1
        _validate_fields(
            self,
            "",
            {
                "select_layer": ("select_layer", "int", -n_states, n_states - 1),
                "image_size": ("force_image_size", "int", 1, LIMITS["image_size"]),
                "downsample_ratio": ("downsample_ratio", "float", 0.0, 1.0, True),
                "ps_version": ("ps_version", "choice", ("v1", "v2")),
                "template": ("template", "choice", ("internlm2-chat",)),
                "use_thumbnail": ("use_thumbnail", "bool"),
                "min_dynamic_patch": ("min_dynamic_patch", "int", 1, LIMITS["dynamic_patch"]),
                "max_dynamic_patch": ("max_dynamic_patch", "int", 1, LIMITS["dynamic_patch"]),
                "torch_dtype": ("torch_dtype", "choice", ("bfloat16", "float16", "float32")),
            },
        )
        _check(
            self.system_message is None or isinstance(self.system_message, str),
            f"system_message = {self.system_message!r:.80}: expected a string or null",
        )
        _check(
            self.image_size % self.vision.patch_size == 0,
            f"force_image_size = {self.image_size}: not a multiple of vision_config.patch_size "
            f"{self.vision.patch_size}",
        )
        grid = self.image_size // self.vision.patch_size
        merged = grid * self.downsample_ratio
        projector_in = self.vision.hidden_size / self.downsample_ratio**2
        _check(
            merged == int(merged) and merged > 0 and projector_in == int(projector_in),
            f"downsample_ratio = {self.downsample_ratio}: does not divide the {grid}x{grid} patch "
            f"grid into whole tokens of whole width (vision hidden_size {self.vision.hidden_size})",
        )
        _check(
            self.min_dynamic_patch <= self.max_dynamic_patch,
            f"min_dynamic_patch {self.min_dynamic_patch} / max_dynamic_patch "
            f"{self.max_dynamic_patch} are inconsistent (min must be <= max)",
        )
        if self.quant is not None:
            m = self.llm
            for name, width in (
                ("hidden_size", m.hidden_size),
                ("intermediate_size", m.intermediate_size),
                ("num_attention_heads * head_dim", m.num_attention_heads * m.head_dim),
            ):
                _check(
                    width % 16 == 0 and width % self.quant.group(width) == 0,
                    f"quantization_config.group_size = {self.quant.group_size}: llm_config {name} {width} "
                    "must be a multiple of 16 split into whole groups",
                )
            qkv_rows = (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim
            _check(
                qkv_rows % 8 == 0,
                f"llm_config: wqkv's {qkv_rows} outputs must be a multiple of 8 in an AWQ checkpoint (8 "
                "outputs share a packed word)",
            )

    @property
    def num_image_token(self) -> int:
        """Tokens per 448px tile after pixel shuffle: (448/14)^2 * 0.5^2 = 256."""
        grid = self.image_size // self.vision.patch_size
        return int(round(grid * grid * self.downsample_ratio**2))

    @property
    def projector_in(self) -> int:
        return int(round(self.vision.hidden_size / self.downsample_ratio**2))

    @classmethod
    def from_dict(cls, d: Any, source: str = "config.json") -> ModelConfig:
        _check(isinstance(d, dict), f"{source}: expected a JSON object at the top level")
        model_type = d.get("model_type", "internvl_chat")
        _check(
            model_type == "internvl_chat", f"{source}: model_type {model_type!r:.80} is not 'internvl_chat'"
        )
        try:
            vision = VisionConfig.from_dict(_require(d, "vision_config", source))
            llm = LLMConfig.from_dict(_require(d, "llm_config", source))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if "ps_version" not in d:
            log.warning(
                "%s: 'ps_version' is missing; using the class default 'v1' "
                "(the released V1-5 models use 'v2')",
                source,
            )
        if "select_layer" not in d:
            log.warning(
                "%s: 'select_layer' is missing; using the class default -1 "
                "(the V1-5-era class default was -4)",
                source,
            )
        hidden = d.get("hidden_size")
        _check(
            hidden is None or (type(hidden) is int and hidden == llm.hidden_size),
            f"{source}: hidden_size {hidden!r:.80} contradicts llm_config.hidden_size {llm.hidden_size}",
        )
        for key in ("use_backbone_lora", "use_llm_lora"):  # LoRA ranks, 0 = off
            rank = d.get(key, 0)
            _check(
                isinstance(rank, int) and not rank,
                f"{source}: {key} = {rank!r:.80}; LoRA checkpoints are not supported (merge them first; "
                "expected 0)",
            )
        try:
            return cls(
                vision=vision,
                llm=llm,
                select_layer=_get(d, "select_layer", -1),
                # null: the vision tower's own size, as the original.
                image_size=_get(d, "force_image_size", vision.image_size, none_is_default=True),
                downsample_ratio=_get(d, "downsample_ratio", 0.5),
                ps_version=_get(d, "ps_version", "v1"),
                template=_get(d, "template", "internlm2-chat", none_is_default=True),
                use_thumbnail=_get(d, "use_thumbnail", False),
                min_dynamic_patch=_get(d, "min_dynamic_patch", 1),
                max_dynamic_patch=_get(d, "max_dynamic_patch", 6),
                system_message=d.get("system_message"),
                torch_dtype=_get(d, "torch_dtype", "bfloat16"),
                quant=_quantization(d),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def load_config(folder: str | Path) -> ModelConfig:
    """Read ``folder/config.json`` into a validated :class:`ModelConfig`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a model folder needs config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return ModelConfig.from_dict(data, source=str(path))
