"""Every argument of the public API is checked: bad types and ranges give a PyvlError naming the argument."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from conftest import GOLDEN, golden_cases, loaded_model

import pyvl
from pyvl import checks
from pyvl.errors import CheckpointError, ConfigError, PromptError
from pyvl.generation_config import GenerationConfig

CHECKPOINT = GOLDEN / "v15" / "checkpoint"
TALL = GOLDEN / "images" / "tall_300x1000.png"


@pytest.fixture(scope="module")
def model():
    return loaded_model("v15")


@pytest.fixture(scope="module")
def pixels():
    return pyvl.load_image(TALL, max_num=6)  # 4 tiles


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("max_new_tokens", 1.5, "max_new_tokens=1.5: expected an integer"),
        ("max_new_tokens", -1, "max_new_tokens=-1"),
        ("max_new_tokens", "8", "max_new_tokens='8'"),
        ("max_new_tokens", True, "max_new_tokens=True"),
        ("do_sample", "no", "do_sample='no': expected True or False"),
        ("do_sample", 1, "do_sample=1"),
        ("temperature", "0.7", "temperature='0.7': expected a finite number"),
        ("temperature", float("inf"), "temperature=inf"),
        ("temperature", 0, "temperature=0"),
        ("top_k", 2.0, "top_k=2.0"),
        ("top_p", float("nan"), "top_p=nan"),
        ("top_p", 1.01, "top_p=1.01"),
        ("repetition_penalty", -1.0, "repetition_penalty=-1.0"),
        ("seed", 2**64, "seed=18446744073709551616: expected an integer in 0..9223372036854775807"),
        ("seed", -1, "seed=-1"),
        ("seed", 1.0, "seed=1.0"),
        ("eos_token_id", [2, 3.5], "eos_token_id=3.5"),
        ("eos_token_id", [], "eos_token_id"),
        ("num_beams", "1", "num_beams='1'"),
        ("n", 0, "n=0: expected an integer in 1..1024"),
        ("n", "2", "n='2'"),
        ("logprobs", "yes", "logprobs='yes'"),
        ("top_logprobs", 50, "top_logprobs=50: expected an integer in 0..20"),
        ("top_logprobs", 2, "top_logprobs=2 needs logprobs=True"),
        ("presence_penalty", 5, "presence_penalty=5"),
        ("frequency_penalty", "x", "frequency_penalty='x'"),
        ("logit_bias", {5: 101}, "logit_bias"),
        ("logit_bias", {"a": 1}, "logit_bias"),
        ("logit_bias", [1], "logit_bias"),
        ("json_schema", 5, "json_schema: a JSON schema is an object"),
        ("json_schema", "{not json", "json_schema: not valid JSON"),
        ("regex", "", "regex: expected a non-empty str"),
    ],
)
def test_generation_config_types_and_ranges(model, key, value, match):
    with pytest.raises(ConfigError, match=match):
        GenerationConfig.from_user({key: value})
    with pytest.raises(ConfigError, match=key):
        model.chat(None, "hi", {key: value})


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"logit_bias": {99999: 1}}, "logit_bias: token ids \\[99999\\] are outside the vocabulary"),
        ({"json_schema": {"type": "nonsense"}}, "json_schema is invalid: Invalid type: nonsense"),
        ({"regex": "[a-"}, "generation_config regex"),
        ({"grammar": "start: x"}, "generation_config grammar is invalid: .*unknown name"),
    ],
)
def test_what_only_the_model_can_check_is_refused_when_it_is_asked(model, settings, match):
    """Token ids against its vocabulary, a grammar compiled against its tokens."""
    GenerationConfig.from_user(settings)
    with pytest.raises(ConfigError, match=match):
        model.chat(None, "hi", settings)


def test_generation_config_takes_numpy_scalars_as_python_numbers():
    cfg = GenerationConfig.from_user(
        dict(
            max_new_tokens=np.int64(3),
            temperature=np.float32(0.5),
            eos_token_id=7,
            seed=2**63 - 1,
            do_sample=np.bool_(True),
        )
    )
    assert (type(cfg.max_new_tokens), type(cfg.temperature), type(cfg.do_sample)) == (int, float, bool)
    assert cfg.eos_token_id == (7,) and cfg.seed == 2**63 - 1
    with pytest.raises(ConfigError, match="keys must be strings"):
        GenerationConfig.from_user({1: 2})


def test_largest_seed_samples(model):
    gen = dict(do_sample=True, seed=2**63 - 1, max_new_tokens=3)
    assert model.chat(None, "hi", gen) == model.chat(None, "hi", gen)


@pytest.mark.parametrize(
    "question, match",
    [
        (None, "question must be a str, got NoneType"),
        (b"hi", "question must be a str, got bytes"),
        ("hi \ud800 there", r"question holds '\\ud800' at index 3, a lone surrogate"),
    ],
)
def test_question_must_be_text(model, question, match):
    for call in (
        lambda: model.chat(None, question),
        lambda: list(model.stream(None, question)),
        lambda: model.build_query(question),
    ):
        with pytest.raises(PromptError, match=match):
            call()


def test_history_and_flags(model):
    with pytest.raises(PromptError, match="history must be a list"):
        model.chat(None, "hi", history="earlier")
    with pytest.raises(PromptError, match=r"history\[0\] answer holds"):
        model.chat(None, "hi", history=[("q", "a\udfff")])
    with pytest.raises(PromptError, match=r"history\[1\] must be a \(question, answer\) pair"):
        model.chat(None, "hi", history=[("q", "a"), ("q",)])
    with pytest.raises(PromptError, match="return_history='yes'"):
        model.chat(None, "hi", dict(max_new_tokens=1), return_history="yes")
    with pytest.raises(PromptError, match="system_message must be a str"):
        model.build_query("hi", system_message=3)


def test_num_patches_list_is_not_truncated(model, pixels):
    with pytest.raises(PromptError, match=r"num_patches_list\[0\]=1.9: expected an integer >= 1, got float"):
        model.chat(pixels[:2], "<image> <image>", num_patches_list=[1.9, 1.1])
    with pytest.raises(PromptError, match=r"num_patches_list\[1\]=0"):
        model.chat(pixels, "<image> <image>", num_patches_list=[4, 0])
    with pytest.raises(PromptError, match="num_patches_list must be a list"):
        model.chat(pixels, "hi", num_patches_list=4)
    with pytest.raises(PromptError, match=r"num_patches_list\[0\]=True"):
        model.build_query("<image>", [True])


def test_more_placeholders_than_images_is_refused(model, pixels):
    with pytest.raises(
        PromptError,
        match=r"has 3 '<image>' placeholder\(s\) but 2 image\(s\) .* exactly one "
        r"placeholder per image: pyvl refuses placeholders beyond the images "
        r"\(the original chat\(\) expands the first 2 and keeps the rest as "
        r"plain text\)",
    ):
        model.chat(pixels, "<image> <image> <image>", num_patches_list=[1, 3])
    with pytest.raises(
        PromptError, match="has 1 '<image>' placeholder.* every image needs its own placeholder"
    ):
        model.chat(pixels, "Image-1: <image>", num_patches_list=[1, 3])
    assert model.build_query("<image> <image>").count("<image>") == 2  # text only: placeholders stay text


def test_batch_chat_refuses_a_string_for_the_questions(model):
    with pytest.raises(
        PromptError, match="questions must be a list of str .* got str; wrap a single question"
    ):
        model.batch_chat(None, "hello")
    with pytest.raises(PromptError, match=r"questions\[1\] must be a str, got int"):
        model.batch_chat(None, ["hello", 5])
    with pytest.raises(PromptError, match="at least one question"):
        model.batch_chat(None, [])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64, torch.complex64])
def test_pixel_values_must_be_floating(model, pixels, dtype):
    with pytest.raises(PromptError, match=f"pixel_values has dtype {dtype}"):
        model.chat(pixels.to(dtype), "hi")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30, -101.0])
def test_pixel_values_must_be_finite_and_bounded(model, pixels, value):
    bad = pixels.clone()
    bad[1, 2, 3, 4] = value
    for call in (
        lambda: model.chat(bad, "hi"),
        lambda: model.extract_feature(bad),
        lambda: model.generate([1, 2], bad),
    ):
        with pytest.raises(
            PromptError, match=r"pixel_values holds 1 value\(s\) that are not finite or exceed 100"
        ):
            call()
    edge = pixels.clone()
    edge[0, 0, 0, 0] = -checks.PIXEL_VALUE_BOUND  # the bound itself is allowed
    assert model.extract_feature(edge).isfinite().all()


def test_pixel_values_on_another_device(model, pixels):
    with pytest.raises(PromptError, match="pixel_values is on meta; expected a CPU or CUDA tensor"):
        model.chat(pixels.to("meta"), "hi")
    if (
        torch.cuda.is_available()
    ):  # a CUDA tensor for a CPU model (or the reverse) is copied to the model's device
        gen = dict(max_new_tokens=3)
        assert model.chat(pixels.cuda(), "hi", gen) == model.chat(pixels, "hi", gen)
    assert model.chat(pixels.double(), "hi", dict(max_new_tokens=3)) == model.chat(
        pixels, "hi", dict(max_new_tokens=3)
    )


@pytest.mark.parametrize(
    "ids, match",
    [
        ([], "at least one token"),
        ([[]], "at least one token"),
        ([[1, 2], []], "at least one token"),
        ([1, -1], r"input_ids\[1\]=-1: expected an integer in 0..1008"),
        ([1, 1009], r"input_ids\[1\]=1009"),
        ([[1, 2], [3, 10**6]], r"input_ids\[1\]\[1\]=1000000"),
        ([1, 2.5], r"input_ids\[1\]=2.5: expected an integer in 0..1008, got float"),
        ([1, True], r"input_ids\[1\]=True"),
        ("hello", "must be a list of token ids"),
        (torch.tensor([1.0, 2.0]), "must hold integer token ids"),
        (torch.ones(1, 1, 2, dtype=torch.long), "must hold integer token ids"),
    ],
)
def test_generate_and_logits_token_ids(model, ids, match):
    with pytest.raises(PromptError, match=match):
        model.generate(ids, None, dict(max_new_tokens=1))
    with pytest.raises(PromptError, match=match):
        model.logits(ids)


def test_token_ids_as_tensors_and_arrays(model):
    gen = dict(max_new_tokens=3)
    want = model.generate([1, 2, 3], None, gen)
    assert torch.equal(model.generate(torch.tensor([[1, 2, 3]]), None, gen), want)
    assert torch.equal(model.generate(np.array([1, 2, 3], dtype=np.int32), None, gen), want)
    assert torch.equal(model.logits(torch.tensor([1, 2, 3])), model.logits([1, 2, 3]))
    vocab = model.config.llm.vocab_size
    assert model.logits([0, vocab - 1]).shape == (2, vocab)  # both ends of the vocabulary are accepted
    with pytest.raises(PromptError, match="output_scores='yes'"):
        model.generate([1, 2], None, gen, output_scores="yes")


def test_kv_cache_bytes_is_what_the_pool_allocates(model):
    llm, cache = model.config.llm, model.engine.cache
    assert (
        checks.kv_cache_bytes(
            llm.num_hidden_layers,
            llm.num_key_value_heads,
            llm.head_dim,
            cache.num_blocks * cache.block_size,
            1,
            model.dtype,
        )
        == cache.nbytes
    )


def test_a_cache_larger_than_free_memory_is_refused_before_allocating(monkeypatch):
    import pyvl.kv_cache

    probe = pyvl.load(CHECKPOINT, device="cpu", kv_cache_gb=0.001)
    llm = probe.config.llm
    per_token = checks.kv_cache_bytes(
        llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, 1, 1, probe.dtype
    )
    monkeypatch.setattr(checks, "available_memory", lambda device: 1000 * per_token)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the cache was allocated")

    monkeypatch.setattr(pyvl.kv_cache.PagedKVCache, "__init__", no_allocation)
    with pytest.raises(ConfigError, match=r"KV cache for 1 sequence\(s\) of \d+ tokens .* GiB free"):
        pyvl.load(CHECKPOINT, device="cpu", kv_cache_gb=1.0)
    monkeypatch.undo()
    # logits() allocates nothing: it runs on the engine's pool, which must hold the prompt
    two_blocks = pyvl.load(CHECKPOINT, device="cpu", kv_cache_gb=2 * per_token * 64 / 1e9, max_context=4096)
    with pytest.raises(PromptError, match=r"needs 16 KV blocks of 64 tokens but the pool has 2"):
        two_blocks.logits(list(range(1, 1002)))
    assert two_blocks.logits(list(range(1, 129))).shape == (128, llm.vocab_size)  # exactly the pool


def test_a_request_larger_than_the_pool_is_refused_and_the_pool_stays_usable():
    small = pyvl.load(CHECKPOINT, device="cpu", kv_cache_gb=None, max_context=2**20)
    tiny = pyvl.load(
        CHECKPOINT,
        device="cpu",
        max_context=4096,
        kv_cache_gb=2
        * checks.kv_cache_bytes(
            small.config.llm.num_hidden_layers,
            small.config.llm.num_key_value_heads,
            small.config.llm.head_dim,
            64,
            1,
            small.dtype,
        )
        / 1e9,
    )
    assert tiny.engine.pool.num_blocks == 2  # 128 tokens
    with pytest.raises(PromptError, match="KV blocks of 64 tokens but the pool has 2"):
        tiny.chat(None, "hi " * 200)
    question = golden_cases("v15")["cases"]["text_eos_stop"]["question"]  # the answer ends at <|im_end|>
    assert tiny.chat(None, question, dict(max_new_tokens=10**9)) == small.chat(
        None, question, dict(max_new_tokens=10**9)
    )
    tiny.engine.pool.check()
    assert tiny.engine.pool.num_in_use == 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="MemAvailable is read from Linux's /proc/meminfo"
)
def test_free_memory_is_read_on_linux():
    free = checks.available_memory(torch.device("cpu"))
    assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_context=1), ConfigError, "max_context=1: expected an integer in 2..1048576"),
        (dict(max_context=2**21), ConfigError, "max_context=2097152"),
        (dict(max_context=64.0), ConfigError, "max_context=64.0"),
        (dict(max_context="64"), ConfigError, "max_context='64'"),
        (dict(device="nonsense"), ConfigError, "device='nonsense' is not a torch device"),
        (dict(device="meta"), ConfigError, "pyvl runs on 'cpu' or 'cuda'"),
        (dict(device=0.5), ConfigError, "device must be a str or torch.device"),
        (dict(progress="no"), ConfigError, "progress='no'"),
        (dict(backend=None), ConfigError, "backend must be a str"),
        (dict(op_backends=["rms_norm"]), ConfigError, "op_backends must be a mapping"),
        (dict(dtype="int8"), ConfigError, "dtype 'int8'"),
    ],
)
def test_load_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pyvl.load(CHECKPOINT, **kwargs)


def test_load_path_and_cuda_without_a_gpu():
    with pytest.raises(CheckpointError, match="path must be a model folder"):
        pyvl.load(None)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            pyvl.load(CHECKPOINT, device="cuda")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            pyvl.load(CHECKPOINT, device=f"cuda:{torch.cuda.device_count()}")
