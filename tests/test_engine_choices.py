"""n choices of one call on the engine (demo model, CPU): the prompt is prefilled once and its KV blocks shared,
choice i is exactly the single-choice answer seeded with seed + i, and the Python API returns every choice and the
logprobs without changing what chat() returns."""

from __future__ import annotations

import threading

import pytest
from conftest import run_within

import pyvl
from pyvl.demo import demo_model_path

QUESTION = "Tell me a long story about a lighthouse keeper and the sea. " * 3  # prompt of several blocks


@pytest.fixture(scope="module")
def model():
    return pyvl.load(demo_model_path(), device="cpu")


def _count_prefilled_tokens(model) -> list[int]:
    counted = [0]
    real = model.engine.runner.prefill

    def prefill(token_ids, *args, **kwargs):
        counted[0] += len(token_ids)
        return real(token_ids, *args, **kwargs)

    model.engine.runner.prefill = prefill
    return counted


def test_n_greedy_choices_prefill_once_and_equal_the_single_answer(model):
    fresh = pyvl.load(
        demo_model_path(), device="cpu", prefix_caching=False
    )  # sharing is not the prefix cache
    expected = fresh.chat(None, QUESTION, dict(max_new_tokens=20))
    prefilled = _count_prefilled_tokens(fresh)
    result = pyvl.ChatResult()
    answer = fresh.chat(None, QUESTION, dict(max_new_tokens=20, n=3), result=result)
    assert answer == expected and [c.text for c in result.choices] == [expected] * 3
    assert prefilled[0] == result.prompt_tokens > 64  # once, not three times
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert result.completion_tokens == sum(len(c.token_ids) for c in result.choices)
    assert fresh.engine.pool.num_in_use == 0
    fresh.engine.pool.check()


def test_choices_share_the_full_blocks_and_copy_the_partial_one(model):
    fresh = pyvl.load(demo_model_path(), device="cpu", prefix_caching=False)
    pool, seen = fresh.engine.pool, []
    real = fresh.engine.scheduler.fork

    def fork(r):
        started = real(r)
        seen.append([list(x.seq.block_ids) for x in [r, *started]])
        return started

    fresh.engine.scheduler.fork = fork
    fresh.chat(None, QUESTION, dict(max_new_tokens=2, n=3), result=pyvl.ChatResult())
    (tables,) = seen
    full = tables[0][:-1]
    assert all(t[:-1] == full for t in tables) and len(full) >= 1  # the full blocks, shared
    assert len({t[-1] for t in tables}) == 3  # each its own copy of the partial last block
    assert pool.num_in_use == 0


def test_seeded_choice_i_is_the_single_answer_seeded_with_seed_plus_i(model):
    settings = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, seed=11)
    result = pyvl.ChatResult()
    model.chat(None, "Sing.", dict(settings, n=4), result=result)
    alone = [model.chat(None, "Sing.", dict(settings, seed=11 + i)) for i in range(4)]
    assert [c.text for c in result.choices] == alone
    assert len(set(alone)) > 1


def test_choices_survive_a_pool_that_forces_preemption():
    small = pyvl.load(demo_model_path(), device="cpu", kv_cache_gb=0.0006, max_num_seqs=4)  # 4 blocks
    settings = dict(max_new_tokens=60, do_sample=True, seed=3, top_k=0)
    alone = [small.chat(None, "Go on.", dict(settings, seed=3 + i)) for i in range(3)]
    preempted, real = [], small.engine.scheduler.preempt
    small.engine.scheduler.preempt = lambda r: (preempted.append(r.choice), real(r))
    result = pyvl.ChatResult()
    small.chat(None, "Go on.", dict(settings, n=3), result=result)
    assert preempted and [c.text for c in result.choices] == alone
    assert small.engine.pool.num_in_use == 0


def test_logprobs_come_back_per_token_with_their_top_alternatives(model):
    result = pyvl.ChatResult()
    answer = model.chat(None, "Hello", dict(max_new_tokens=8, logprobs=True, top_logprobs=3), result=result)
    (choice,) = result.choices
    assert choice.text == answer
    assert len(choice.logprobs) == len([t for t in choice.token_ids if t not in model.stop_ids])
    for entry, token in zip(choice.logprobs, choice.token_ids):
        assert entry.token_id == token and entry.bytes == model.tokenizer.token_bytes[token]
        assert len(entry.top) == 3 and entry.top[0].token_id == token  # greedy: the chosen is the top one
        assert entry.logprob == entry.top[0].logprob <= 0


def test_chat_refuses_what_it_cannot_return_and_submit_choices_gives_every_request(model):
    for settings in (dict(n=2), dict(logprobs=True)):
        with pytest.raises(pyvl.ConfigError, match="result=pyvl.ChatResult"):
            model.chat(None, "hi", dict(settings, max_new_tokens=2))
        with pytest.raises(pyvl.ConfigError):
            list(model.stream(None, "hi", dict(settings, max_new_tokens=2)))
    with pytest.raises(pyvl.ConfigError, match="max_num_seqs"):
        model.chat(None, "hi", dict(n=17), result=pyvl.ChatResult())
    requests = model.submit_choices(model.prompt("hi", []), dict(n=2, max_new_tokens=3))
    assert [r.choice for r in requests] == [0, 1] and all(len(r.result()) == 3 for r in requests)


def test_cancelling_the_first_choice_before_its_prompt_runs_cancels_them_all(model):
    gate, release = threading.Event(), threading.Event()
    real = model.engine.runner.prefill

    def held(*args, **kwargs):
        gate.set()
        release.wait(10)
        return real(*args, **kwargs)

    model.engine.runner.prefill = held
    try:
        blocker = model.submit(model.prompt("first in the queue", []), dict(max_new_tokens=1))
        assert gate.wait(10)
        requests = model.submit_choices(model.prompt("waiting", []), dict(n=3, max_new_tokens=5))
        requests[0].cancel()
        release.set()
        blocker.result()
        for r in requests:
            assert r.result() == [] and r.stats.finish_reason == "cancelled"
    finally:
        model.engine.runner.prefill = real
        release.set()


def test_achat_fills_the_result_as_chat_does(model):
    settings = dict(n=2, max_new_tokens=6, do_sample=True, seed=4, logprobs=True, top_logprobs=2)
    synced, awaited = pyvl.ChatResult(), pyvl.ChatResult()
    answer = model.chat(None, "Name a bird.", settings, result=synced)
    assert run_within(model.achat(None, "Name a bird.", settings, result=awaited)) == answer
    assert [(c.text, c.token_ids) for c in awaited.choices] == [(c.text, c.token_ids) for c in synced.choices]
    for a, b in zip(awaited.choices, synced.choices):  # the second call's prompt comes from the prefix cache
        assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-5)
    assert awaited.completion_tokens == synced.completion_tokens > 0
