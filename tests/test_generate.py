"""Generation: KV-cache consistency, logits processing, sampling, streaming, context limits, argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN, loaded_model
from hf_sampling import process_logits

import pyvl
from pyvl.errors import ConfigError, PromptError
from pyvl.generation_config import GenerationConfig


@pytest.fixture(scope="module")
def model():
    return loaded_model("v15")


def test_token_by_token_decoding_matches_full_forward(model):
    """Decoding with the KV cache, one token at a time, must equal one forward over the whole sequence."""
    ids = model.tokenizer.encode(model.build_query("Hello, who are you?"))
    new_ids, scores = model.generate(ids, None, dict(max_new_tokens=10), output_scores=True)
    full = model.logits(ids + new_ids[0].tolist())
    # score t chose token t; it is the logit row of the position before it
    rows = full[len(ids) - 1 : len(ids) - 1 + new_ids.shape[1]]
    torch.testing.assert_close(scores[0], rows, atol=2e-5, rtol=0)


def test_kv_cache_past_the_ntk_switch(model):
    """Crossing max_position_embeddings mid-decode, as the original does it: the new token is rotated with the
    base of the new total length while cached keys keep theirs, so cached decoding equals a full forward up to
    the switch and differs after it (the golden ntk_crossing case pins the exact values)."""
    long_text = "the quick brown fox " * 120
    ids = model.tokenizer.encode(model.build_query(long_text))[:505]
    no_stop = dict(max_new_tokens=12, eos_token_id=[0])  # <unk> is never chosen: run all 12 steps
    new_ids, scores = model.generate(ids, None, no_stop, output_scores=True)
    limit = model.config.llm.max_position_embeddings
    before = limit - len(ids) + 1  # steps whose total length is still <= the limit
    full = model.logits(ids + new_ids[0, : before - 1].tolist())[len(ids) - 1 :]
    torch.testing.assert_close(scores[0, :before], full, atol=2e-5, rtol=0)
    for t in range(before, new_ids.shape[1]):  # a fresh forward of the same length rotates every key anew
        fresh = model.logits(ids + new_ids[0, :t].tolist())[-1]
        assert (scores[0, t] - fresh).abs().max() > 1e-3


def test_repetition_penalty_and_warpers():
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[0, 1]])
    out = process_logits(scores, seen, GenerationConfig(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0]]  # positive divided, negative multiplied
    top_k = process_logits(scores, seen[:, :0], GenerationConfig(do_sample=True, top_k=2))
    assert torch.isinf(top_k).tolist() == [[False, True, False, True]]
    top_p = process_logits(
        torch.tensor([[5.0, 0.0, 0.0, 0.0]]),
        seen[:, :0],
        GenerationConfig(do_sample=True, top_k=0, top_p=0.5),
    )
    assert torch.isfinite(top_p).tolist() == [[True, False, False, False]]
    hot = process_logits(scores, seen[:, :0], GenerationConfig(do_sample=True, temperature=0.5, top_k=0))
    assert hot.tolist() == [[4.0, -2.0, 1.0, 0.0]]


def test_sampling_is_seeded_and_respects_top_k(model):
    gen = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, seed=7)
    a = model.chat(None, "Tell me a story.", gen)
    assert a == model.chat(None, "Tell me a story.", gen)
    runs = {model.chat(None, "Tell me a story.", dict(gen, seed=s)) for s in range(5)}
    assert len(runs) > 1
    greedy = model.chat(None, "Tell me a story.", dict(max_new_tokens=8))
    assert model.chat(None, "Tell me a story.", dict(gen, top_k=1)) == greedy


@pytest.mark.parametrize("question", ["Hello, who are you?", "Café ☕ naïve — 你好！", "Write a short poem."])
def test_stream_pieces_join_to_the_chat_answer(model, question):
    gen = dict(max_new_tokens=16)
    pieces = list(model.stream(None, question, gen))
    assert "".join(pieces) == model.chat(None, question, gen)
    assert all(pieces)


def test_stream_with_image_and_sampling(model):
    pixels = pyvl.load_image(GOLDEN / "images" / "tiny_50x40_palette.png", max_num=1)
    gen = dict(max_new_tokens=12, do_sample=True, top_p=0.9, seed=3)
    assert "".join(model.stream(pixels, "Describe.", gen)) == model.chat(pixels, "Describe.", gen)


def test_stops_on_im_end(model):
    """Generation ends at the first <|im_end|>: it is the last id returned, nothing follows it, even with room
    for many more tokens; chat() answers the text before it; in a batch a finished row gets only pads."""
    from conftest import golden_cases

    expected = golden_cases("v15")["cases"][
        "text_eos_stop"
    ]  # greedy ids of the original, ending in <|im_end|>
    im_end, pad = model.tokenizer.im_end_id, model.tokenizer.pad_id
    ids = model.tokenizer.encode(model.build_query(expected["question"]))
    for budget in (12, 60):
        new = model.generate(ids, None, dict(max_new_tokens=budget))[0].tolist()
        assert new == expected["new_token_ids"], budget
        assert new.index(im_end) == len(new) - 1 < budget - 1, f"{new}: must end at its first <|im_end|>"
    stats = pyvl.ChatStats()
    assert (
        model.chat(None, expected["question"], dict(max_new_tokens=60), stats=stats) == expected["response"]
    )
    assert stats.new_tokens == len(new)
    assert "".join(model.stream(None, expected["question"], dict(max_new_tokens=60))) == expected["response"]
    # any stop id ends it at its first occurrence: the third greedy token as the only stop id
    third = new[2]
    assert third not in new[:2]
    assert model.generate(ids, None, dict(max_new_tokens=60, eos_token_id=[third]))[0].tolist() == new[:3]
    # batch: the row that stops first is padded (pad id, not more tokens) until the other row stops
    other = model.tokenizer.encode(model.build_query("Hello, who are you?"))
    alone = model.generate(other, None, dict(max_new_tokens=60))[0].tolist()
    assert alone.index(im_end) == len(alone) - 1 and len(alone) < len(new)  # it stops first
    both = model.generate([ids, other], None, dict(max_new_tokens=60)).tolist()
    assert both == [new, alone + [pad] * (len(new) - len(alone))]


def test_context_boundary_is_exact():
    """max_context tokens in all: a prompt of max_context - 1 tokens gets exactly one new token, a prompt of
    max_context is refused, and generation stops exactly when prompt + answer fill the context."""
    small = pyvl.load(GOLDEN / "v15" / "checkpoint", device="cpu", max_context=64)
    tok = small.tokenizer
    no_stop = dict(
        max_new_tokens=500, eos_token_id=[tok.unk_id]
    )  # <unk> is never chosen: only the context stops
    with pytest.raises(PromptError, match=r"prompt has \d+ tokens but the context holds 64"):
        small.chat(None, "word " * 80)
    filler = tok.encode("hi " * 100)
    with pytest.raises(PromptError, match="prompt has 64 tokens but the context holds 64"):
        small.generate(filler[:64], None, no_stop)
    with pytest.raises(PromptError, match="prompt has 64 tokens"):  # a batch is judged by its longest prompt
        small.generate([filler[:10], filler[:64]], None, no_stop)
    assert small.generate(filler[:63], None, no_stop).shape == (1, 1)
    for n in (11, 40):
        assert small.generate(filler[:n], None, no_stop).shape == (1, 64 - n)
    assert small.generate(filler[:11], None, dict(no_stop, max_new_tokens=5)).shape == (1, 5)  # budget first
    # logits need no new token: a full context is accepted, one more refused
    assert small.logits(filler[:64]).shape == (64, len(tok))
    with pytest.raises(PromptError, match="65 tokens; the context holds 64"):
        small.logits(filler[:65])


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(max_new_tokens=4, bogus=1), "unknown key"),
        (dict(num_beams=2), "num_beams"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        ("greedy", "must be a dict"),
    ],
)
def test_generation_config_errors(model, config, match):
    with pytest.raises(ConfigError, match=match):
        model.chat(None, "hi", config)


def test_image_argument_errors(model):
    pixels = pyvl.load_image(GOLDEN / "images" / "tall_300x1000.png", max_num=6)
    with pytest.raises(PromptError, match="summing to the 4 tiles"):
        model.chat(pixels, "<image> <image>", num_patches_list=[1, 2])
    with pytest.raises(PromptError, match="shape"):
        model.chat(pixels[:, :2], "hi")
    with pytest.raises(PromptError, match="without pixel_values"):
        model.chat(None, "hi", num_patches_list=[1])
    with pytest.raises(PromptError, match="<image>"):
        model.chat(pixels, "<image> and <image>", num_patches_list=[4])


def test_batch_chat_text_only_and_errors(model):
    answers = model.batch_chat(None, ["Hi", "Hello, who are you?"], dict(max_new_tokens=6))
    assert answers == [model.chat(None, q, dict(max_new_tokens=6)) for q in ["Hi", "Hello, who are you?"]]
    with pytest.raises(PromptError, match="history"):
        model.batch_chat(None, ["Hi"], history=[])


def test_chat_accepts_raw_images(model):
    """Paths, bytes, PIL images and arrays are tiled with the model's settings (max_dynamic_patch)."""
    from PIL import Image

    path = GOLDEN / "images" / "tall_300x1000.png"
    tiles = pyvl.load_image(path, max_num=model.config.max_dynamic_patch)
    gen = dict(max_new_tokens=4)
    want = model.chat(tiles, "Describe.", gen)
    assert model.chat(str(path), "Describe.", gen) == want
    assert model.chat(path.read_bytes(), "Describe.", gen) == want
    assert model.chat(Image.open(path), "Describe.", gen) == want
    # a list of raw images: one labelled <image> block each, like passing num_patches_list by hand
    small = GOLDEN / "images" / "tall_300x1000.png"  # 4 tiles again: two images fit the 4096 context
    both = torch.cat([tiles, pyvl.load_image(small, max_num=model.config.max_dynamic_patch)])
    want2 = model.chat(
        both,
        "Image-1: <image>\nImage-2: <image>\nCompare.",
        gen,
        num_patches_list=[tiles.shape[0], both.shape[0] - tiles.shape[0]],
    )
    assert model.chat([path, small], "Compare.", gen) == want2
    with pytest.raises(PromptError, match="does not match"):
        model.chat([path, small], "Compare.", gen, num_patches_list=[1, 1])
