"""``pyvl.load(..., tensor_parallel_size=N)`` end to end on the CPU (gloo, real worker processes): the same greedy
answers as one process and logits within 1e-4 relative, on the golden fixtures and on a checkpoint whose heads,
widths and vocabulary split unevenly; streaming, concurrent requests, batch_chat, prefix and image reuse as
without tensor parallelism.

One model per (checkpoint, size) for the module, closed after its tests (its workers with it); the single-process
model it is compared with is loaded once per checkpoint. Every call is bounded by the collective timeout, so a
broken rank fails a test rather than hanging it.
"""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from conftest import GOLDEN, golden_cases
from parallel_models import tp_config, write_checkpoint
from test_golden import MARGIN_FLOOR, assert_close, case_pixels, comparable_steps, tensors

import pyvl

REL_TOL = 1e-4
GEN = dict(max_new_tokens=6)
GOLDEN_MODELS = [("v15", 2), ("v15", 3), ("mini", 2), ("mini", 3)]
MODELS = GOLDEN_MODELS + [("tp", 2), ("tp", 3)]
GOLDEN_CASES = ["img_gradient_800x600_max1", "img_tall_300x1000_max6", "two_images_separate", "ntk_crossing"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tp = write_checkpoint(tmp_path_factory.mktemp("tp") / "model", tp_config())
    return {"v15": GOLDEN / "v15" / "checkpoint", "mini": GOLDEN / "mini" / "checkpoint", "tp": tp}


@functools.cache
def single(folder) -> pyvl.InternVLChat:
    return pyvl.load(folder, device="cpu", dtype="float32", backend="reference")


def models(which):
    return pytest.mark.parametrize("pair", which, ids=[f"{name}-tp{n}" for name, n in which], indirect=True)


@pytest.fixture(scope="module")
def pair(request, folders):
    name, n = request.param
    folder = folders[name]
    model = pyvl.load(folder, device="cpu", dtype="float32", backend="reference", tensor_parallel_size=n)
    yield name, single(folder), model
    model.close()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def image(seed: int) -> torch.Tensor:
    """A one-tile image no model has seen (its features are not cached anywhere yet)."""
    return torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(seed)).clamp(-2, 2)


@models(GOLDEN_MODELS)
@pytest.mark.parametrize("case_name", GOLDEN_CASES)
def test_golden_logits_and_greedy_tokens(pair, case_name):
    name, one, model = pair
    case = golden_cases(name)["cases"][case_name]
    want = tensors(name, case_name)
    pixels = case_pixels(case)
    ids = want["input_ids"].tolist()
    logits = model.logits(ids, pixels)
    assert rel_err(logits, one.logits(ids, pixels)) <= REL_TOL
    assert_close(logits[-8:], want["logits_last"], f"{name}/{case_name} logits_last")
    new_ids, scores = model.generate(ids, pixels, dict(max_new_tokens=12), output_scores=True)
    one_ids, one_scores = one.generate(ids, pixels, dict(max_new_tokens=12), output_scores=True)
    n = comparable_steps(case["gen_top2_margins"])
    assert new_ids[0, :n].tolist() == case["new_token_ids"][:n]
    if min(case["gen_top2_margins"]) > MARGIN_FLOOR:
        assert new_ids.tolist() == one_ids.tolist()
    assert rel_err(scores[0, :n], one_scores[0, :n]) <= REL_TOL


@models(MODELS)
def test_single_process_answers(pair):
    """Greedy answers and logits of image and text prompts equal one process's; rank 0's KV pool holds only the
    KV heads its query heads read."""
    _, one, model = pair
    assert model.engine.cache.k.shape[2] == len(model.engine.cluster.plan.llm.kv_heads)
    pixels = image(0)
    for question, px in (("Describe the image.", pixels), ("Hello, who are you?", None)):
        assert model.chat(px, question, GEN) == one.chat(px, question, GEN)
    ids = one.tokenizer.encode(one.build_query("Describe the image.", [1]))
    assert rel_err(model.logits(ids, pixels), one.logits(ids, pixels)) <= REL_TOL
    assert rel_err(model.extract_feature(pixels), one.extract_feature(pixels)) <= REL_TOL


@models(MODELS)
def test_streaming_and_batching(pair):
    _, one, model = pair
    pixels = image(1)
    assert "".join(model.stream(pixels, "What is shown?", GEN)) == one.chat(pixels, "What is shown?", GEN)
    questions = ["Describe it.", "What colour is it?", "Say something."]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = model.chat(pixels, questions[i], GEN)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [answers.get(i) for i in range(3)] == [one.chat(pixels, q, GEN) for q in questions]
    both = torch.cat([pixels, image(2)])
    assert model.batch_chat(both, questions[:2], GEN, num_patches_list=[1, 1]) == one.batch_chat(
        both, questions[:2], GEN, num_patches_list=[1, 1]
    )


@models(MODELS)
def test_prefix_and_image_reuse(pair):
    """A second question about an image skips the ViT and prefills only what differs (the reused tail copied
    on every rank's pool); turn 2 of a chat reuses turn 1."""
    _, one, model = pair
    pixels = image(3)
    first, second, turn2 = pyvl.ChatStats(), pyvl.ChatStats(), pyvl.ChatStats()
    answer, history = model.chat(pixels, "What is in the image?", GEN, return_history=True, stats=first)
    again = model.chat(pixels, "What is in the picture?", GEN, stats=second)
    follow = model.chat(pixels, "And then?", GEN, history=history, stats=turn2)
    assert (first.images_encoded, second.images_encoded, turn2.images_encoded) == (1, 0, 0)
    a = one.tokenizer.encode(one.build_query("What is in the image?", [1]))
    b = one.tokenizer.encode(one.build_query("What is in the picture?", [1]))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert second.cached_tokens == shared and shared % 64 != 0  # a partial block: its tail was copied
    assert turn2.cached_tokens >= len(a)
    assert (answer, again, follow) == (
        one.chat(pixels, "What is in the image?", GEN),
        one.chat(pixels, "What is in the picture?", GEN),
        one.chat(pixels, "And then?", GEN, history=history),
    )


@models([("v15", 2), ("tp", 3)])
def test_choices_logprobs_penalties_and_grammars(pair):
    """The OpenAI settings under tensor parallelism: n sampled choices forked from one prefill (their KV tails
    copied on every rank), logprobs, penalties and a bias, and a JSON schema's masks, as in one process."""
    _, one, model = pair
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    settings = [
        dict(do_sample=True, temperature=0.8, seed=5, n=3, logprobs=True, top_logprobs=2),
        dict(presence_penalty=1.5, frequency_penalty=0.5, logit_bias={7: 3.0}, logprobs=True),
        dict(json_schema=schema, max_new_tokens=24),
    ]
    pixels = image(4)
    for gen in settings:
        got, want = pyvl.ChatResult(), pyvl.ChatResult()
        model.chat(pixels, "Tell me.", GEN | gen, result=got)
        one.chat(pixels, "Tell me.", GEN | gen, result=want)
        assert [c.token_ids for c in got.choices] == [c.token_ids for c in want.choices], gen
        for g, w in zip(got.choices, want.choices):
            if w.logprobs is not None:
                assert [t.token for t in g.logprobs] == [t.token for t in w.logprobs]
                expected = torch.tensor([t.logprob for t in w.logprobs])
                actual = torch.tensor([t.logprob for t in g.logprobs])
                assert (actual - expected).abs().max() <= 1e-3, gen
    assert len(got.choices[0].token_ids) > 1
