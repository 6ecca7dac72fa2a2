"""AWQ checkpoints end to end: loading (the golden tiny models with random AWQ GEMM linears written by the
tests' own AutoAWQ packing), ``pyvl quantize``, and every refusal of a bad config or checkpoint."""

from __future__ import annotations

import json
import shutil

import awq_reference as autoawq
import pytest
import torch
from ckpt_files import edit_header
from conftest import GOLDEN
from safetensors.torch import load_file

import pyvl
from pyvl.cli import count_weights, main
from pyvl.config import load_config
from pyvl.errors import CheckpointError, ConfigError
from pyvl.loader import index_checkpoint
from pyvl.quant.linear import W4A16Linear
from pyvl.quantize import quantize_folder, quantize_weight

PROMPT = "Hello, who are you? Tell me a long story about a cat on a mat."
LINEAR = "language_model.model.layers.1.feed_forward.w2"


def _load(folder, **kwargs):
    return pyvl.load(folder, device="cpu", **({"dtype": "float32", "backend": "reference"} | kwargs))


@pytest.fixture(scope="module", params=["v15", "mini"])
def awq_pair(request, tmp_path_factory):
    """(variant, AWQ folder, its float32 twin holding the dequantized weights): the golden model's decoder
    linears quantized and packed by the tests' own AutoAWQ; groups of 32 divide both variants' 64 and
    128/160 inputs. v15 has 2 KV heads (so a wqkv regrouping missed on the packed tensors would show), mini 1."""
    root = tmp_path_factory.mktemp(f"awq_{request.param}")
    autoawq.write_awq_pair(GOLDEN / request.param / "checkpoint", root / "awq", root / "twin", 32)
    return request.param, root / "awq", root / "twin"


def test_awq_checkpoint_equals_its_dequantized_twin(awq_pair):
    """Bit for bit in float32: the packing order, zero points, scales, wqkv regrouping and w1/w3 stacking of
    the 4-bit path all land every weight where the float path puts it."""
    variant, awq_dir, twin_dir = awq_pair
    quantized, twin = _load(awq_dir), _load(twin_dir)
    layer = quantized.model.language_model.model.layers[0]
    assert isinstance(layer.attention.wqkv, W4A16Linear) and isinstance(layer.feed_forward.w13, W4A16Linear)
    assert not isinstance(quantized.model.language_model.output, W4A16Linear)  # the head stays float
    ids = quantized.tokenizer.encode(PROMPT)
    assert torch.equal(quantized.logits(ids), twin.logits(ids)), variant


def test_awq_triton_kernel_in_the_model(awq_pair):
    """bf16 through the W4A16 kernel (every op on Triton) vs the float32 twin: as close as bf16 reference."""
    variant, awq_dir, twin_dir = awq_pair
    ids = pyvl.load(twin_dir, device="cpu").tokenizer.encode(PROMPT)
    want = _load(twin_dir).logits(ids)
    kernel = _load(awq_dir, dtype="bfloat16", backend="triton")
    assert kernel.model.ops.backends["w4a16_linear"] == "triton"
    same_dtype = _load(awq_dir, dtype="bfloat16").logits(ids)
    err, base = (kernel.logits(ids) - want).norm() / want.norm(), (same_dtype - want).norm() / want.norm()
    assert err <= 2 * base + 1e-3, f"{variant}: triton {err:.3e} vs bf16 reference {base:.3e}"


def test_expected_shapes_equal_the_built_awq_model(awq_pair):
    from pyvl.models.vlm import InternVLChatModel
    from pyvl.ops import resolve_ops
    from pyvl.quant.awq import checkpoint_shape
    from pyvl.shapes import expected_shapes

    cfg = load_config(awq_pair[1])
    with torch.device("meta"):
        model = InternVLChatModel(cfg, resolve_ops())
    built = {k: checkpoint_shape(k, tuple(v.shape)) for k, v in model.state_dict().items()}
    assert expected_shapes(cfg) == built
    assert {k: tuple(t.shape) for k, t in load_file(awq_pair[1] / "model.safetensors").items()} == built


@pytest.mark.parametrize("variant", ["v15", "mini"])
def test_pyvl_quantize_writes_the_rounded_weights(variant, tmp_path):
    src = GOLDEN / variant / "checkpoint"
    dst = quantize_folder(src, tmp_path / "q", group_size=32, max_shard_bytes=100_000)  # several shards
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1 and (dst / "tokenizer.model").is_file()
    config = json.loads((dst / "config.json").read_text())
    assert config["llm_config"]["quantization_config"] == autoawq.awq_config(32)
    source = {}
    for path in src.glob("*.safetensors"):
        source.update(load_file(path))
    written = {}
    for path in dst.glob("*.safetensors"):
        written.update(load_file(path))
    from pyvl.ops.reference import dequantize_w4

    linears = [k.removesuffix(".qweight") for k in written if k.endswith(".qweight")]
    assert len(linears) == 5 * load_config(src).llm.num_hidden_layers
    for prefix in linears:  # AutoAWQ's reading of the file == the rounding of the source weight
        got = autoawq.dequantize(*(written[f"{prefix}.{a}"] for a in ("qweight", "qzeros", "scales")))
        assert torch.equal(got, dequantize_w4(*quantize_weight(source[prefix + ".weight"], 32))), prefix
    untouched = [k for k in source if not k.startswith("language_model.model.layers") or "norm" in k]
    assert all(torch.equal(written[k], source[k]) for k in untouched)
    quantized, original = _load(dst), _load(src)
    ids = original.tokenizer.encode(PROMPT)
    got, ref = quantized.logits(ids), original.logits(ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"{variant}: logits rel diff {rel:.3f}, top-1 agreement {agree:.2f} over {len(ids)} positions")


def test_pyvl_quantize_command(tmp_path, capsys):
    src = GOLDEN / "mini" / "checkpoint"
    assert main(["quantize", str(src), str(tmp_path / "q"), "--group-size", "32"]) == 0
    assert "group size 32" in capsys.readouterr().out
    assert main(["quantize", str(src), str(tmp_path / "q2"), "--group-size", "128"]) == 2  # 128 > hidden 64
    err = capsys.readouterr().err
    assert err.startswith("pyvl: error:") and "group_size = 128" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # nothing half-written left behind


def test_info_counts_the_4_bit_weights(awq_pair, capsys):
    _, awq_dir, twin_dir = awq_pair
    assert main(["info", str(awq_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["info", str(twin_dir), "--json"]) == 0
    assert info["parameters"] == json.loads(capsys.readouterr().out)["parameters"]  # 8 weights a word
    _, float_numel, packed_bytes = count_weights(index_checkpoint(awq_dir))
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        held = sum(p.numel() * p.element_size() for p in _load(awq_dir, dtype=dtype).model.parameters())
        assert float_numel * size + packed_bytes == held, dtype
    assert info["quantization"] == "AWQ GEMM 4-bit decoder linears, group size 32"


def test_pyvl_quantize_refusals(tmp_path):
    src = GOLDEN / "mini" / "checkpoint"
    with pytest.raises(ConfigError, match="already exists"):
        quantize_folder(src, tmp_path)
    with pytest.raises(ConfigError, match="no such folder"):
        quantize_folder(src, tmp_path / "missing" / "q")
    with pytest.raises(ConfigError, match="multiple of 16"):
        quantize_folder(src, tmp_path / "q", group_size=24)
    done = quantize_folder(src, tmp_path / "q", group_size=32)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_folder(done, tmp_path / "qq", group_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.fixture
def awq_folder(awq_pair, tmp_path):
    """A writable copy of the AWQ folder, to damage."""
    dst = tmp_path / "awq"
    shutil.copytree(awq_pair[1], dst)
    return dst


def _edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("bits", 8, "bits = 8: pyvl reads 4-bit AWQ only"),
        ("group_size", 100, "group_size = 100: expected -1 or a positive multiple of 16"),
        ("group_size", 48, "group_size = 48: llm_config hidden_size 64"),
        ("group_size", "32", "group_size = '32': expected an integer"),
        ("zero_point", False, "zero_point = False: expected true"),
        ("version", "gemv", "version = 'gemv': pyvl reads the AWQ GEMM packing only"),
        ("quant_method", "gptq", "quant_method = 'gptq'"),
        ("modules_to_not_convert", ["feed_forward"], "partly quantized decoders are not supported"),
    ],
)
def test_bad_quantization_config(awq_folder, key, value, match):
    _edit_config(awq_folder, lambda c: c["llm_config"]["quantization_config"].__setitem__(key, value))
    with pytest.raises(ConfigError, match=match) as info:
        _load(awq_folder)
    assert "config.json" in str(info.value)


def test_quantization_config_in_either_place(awq_folder):
    def to_top(c):
        c["quantization_config"] = c["llm_config"].pop("quantization_config")

    _edit_config(awq_folder, to_top)
    assert load_config(awq_folder).quant.group_size == 32
    _edit_config(
        awq_folder, lambda c: c["llm_config"].__setitem__("quantization_config", autoawq.awq_config(64))
    )
    with pytest.raises(ConfigError, match="disagree"):
        load_config(awq_folder)
    _edit_config(awq_folder, lambda c: c["quantization_config"].pop("group_size"))
    with pytest.raises(ConfigError, match="'group_size' is missing"):
        load_config(awq_folder)


def test_awq_config_over_a_float_checkpoint(tmp_path):
    """A config that says awq, over weights that are not: every linear is named, nothing is built."""
    folder = tmp_path / "model"
    shutil.copytree(GOLDEN / "mini" / "checkpoint", folder)
    _edit_config(folder, lambda c: c["llm_config"].__setitem__("quantization_config", autoawq.awq_config(32)))
    with pytest.raises(CheckpointError) as info:
        _load(folder)
    message = str(info.value)
    assert "30 missing" in message and f"{LINEAR}.qweight" in message
    assert "10 unexpected" in message and f"{LINEAR}.weight" in message


def test_awq_tensors_without_a_quantization_config(awq_folder):
    _edit_config(awq_folder, lambda c: c["llm_config"].pop("quantization_config"))
    with pytest.raises(CheckpointError, match="4-bit AWQ tensors .* no quantization_config"):
        _load(awq_folder)


def _set_entry(folder, key, dtype=None, shape=None):
    def edit(header, data):
        entry = header[key]
        if dtype is not None:  # same byte size: the data section still adds up
            entry["dtype"] = dtype
        if shape is not None:
            entry["shape"] = shape

    edit_header(folder / "model.safetensors", edit)


@pytest.mark.parametrize(
    "attr, dtype, shape, match",
    [
        (
            "qweight",
            "F32",
            None,
            r"1 not packed int32:\n    .*w2\.qweight: F32 in model\.safetensors, expected I32",
        ),
        ("qzeros", "U8", "quarter", r"not packed int32:\n    .*w2\.qzeros: U8"),
        ("scales", "I16", None, r"not a float dtype:\n    .*w2\.scales: I16"),
        (
            "qweight",
            None,
            "transposed",
            r"wrong shape:\n    .*w2\.qweight: checkpoint \[\d+, \d+\], model expects",
        ),
    ],
)
def test_bad_packed_tensors(awq_folder, attr, dtype, shape, match):
    key = f"{LINEAR}.{attr}"
    info = load_file(awq_folder / "model.safetensors")[key]
    new_shape = {"transposed": list(info.shape[::-1]), "quarter": [info.shape[0], info.shape[1] * 4]}.get(
        shape
    )
    _set_entry(awq_folder, key, dtype, new_shape)
    with pytest.raises(CheckpointError, match=match):
        _load(awq_folder)


def test_awq_presets_for_the_benchmarks():
    """`pyvl bench e2e --preset internvl-chat-v1-5-awq --random-weights`: the V1-5 shapes with 4-bit
    linears (built on meta, as the loader checks them), and random 4-bit weights that run (tiny preset)."""
    from pyvl.bench.presets import chat_on, parameter_count, preset_config, preset_dict, random_model
    from pyvl.config import ModelConfig
    from pyvl.models.vlm import InternVLChatModel
    from pyvl.ops import reference, resolve_ops
    from pyvl.quant.awq import checkpoint_shape
    from pyvl.shapes import expected_shapes

    cfg = preset_config("internvl-chat-v1-5-awq")
    assert cfg.quant.group_size == 128 and parameter_count(cfg) == parameter_count(
        preset_config("internvl-chat-v1-5")
    )
    with torch.device("meta"):
        model = InternVLChatModel(cfg, resolve_ops())
    assert expected_shapes(cfg) == {
        k: checkpoint_shape(k, tuple(v.shape)) for k, v in model.state_dict().items()
    }
    tiny = preset_dict("tiny")
    tiny["llm_config"]["quantization_config"] = autoawq.awq_config(32)
    model = random_model(ModelConfig.from_dict(tiny), "cpu", torch.float32, backend="reference")
    w13 = model.language_model.model.layers[0].feed_forward.w13
    weight = reference.dequantize_w4(w13.qweight, w13.qzeros, w13.scales)
    assert isinstance(w13, W4A16Linear) and 0.015 < weight.std() < 0.025  # as the float presets' N(0, 0.02)
    assert torch.isfinite(chat_on(model).logits([1, 5, 6, 7])).all()
