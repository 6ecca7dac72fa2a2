"""The engine end to end on the golden v15 model (float32, CPU): prefix and image reuse, multi-turn, concurrency,
cancellation, preemption, and the capture-ready decode step against a full recompute.

Each test loads its own model (the engine's caches are per model), with prompts under the model's 512
max_position_embeddings: past it, dynamic NTK makes keys depend on the whole length, and prefix reuse is off.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import GOLDEN, image_for_key

import pyvl

CHECKPOINT = GOLDEN / "v15" / "checkpoint"
SHORT = dict(max_new_tokens=8)


def fresh(**kwargs):
    return pyvl.load(CHECKPOINT, device="cpu", dtype="float32", backend="reference", **kwargs)


def one_tile_image() -> torch.Tensor:
    path, _ = image_for_key("gradient_800x600@max1")
    return pyvl.load_image(path, max_num=1)


def wait_idle(model, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not model.engine.idle:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def count_vit_calls(model) -> list[int]:
    calls = [0]
    real = model.model.extract_feature

    def counted(pixel_values):
        calls[0] += 1
        return real(pixel_values)

    model.model.extract_feature = counted
    return calls


def prompt_ids(model, pixels, question, history=None) -> list[int]:
    return model.tokenizer.encode(
        model.build_query(question, [pixels.shape[0]] if pixels is not None else None, history=history)
    )


def test_a_second_question_on_the_same_image_skips_the_vit_and_the_shared_prefix():
    model, pixels = fresh(), one_tile_image()
    vit = count_vit_calls(model)
    first, second = pyvl.ChatStats(), pyvl.ChatStats()
    model.chat(pixels, "What is in the image?", SHORT, stats=first)
    answer = model.chat(pixels, "Describe the colours.", SHORT, stats=second)
    assert vit[0] == 1 and (first.images_encoded, second.images_encoded) == (1, 0)
    shared = common_prefix(
        prompt_ids(model, pixels, "What is in the image?"), prompt_ids(model, pixels, "Describe the colours.")
    )
    assert shared > 256  # system prompt + the whole image block
    assert (
        second.cached_tokens == shared
    )  # exactly the shared prefix: only the differing tokens are prefilled
    assert answer == fresh().chat(pixels, "Describe the colours.", SHORT)  # what a cold model answers


def test_the_feature_cache_skips_the_vit_when_the_prefix_differs():
    model, pixels = fresh(), one_tile_image()
    vit = count_vit_calls(model)
    model.chat(pixels, "What is in the image?", SHORT)
    model.system_message = "You are terse."  # another system prompt: no shared prefix, same image
    stats = pyvl.ChatStats()
    answer = model.chat(pixels, "What is in the image?", SHORT, stats=stats)
    assert vit[0] == 1 and stats.images_encoded == 0 and stats.cached_tokens < 10
    cold = fresh()
    cold.system_message = "You are terse."
    assert answer == cold.chat(pixels, "What is in the image?", SHORT)


def test_turn_two_prefills_only_the_new_turn():
    model = fresh()
    first = pyvl.ChatStats()
    answer, history = model.chat(None, "Tell me about cats.", SHORT, return_history=True, stats=first)
    second = pyvl.ChatStats()
    reply = model.chat(None, "And dogs?", SHORT, history=history, stats=second)
    turn1 = prompt_ids(model, None, "Tell me about cats.")
    turn2 = prompt_ids(model, None, "And dogs?", history=history)
    assert len(turn2) > len(turn1) + 8
    # what turn 1 left in the cache: its prompt and its answer's ids (all but the stop id, never fed)
    computed = turn1 + model.tokenizer.encode(answer, add_bos=False)
    assert second.cached_tokens == common_prefix(computed, turn2) >= len(turn1)
    assert reply == fresh().chat(None, "And dogs?", SHORT, history=history)


def test_two_images_with_identical_prompts_never_share_image_blocks():
    model = fresh()
    a = one_tile_image()
    b = pyvl.load_image(image_for_key("tall_300x1000@max1")[0], max_num=1)
    model.chat(a, "What is this?", SHORT)
    stats = pyvl.ChatStats()
    answer = model.chat(b, "What is this?", SHORT, stats=stats)
    ids = prompt_ids(model, b, "What is this?")
    assert stats.cached_tokens == ids.index(model.img_context_token_id)  # the text before the image, no more
    assert stats.images_encoded == 1
    assert answer == fresh().chat(b, "What is this?", SHORT)


def test_threads_get_exactly_the_serial_answers():
    model, pixels = fresh(), one_tile_image()
    questions = [f"Question number {i}: what do you see?" for i in range(25)]
    calls = [(i % 3 == 0, pixels if i % 2 else None, questions[i]) for i in range(25)]
    serial = [model.chat(p, q, SHORT) for _, p, q in calls]
    results: dict[tuple[int, int], str] = {}
    errors = []

    def worker(t: int) -> None:
        try:
            for i, (as_stream, p, q) in enumerate(calls):
                results[t, i] = "".join(model.stream(p, q, SHORT)) if as_stream else model.chat(p, q, SHORT)
        except Exception as exc:  # surfaced below: a worker thread never throws
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(results[t, i] == serial[i] for t in range(4) for i in range(25))
    wait_idle(model)
    assert model.engine.pool.num_in_use == 0
    model.engine.pool.check()


def test_closing_a_stream_frees_its_blocks():
    model = fresh()
    model.chat(None, "warm up", SHORT)
    wait_idle(model)
    baseline = model.engine.pool.num_in_use
    stream = model.stream(None, "Tell me a long story about the sea.", dict(max_new_tokens=200))
    next(stream)
    stream.close()
    wait_idle(model)
    assert model.engine.pool.num_in_use == baseline == 0
    model.engine.pool.check()


def test_a_pool_too_small_for_the_load_preempts_and_answers_correctly():
    questions = [f"Say something about the number {i}." for i in range(6)]
    big = fresh()
    want = [big.chat(None, q, dict(max_new_tokens=40)) for q in questions]
    # 8 blocks of 64 tokens: each request needs 2 (its ~40-token prompt plus 40 new ones), 6 run at once
    small = fresh(kv_cache_gb=8 * big.engine.cache.nbytes / big.engine.pool.num_blocks / 1e9)
    assert small.engine.pool.num_blocks == 8
    stats = [pyvl.ChatStats() for _ in questions]
    results = [None] * len(questions)

    def ask(i: int) -> None:
        results[i] = small.chat(None, questions[i], dict(max_new_tokens=40), stats=stats[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == want
    assert sum(s.preemptions for s in stats) > 0  # the load really did not fit
    wait_idle(small)
    small.engine.pool.check()
    assert small.engine.pool.num_in_use == 0


def test_the_decode_step_matches_a_full_recompute_token_for_token():
    """The capture-ready step (static buffers, paged K/V, device lengths), run eagerly, against recomputing
    the whole sequence's logits at every step with no cache at all."""
    model = fresh()
    prompt = prompt_ids(model, None, "Count to ten.")
    new = model.generate(prompt, None, dict(max_new_tokens=12, eos_token_id=[model.tokenizer.unk_id]))[
        0
    ].tolist()
    seq = list(prompt)
    for token in new:
        assert int(model.logits(seq)[-1].argmax()) == token
        seq.append(token)


def test_seeded_sampling_is_the_same_alone_and_batched():
    model = fresh()
    gen = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9, seed=1234)
    prompts = [
        prompt_ids(model, None, q) for q in ("Write a poem.", "Name a colour.", "Why is the sky blue?")
    ]
    alone = [model.generate(p, None, gen)[0].tolist() for p in prompts]
    together = model.generate(prompts, None, gen)
    for row, want in enumerate(alone):
        assert together[row, : len(want)].tolist() == want


def test_errors_reach_the_caller_and_the_engine_keeps_serving(monkeypatch):
    model = fresh()
    real = model.engine.runner.prefill

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(model.engine.runner, "prefill", broken)
    with pytest.raises(RuntimeError, match="planted failure"):
        model.chat(None, "hi", SHORT)
    monkeypatch.setattr(model.engine.runner, "prefill", real)
    wait_idle(model)
    assert model.engine.pool.num_in_use == 0
    assert model.chat(None, "hi", SHORT) == fresh().chat(None, "hi", SHORT)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/device_check.sh runs it)"
)
def test_cuda_graph_replay_equals_eager_decode():
    prompts = [[1] + list(range(100, 100 + n)) for n in (5, 40, 17)]
    gen = dict(max_new_tokens=24, eos_token_id=[0])
    outputs = {}
    for graphs in (False, True):
        model = pyvl.load(CHECKPOINT, device="cuda", dtype="float32", cuda_graphs=graphs)
        assert model.engine.runner.graphs.enabled == graphs
        outputs[graphs] = model.generate(prompts, None, gen).tolist()
    assert outputs[True] == outputs[False]


def test_stats_say_why_generation_ended():
    model = fresh()
    question = __import__("conftest").golden_cases("v15")["cases"]["text_eos_stop"]["question"]
    stopped, cut = pyvl.ChatStats(), pyvl.ChatStats()
    model.chat(None, question, dict(max_new_tokens=60), stats=stopped)
    model.chat(None, question, dict(max_new_tokens=2), stats=cut)
    assert (stopped.finish_reason, cut.finish_reason, cut.new_tokens) == ("stop", "length", 2)
