"""The command line and the built-in demo model."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import GOLDEN
from safetensors import safe_open

import pyvl
from pyvl.cli import main
from pyvl.demo import DEMO_NOTICE, demo_model_path

IMAGE = str(GOLDEN / "images" / "gradient_800x600.png")


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_demo_model_is_deterministic_and_in_released_format(tmp_path):
    a, b = demo_model_path(tmp_path / "a"), demo_model_path(tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == [
        "added_tokens.json",
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (a / shard).read_bytes() == (b / shard).read_bytes()
        with safe_open(str(a / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert demo_model_path(tmp_path / "a") == a  # second call reuses the folder
    model = pyvl.load(a, device="cpu")
    assert model.chat(None, "hi", dict(max_new_tokens=3)) == model.chat(None, "hi", dict(max_new_tokens=3))


def test_chat_one_shot_with_image_and_stats(demo_cache, capsys):
    assert (
        main(
            [
                "chat",
                "--image",
                IMAGE,
                "--max-num",
                "2",
                "--max-new-tokens",
                "5",
                "--stats",
                "Describe this image.",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert DEMO_NOTICE in err
    assert "time to first token" in err and "tokens/s" in err
    model = pyvl.load(demo_model_path(), device="cpu")
    pixels = pyvl.load_image(IMAGE, max_num=2)
    assert out == model.chat(pixels, "Describe this image.", dict(max_new_tokens=5)) + "\n"


def test_chat_two_images_get_separate_blocks(demo_cache, capsys):
    tall = str(GOLDEN / "images" / "tall_300x1000.png")
    assert (
        main(
            ["chat", "--image", IMAGE, "--image", tall, "--max-num", "1", "--max-new-tokens", "3", "Compare."]
        )
        == 0
    )
    model = pyvl.load(demo_model_path(), device="cpu")
    pixels = torch.cat([pyvl.load_image(IMAGE, max_num=1), pyvl.load_image(tall, max_num=1)])
    want = model.chat(
        pixels,
        "Image-1: <image>\nImage-2: <image>\nCompare.",
        dict(max_new_tokens=3),
        num_patches_list=[1, 1],
    )
    assert capsys.readouterr().out == want + "\n"


def test_interactive_multi_turn(demo_cache, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("First question?\nSecond one?\n"))
    assert main(["chat", "--image", IMAGE, "--max-num", "1", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = pyvl.load(demo_model_path(), device="cpu")
    pixels = pyvl.load_image(IMAGE, max_num=1)
    first, history = model.chat(pixels, "First question?", dict(max_new_tokens=4), return_history=True)
    second = model.chat(pixels, "Second one?", dict(max_new_tokens=4), history=history)
    assert lines == ["> " + first, "> " + second, "> "] or lines[:2] == ["> " + first, "> " + second]


def test_bad_image_gives_clean_error(demo_cache, capsys):
    assert main(["chat", "--image", "/nonexistent.png", "hi"]) == 2
    assert "nonexistent.png" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info", str(GOLDEN / "v15" / "checkpoint"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = pyvl.load(GOLDEN / "v15" / "checkpoint", device="cpu")
    total = sum(p.numel() for p in model.model.parameters())
    assert info["weights_memory_GiB"]["float32"] == round(total * 4 / 2**30, 3)
    assert "rms_norm" in info["vision"] and "v1" in info["projector"]
    assert main(["info", str(GOLDEN / "mini" / "checkpoint")]) == 0
    assert "parameters" in capsys.readouterr().out


def test_bench_preprocess_small(capsys):
    pytest.importorskip("pyvl.ops.native", reason="pyvl._C is not built")
    assert (
        main(
            ["bench", "preprocess", "--sizes", "640x320", "--max-nums", "2", "12", "--repeat", "1", "--json"]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [(r["image"], r["input"], r["max_num"]) for r in rows] == [
        ("640x320", "array", 2),
        ("640x320", "array", 12),
        ("640x320", "PIL", 12),
    ]  # PIL input at max_num 12
    assert rows[0]["tiles"] == 3 and rows[2]["tiles"] == rows[1]["tiles"]
    assert all(any(k.startswith("speedup") for k in row) for row in rows)
