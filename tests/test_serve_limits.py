"""The prompt's length in characters, checked before anything is tokenized: refused only when it cannot fit."""

from __future__ import annotations

import random

import pytest

from pyvl.demo import demo_model_path
from pyvl.serve.errors import APIError
from pyvl.serve.params import Limits
from pyvl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_folder(demo_model_path())


def test_the_bound_is_sound(tokenizer):
    """No text of the vocabulary's pieces is fewer tokens than its characters / max_token_bytes, so a text the
    check refuses could never have fit."""
    rng = random.Random(0)
    pieces = [b.decode("utf-8", errors="ignore") for b in tokenizer.token_bytes if b]
    longest = max(pieces, key=len)
    for _ in range(20):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 400)))
        assert len(tokenizer.encode(text)) >= len(text) / tokenizer.max_token_bytes
    assert len(tokenizer.encode(longest * 50)) >= 50 * len(longest) / tokenizer.max_token_bytes


def test_only_text_that_cannot_fit_is_refused(tokenizer):
    limits = Limits(
        max_context=64,
        vocab_size=tokenizer.vocab_size,
        max_num_seqs=4,
        max_token_bytes=tokenizer.max_token_bytes,
    )
    bound = 64 * tokenizer.max_token_bytes
    limits.check_prompt_chars(
        ["a" * (bound - 10), "b" * 10], "messages"
    )  # at the bound: tokenized, then judged
    with pytest.raises(APIError) as info:
        limits.check_prompt_chars(["a" * bound, "b"], "messages")
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert f"{bound + 1} characters" in info.value.message and info.value.param == "messages"


def test_a_requests_pixels_are_counted_from_the_headers_and_capped():
    """Three 9000x9000 PNG headers (243 MP) are refused before any is decoded; two (162 MP) pass the count."""
    pytest.importorskip("fastapi")
    from types import SimpleNamespace

    from hostile_requests import _png_header_claiming

    import pyvl
    from pyvl.serve.app import ServeSettings, _image_sources
    from pyvl.serve.protocol import ImageRef

    model = pyvl.load(demo_model_path())
    try:
        png = _png_header_claiming(9000, 9000)  # a valid header over a few bytes of data: decoding would fail
        refs = [ImageRef("data:", 1, f"messages[0].content[{k}]") for k in range(3)]
        settings = ServeSettings(served_model_name="demo")
        sources = _image_sources(model, SimpleNamespace(images=refs[:2]), [png, png], settings)
        assert [s.pixels for s in sources] == [81_000_000] * 2
        with pytest.raises(APIError) as info:
            _image_sources(model, SimpleNamespace(images=refs), [png] * 3, settings)
        assert info.value.code == "too_many_pixels" and info.value.param == "messages[0].content[2]"
        assert "180 megapixels" in info.value.message
    finally:
        model.close()


LIMITS = Limits(max_context=64, vocab_size=100, max_num_seqs=4, max_token_bytes=16)
EDGES = [  # field, the last value accepted, the first refused
    ("max_tokens", 64, 65),
    ("max_completion_tokens", 1, 0),
    ("n", 4, 5),
    ("n", 1, 0),
    ("top_logprobs", 20, 21),
    ("temperature", 2, 2.0001),
    ("temperature", 1e-5, 9.9e-6),
    ("top_p", 1, 1.0001),
    ("presence_penalty", 2, 2.0001),
    ("presence_penalty", -2, -2.0001),
    ("frequency_penalty", -2, -2.0001),
    ("seed", 2**63 - 1, 2**63),
    ("seed", 0, -1),
    ("stop", ["x"] * 4, ["x"] * 5),
    ("stop", "x" * 256, "x" * 257),
    ("logit_bias", {"99": 100}, {"100": 1}),
    ("logit_bias", {"0": -100}, {"0": -100.5}),
]


@pytest.mark.parametrize(("field", "last", "first"), EDGES, ids=[f"{f}={v!r:.12}" for f, v, _ in EDGES])
def test_every_bounded_field_takes_its_limit_and_refuses_one_past(field, last, first):
    from pyvl.serve.protocol import parse_chat_request

    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], field: last}
    if field == "top_logprobs":
        body["logprobs"] = True
    parse_chat_request(body, LIMITS)
    with pytest.raises(APIError) as info:
        parse_chat_request(body | {field: first}, LIMITS)
    assert info.value.status == 400 and info.value.param == field
