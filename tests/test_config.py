"""config.json validation: every kept value has a type and a range, checked before anything is built."""

from __future__ import annotations

import copy
import json
import math

import pytest
from conftest import GOLDEN

from pyvl.config import LIMITS, LLMConfig, ModelConfig, load_config
from pyvl.errors import ConfigError

BASE = json.loads((GOLDEN / "v15" / "checkpoint" / "config.json").read_text())


def parse(edit):
    d = copy.deepcopy(BASE)
    edit(d)
    return ModelConfig.from_dict(d)


def setter(path: str, value):
    *sections, key = path.split(".")

    def edit(d):
        for s in sections:
            d = d[s]
        d[key] = value

    return edit


def test_the_golden_and_preset_configs_pass():
    from pyvl.bench.presets import PRESETS, preset_config

    for variant in ("v15", "mini"):
        load_config(GOLDEN / variant / "checkpoint")
    for name in PRESETS:
        preset_config(name)


# (key, bad value, fragment the message must hold besides the key and value)
BAD_VALUES = [
    ("llm_config.rope_theta", 0, "(0, 1e+12]"),
    ("llm_config.rope_theta", -1.0, "(0, 1e+12]"),
    ("llm_config.rope_theta", True, "expected a number"),
    ("llm_config.rope_theta", "64", "expected a number"),
    ("llm_config.rope_theta", math.inf, "finite"),
    ("llm_config.rope_theta", math.nan, "finite"),
    ("llm_config.rms_norm_eps", -1, "(0, 0.01]"),
    ("llm_config.rms_norm_eps", 0.0, "(0, 0.01]"),
    ("llm_config.rms_norm_eps", 0.5, "(0, 0.01]"),
    ("vision_config.layer_norm_eps", 0, "(0, 0.01]"),
    ("llm_config.max_position_embeddings", -1, "[1, 4194304]"),
    ("llm_config.max_position_embeddings", 10**12, "[1, 4194304]"),
    ("llm_config.max_position_embeddings", 1e12, "expected an integer"),
    ("llm_config.num_hidden_layers", 10**6, "[1, 1024]"),
    ("llm_config.num_hidden_layers", 1.5, "expected an integer"),
    ("llm_config.num_hidden_layers", 2.0, "expected an integer"),
    ("llm_config.num_hidden_layers", True, "expected an integer"),
    ("llm_config.num_hidden_layers", "2", "expected an integer"),
    ("llm_config.num_hidden_layers", 0, "[1, 1024]"),
    ("llm_config.hidden_size", 2**17, "[1, 65536]"),
    ("llm_config.vocab_size", 2**21, "[1, 1048576]"),
    ("llm_config.intermediate_size", -128, "[1, 262144]"),
    ("llm_config.num_key_value_heads", 0, "[1, 1024]"),
    ("llm_config.bos_token_id", 1009, "[0, 1008]"),
    ("llm_config.eos_token_id", -1, "[0, 1008]"),
    ("llm_config.pad_token_id", "2", "expected an integer"),
    ("llm_config.bias", "false", "JSON boolean"),
    ("llm_config.bias", 0, "JSON boolean"),
    ("llm_config.tie_word_embeddings", "no", "JSON boolean"),
    ("llm_config.rope_scaling.factor", 0.5, "[1, 1024]"),
    ("llm_config.rope_scaling.factor", "2", "expected a number"),
    ("llm_config.rope_scaling.factor", math.inf, "finite"),
    ("vision_config.patch_size", False, "expected an integer"),
    ("vision_config.patch_size", 0, "[1, 4480]"),
    ("vision_config.image_size", 448000, "[1, 4480]"),
    ("vision_config.num_channels", 4, "[3, 3]"),
    ("vision_config.qkv_bias", "false", "JSON boolean"),
    ("vision_config.qk_normalization", 1, "JSON boolean"),
    ("vision_config.norm_type", ["rms_norm"], "'rms_norm', 'layer_norm'"),
    ("vision_config.num_hidden_layers", 1e6, "expected an integer"),
    ("force_image_size", 448000, "[1, 4480]"),
    ("force_image_size", "448", "expected an integer"),
    ("select_layer", -9, "[-4, 3]"),
    ("select_layer", 4, "[-4, 3]"),
    ("select_layer", -1.0, "expected an integer"),
    ("downsample_ratio", 0, "(0, 1]"),
    ("downsample_ratio", "0.5", "expected a number"),
    ("use_thumbnail", "true", "JSON boolean"),
    ("min_dynamic_patch", 0, "[1, 256]"),
    ("max_dynamic_patch", 10**9, "[1, 256]"),
    ("ps_version", "v3", "'v1', 'v2'"),
    ("template", "phi3-chat", "'internlm2-chat'"),
    ("torch_dtype", "int8", "'bfloat16'"),
]


@pytest.mark.parametrize("key, value, expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_key_value_and_range(key, value, expected):
    with pytest.raises(ConfigError) as err:
        parse(setter(key, value))
    msg = str(err.value)
    assert f"{key} = {value!r}" in msg or f"{key} = {value}" in msg, msg
    assert expected in msg, msg


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("llm_config"), "required key 'llm_config'"),
        (lambda c: c["vision_config"].pop("hidden_size"), "vision_config: required key 'hidden_size'"),
        (lambda c: c["llm_config"].pop("vocab_size"), "llm_config: required key 'vocab_size'"),
        (lambda c: c.update(vision_config=[1, 2]), "vision_config: expected a JSON object"),
        (lambda c: c.update(hidden_size=65), "hidden_size 65 contradicts"),
        (lambda c: c.update(hidden_size=64.0), "hidden_size 64.0 contradicts"),
        (lambda c: c["llm_config"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
        (lambda c: c["llm_config"].update(num_attention_heads=3), "not divisible by num_attention_heads 3"),
        (
            lambda c: c["llm_config"].update(hidden_size=12, num_attention_heads=4, num_key_value_heads=4),
            "head_dim .* = 3 must be even",
        ),
        (
            lambda c: c["vision_config"].update(num_attention_heads=5),
            "not divisible by num_attention_heads 5",
        ),
        (
            lambda c: c["vision_config"].update(image_size=450),
            "image_size 450 is not a multiple of patch_size 14",
        ),
        (lambda c: c.update(force_image_size=450), "force_image_size = 450: not a multiple of"),
        (lambda c: c.update(downsample_ratio=0.3), "downsample_ratio = 0.3: does not divide"),
        (lambda c: c.update(min_dynamic_patch=7, max_dynamic_patch=6), "min must be <= max"),
        (
            lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 2.0}),
            "rope_scaling type 'yarn'",
        ),
        (lambda c: c["llm_config"].update(rope_scaling=2.0), "must be an object"),
        (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]), "InternLM2ForCausalLM only"),
        (lambda c: c["llm_config"].update(hidden_act="gelu"), "hidden_act = 'gelu'"),
        (lambda c: c.update(use_llm_lora=8), "use_llm_lora = 8; LoRA"),
        (lambda c: c.update(use_backbone_lora="0"), "use_backbone_lora = '0'"),
        (lambda c: c.update(system_message=5), "system_message = 5"),
        (lambda c: c.update(model_type="llava"), "model_type 'llava'"),
    ],
)
def test_structural_errors(edit, match):
    with pytest.raises(ConfigError, match=match):
        parse(edit)


def test_defaults_and_nulls_the_original_treats_as_defaults():
    cfg = parse(
        lambda c: (
            c.update(force_image_size=None),
            c["llm_config"].update(num_key_value_heads=None, pad_token_id=None),
        )
    )
    assert cfg.image_size == cfg.vision.image_size and cfg.llm.pad_token_id == 2
    assert cfg.llm.num_key_value_heads == cfg.llm.num_attention_heads
    cfg = parse(lambda c: c["llm_config"].update(rope_theta=1000000))  # a JSON int is a fine float
    assert isinstance(cfg.llm.rope_theta, float) and cfg.llm.rope_theta == 1e6


def test_null_where_a_value_is_needed_is_refused():
    with pytest.raises(ConfigError, match=r"llm_config.rope_theta = None: expected a number"):
        parse(setter("llm_config.rope_theta", None))


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="llm_config.num_hidden_layers = 1000000"):
        LLMConfig(
            hidden_size=64,
            intermediate_size=8,
            num_hidden_layers=10**6,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=10,
            max_position_embeddings=512,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
        )


def test_ceilings_stay_above_the_released_models():
    from pyvl.bench.presets import preset_dict

    big = preset_dict("internvl-chat-v1-5")
    assert 10 * big["llm_config"]["num_hidden_layers"] < LIMITS["layers"]
    assert 10 * big["llm_config"]["hidden_size"] < LIMITS["width"]
    assert 10 * big["llm_config"]["vocab_size"] < LIMITS["vocab"]
    assert 10 * big["llm_config"]["max_position_embeddings"] < LIMITS["positions"]
    assert 10 * big["force_image_size"] <= LIMITS["image_size"]


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(tmp_path)


def test_error_names_the_file(tmp_path):
    d = copy.deepcopy(BASE)
    d["llm_config"]["rope_theta"] = 0
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config.json: llm_config.rope_theta = 0"):
        load_config(tmp_path)


def test_missing_ps_version_warns_and_uses_class_default(caplog):
    with caplog.at_level("WARNING", logger="pyvl"):
        cfg = parse(lambda c: (c.pop("ps_version"), c.pop("select_layer")))
    assert cfg.ps_version == "v1" and cfg.select_layer == -1
    assert "ps_version" in caplog.text and "select_layer" in caplog.text
