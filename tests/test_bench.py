"""``pyvl bench kernels`` / ``pyvl bench e2e``: presets at the spec's sizes, the CPU path of e2e, the CUDA gate.

Timings are never asserted (they are only checked to be positive numbers); the GPU figures are measured by
running the commands on a GPU machine.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from pyvl.bench import e2e
from pyvl.bench.presets import PRESETS, parameter_count, preset_config, random_model
from pyvl.cli import main
from pyvl.demo import ASSETS
from pyvl.tokenizer import Tokenizer

# Spec section 1: (vision layers, width, heads, MLP, norm, qkv bias, qk norm; LLM layers, width, heads, kv heads, FFN)
SPEC = {
    "internvl-chat-v1-5": ((45, 3200, 25, 12800, "rms_norm", False, True), (48, 6144, 48, 8, 16384)),
    "mini-internvl-chat-2b-v1-5": ((24, 1024, 16, 4096, "layer_norm", True, False), (24, 2048, 16, 8, 8192)),
}
E2E_KEYS = {"key", "figure", "unit", "pyvl"}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_presets_have_the_spec_dimensions(name):
    cfg = preset_config(name)
    v, lm = cfg.vision, cfg.llm
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size, v.norm_type, v.qkv_bias,
            v.qk_normalization) == SPEC[name][0]
    assert (lm.num_hidden_layers, lm.hidden_size, lm.num_attention_heads, lm.num_key_value_heads,
            lm.intermediate_size) == SPEC[name][1]
    assert (lm.vocab_size, lm.max_position_embeddings, lm.rope_theta, lm.rms_norm_eps) == (92553, 32768, 1e6, 1e-5)
    assert (lm.rope_scaling_type, lm.rope_scaling_factor) == ("dynamic", 2.0)  # as the measured HF baseline
    assert (cfg.ps_version, cfg.image_size, cfg.num_image_token, cfg.select_layer, lm.bias) == ("v2", 448, 256, -1,
                                                                                               False)
    assert v.head_dim == (128 if name == "internvl-chat-v1-5" else 64) and lm.head_dim == 128


def test_preset_parameter_counts_on_meta():
    v15 = parameter_count(preset_config("internvl-chat-v1-5"))
    mini = parameter_count(preset_config("mini-internvl-chat-2b-v1-5"))
    assert round(v15["total"] / 1e9, 1) == 25.5  # shared/measurements: 25.5 B
    assert round(v15["vision_model"] / 1e9, 2) == 5.54 and round(v15["language_model"] / 1e9, 2) == 19.86
    assert round(mini["total"] / 1e9, 1) == 2.2  # 4.41 GB of bf16 (spec 1.2)
    assert round(mini["total"] * 2 / 1e9, 2) == 4.41
    assert round(mini["vision_model"] / 1e6) == 304 and round(mini["language_model"] / 1e9, 2) == 1.89
    assert set(PRESETS) == {"internvl-chat-v1-5", "mini-internvl-chat-2b-v1-5", "tiny"}


def test_random_model_is_materialised_in_the_asked_dtype():
    model = random_model(preset_config("tiny"), "cpu", torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 and not p.requires_grad for p in params.values())
    assert torch.all(params["language_model.model.norm.weight"] == 1)
    assert torch.all(params["vision_model.encoder.layers.0.norm1.bias"] == 0)
    assert torch.all(params["mlp1.0.weight"] == 1)
    w = params["language_model.output.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    with torch.inference_mode():
        feats = model.extract_feature(torch.randn(1, 3, 448, 448))
    assert feats.shape == (1, 256, 128) and torch.isfinite(feats).all()


@pytest.mark.parametrize("tiles,text", [(1, 70), (13, 70), (2, 0)])
def test_build_prompt_counts_tokens(tiles, text):
    tokenizer = Tokenizer.from_folder(ASSETS)
    ids = e2e.build_prompt(tokenizer, tiles, text, 256)
    n_image = sum(i == tokenizer.img_context_id for i in ids)
    assert n_image == tiles * 256 and max(ids) < len(tokenizer)
    minimum = len(e2e.build_prompt(tokenizer, tiles, 0, 256)) - n_image
    assert len(ids) - n_image == max(text, minimum)
    if tiles == 13:
        assert len(ids) == 3398  # ~3,400 tokens, the prompt of the targets


def test_bench_e2e_tiny_on_cpu_json(capsys):
    code = main(["bench", "e2e", "--preset", "tiny", "--random-weights", "--device", "cpu", "--dtype", "float32",
                 "--tiles", "1", "2", "--prompt-tokens", "20", "--decode-tokens", "3", "--repeat", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"preprocess", "vision_1", "vision_2", "prefill", "ttft", "decode", "peak_memory"}
    for row in rows.values():
        assert set(row) == E2E_KEYS  # no HF columns on the CPU
        assert isinstance(row["pyvl"], float) and row["pyvl"] > 0, row
    assert rows["decode"]["unit"] == "ms/token" and rows["peak_memory"]["unit"] == "GB"
    setup = result["setup"]
    assert (setup["preset"], setup["device"], setup["dtype"], setup["tiles"]) == ("tiny", "cpu", "float32", [1, 2])
    assert setup["prompt_tokens"] == 2 * 256 + setup["text_tokens"]
    assert setup["ops"]["vit_attention"] == "reference"  # backend auto on the CPU
    assert len(result["notes"]) == 1 and "HF comparison" in result["notes"][0]


def test_bench_e2e_table_and_flags(capsys):
    code = main(["bench", "e2e", "--preset", "tiny", "--random-weights", "--device", "cpu", "--tiles", "1",
                 "--prompt-tokens", "0", "--decode-tokens", "2", "--repeat", "1", "--no-hf"])
    out = capsys.readouterr().out
    assert code == 0
    assert "vision + projector, 1 tile" in out and "ms/token" in out and "note: HF comparison not asked" in out
    assert main(["bench", "e2e", "--preset", "tiny", "--device", "cpu"]) == 2  # no --random-weights
    assert "--random-weights" in capsys.readouterr().err
    assert main(["bench", "e2e", "--preset", "tiny", "--random-weights", "--decode-tokens", "1"]) == 2
    assert "--decode-tokens >= 2" in capsys.readouterr().err


def test_hf_comparison_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as when it is not installed
    assert "not installed" in e2e._hf_unavailable(torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    assert "CUDA only" in e2e._hf_unavailable(torch.device("cpu"))
    assert e2e._hf_unavailable(torch.device("cuda")) is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_model_has_the_same_size(name):
    transformers = pytest.importorskip("transformers")
    cfg = preset_config(name)
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(e2e._hf_config(cfg, 1002))
    hf = sum(p.numel() for p in model.parameters())
    ours = parameter_count(cfg)["total"]
    assert abs(hf - ours) <= 2 * cfg.vision.hidden_size  # HF adds a final vision LayerNorm (weight + bias)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_bench_kernels_needs_cuda(capsys):
    assert main(["bench", "kernels"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err
