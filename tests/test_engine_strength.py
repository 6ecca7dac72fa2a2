"""Engine behaviour the planted-bug runs of issue 19 found unguarded (golden v15 model, float32, CPU): decode
padding rows, sampler slots reused by the next request, the logprobs of every choice's own tokens, admission up to
exactly max_num_seqs (n choices included), a request cancelled while it waits, the context limit, and a preempted
request with OpenAI's penalties and logprobs resuming exactly where it was."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import GOLDEN

import pyvl
from pyvl.engine.runner import DecodeRow
from pyvl.engine.sampling import Sampler
from pyvl.generation_config import GenerationConfig

CHECKPOINT = GOLDEN / "v15" / "checkpoint"


def fresh(**kwargs):
    return pyvl.load(CHECKPOINT, device="cpu", dtype="float32", backend="reference", **kwargs)


@pytest.fixture(scope="module")
def model():
    return fresh()


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine never got there"
        time.sleep(0.002)


# ---- decode padding ----------------------------------------------------------------------------------------
def test_rows_past_a_shrunk_decode_batch_are_padding(model):
    """Rows past the batch must never write K/V (slot -1) nor attend (length 0): a padding row left with the slot
    of a request that ran last step would overwrite that slot under a CUDA graph replay."""
    runner = model.engine.runner
    capacity = runner.slots.shape[0]
    assert capacity >= 4
    rows = [DecodeRow(7 + i, 3 + i, [i], 64 * i + 3 + i, 4 + i) for i in range(capacity)]
    for b in [
        capacity,
        *range(capacity - 1, -1, -1),
        2,
        4,
        1,
        capacity,
        3,
        0,
    ]:  # shrinking by one and by many
        runner.fill(rows[:b])
        host_ids, host_lens, _ = runner._host
        for ids, lens in ((runner.ids, runner.context_lens), (host_ids, host_lens)):
            assert ids[2, :b].tolist() == [r.slot for r in rows[:b]]
            assert ids[0, :b].tolist() == [r.token for r in rows[:b]]
            assert lens[:b].tolist() == [r.position + 1 for r in rows[:b]]
            assert ids[2, b:].tolist() == [-1] * (capacity - b), f"padding rows keep slots after {b} rows"
            assert lens[b:].tolist() == [0] * (capacity - b)


# ---- sampler slots reused ----------------------------------------------------------------------------------
VOCAB, BOS = 40, 1
HEAVY = GenerationConfig(
    do_sample=True,
    temperature=0.7,
    top_k=5,
    top_p=0.8,
    repetition_penalty=1.8,
    presence_penalty=1.5,
    frequency_penalty=0.9,
    logit_bias=((3, 50.0), (4, -80.0)),
    logprobs=True,
    top_logprobs=3,
    seed=5,
)
NEXT = {
    "greedy": GenerationConfig(),
    "repetition": GenerationConfig(repetition_penalty=1.3),
    "frequency": GenerationConfig(frequency_penalty=1.2),
    "presence": GenerationConfig(presence_penalty=0.8),
    "bias": GenerationConfig(logit_bias=((9, 3.0),)),
    "sampled": GenerationConfig(do_sample=True, temperature=1.2, seed=3),
}


@pytest.mark.parametrize("name", sorted(NEXT))
def test_a_reused_sampler_slot_behaves_as_a_fresh_one(name):
    """A slot's next request sees nothing of its last one: the same scores, tokens and logprobs, step after
    step, as in a sampler that never ran anything (every per-slot setting and mask)."""
    gen = NEXT[name]
    logits = torch.randn(8, 2, VOCAB, generator=torch.Generator().manual_seed(1))
    used = Sampler(2, VOCAB, BOS)
    used.activate(1, HEAVY)
    used.activate(0, GenerationConfig(repetition_penalty=1.1))
    for step in range(6):  # the heavy request draws tokens in slot 1 beside another one
        used.step(logits[step], [0, 1])
    used.deactivate(1)
    used.activate(1, gen, [5, 6, 5])  # resumed after a preemption with three tokens of its own
    clean = Sampler(2, VOCAB, BOS)
    clean.activate(1, gen, [5, 6, 5])
    for step in range(4):
        a, b = used.step(logits[step, 1:], [1]), clean.step(logits[step, 1:], [1])
        assert torch.equal(a.scores, b.scores), f"step {step}: scores differ"
        assert a.to_host() == b.to_host()


# ---- logprobs of every choice ------------------------------------------------------------------------------
def test_every_choice_gets_the_logprobs_of_its_own_tokens(model):
    """Each choice's logprob entries describe its own token at each step: log_softmax(logits / T) of the prompt
    plus its own answer so far (no penalties here), its top entries that distribution's largest."""
    temperature = 0.9
    prompt = model.prompt("Tell me about the sea.", [])
    gen = dict(max_new_tokens=6, n=3, do_sample=True, temperature=temperature, seed=4, logprobs=True)
    gen.update(top_logprobs=3, eos_token_id=[0])
    requests = model.submit_choices(prompt, gen)
    answers = [r.result() for r in requests]
    assert len({a[0] for a in answers}) > 1, "the choices' first tokens should differ (seeds 4, 5, 6)"
    for request, answer in zip(requests, answers):
        ids = request.prompt_ids + answer
        dist = (model.logits(ids)[len(request.prompt_ids) - 1 : -1].float() / temperature).log_softmax(-1)
        assert len(request.logprobs) == len(answer)
        for k, (token, (chosen, top)) in enumerate(zip(answer, request.logprobs)):
            assert chosen == pytest.approx(float(dist[k, token]), abs=2e-3), (
                f"choice {request.choice} step {k}"
            )
            values, best = dist[k].topk(3)
            assert [t for t, _ in top] == best.tolist()
            assert [v for _, v in top] == pytest.approx(values.tolist(), abs=2e-3)


# ---- admission ---------------------------------------------------------------------------------------------
def _max_running(model) -> list[int]:
    engine, most = model.engine, [0]
    real_step = engine._step

    def step() -> None:
        real_step()
        most[0] = max(most[0], len(engine.scheduler.running))
        assert len(engine.scheduler.running) <= engine.config.max_num_seqs

    engine._step = step
    return most


def test_admission_runs_exactly_max_num_seqs_requests_and_choices():
    """max_num_seqs requests run at once (not one fewer, not one more), the n choices of a call counting as n;
    every answer is the one it gets alone."""
    gen = dict(max_new_tokens=24, eos_token_id=[0])
    questions = [f"Count to {i} slowly." for i in range(4)]
    alone = fresh()
    want = [alone.chat(None, q, gen) for q in questions]
    want_n = alone.chat(None, "Name a colour.", dict(gen, n=2), result=pyvl.ChatResult())
    model = fresh(max_num_seqs=3)
    most = _max_running(model)
    results = [None] * 4
    choices = pyvl.ChatResult()

    def ask(i):
        if i == 3:
            results[i] = model.chat(None, "Name a colour.", dict(gen, n=2), result=choices)
        else:
            results[i] = model.chat(None, questions[i], gen)

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results[:3] == want[:3] and results[3] == want_n
    assert len(choices.choices) == 2
    assert most[0] == 3
    most[0] = 0
    burst = [model.submit(model.prompt(q, []), gen) for q in questions]
    assert [r.result() for r in burst] == [alone.submit(alone.prompt(q, []), gen).result() for q in questions]
    assert most[0] == 3


def test_a_request_cancelled_while_waiting_ends_at_once_and_never_runs():
    model = fresh(max_num_seqs=1)
    engine = model.engine
    blocker = model.submit(
        model.prompt("Tell me a very long story about the sea.", []), dict(max_new_tokens=400)
    )
    _wait_for(lambda: blocker in engine.scheduler.running and len(blocker.output_ids) > 0)
    stats = pyvl.ChatStats()
    waiting = model.submit(model.prompt("Hello there.", []), dict(max_new_tokens=50), stats)
    _wait_for(lambda: waiting in engine.scheduler.waiting)
    waiting.cancel()
    _wait_for(lambda: waiting.finished, timeout=30)
    assert not blocker.finished, "the waiting request ended only once the blocker was done"
    assert stats.finish_reason == "cancelled" and stats.prefill_chunks == 0 and waiting.output_ids == []
    blocker.cancel()
    _wait_for(lambda: engine.idle)
    assert engine.pool.num_in_use == 0


# ---- limits --------------------------------------------------------------------------------------------------
def test_the_context_limit_ends_the_answer_exactly_at_max_context(model):
    ids = model.tokenizer.encode("Tell me a story about the sea.")
    free = model.generate(ids, None, dict(max_new_tokens=12, eos_token_id=[0]))[0].tolist()
    for room in (1, 2, 5):
        limited = fresh(max_context=len(ids) + room)
        stats = pyvl.ChatStats()
        out = limited.generate(ids, None, dict(max_new_tokens=12, eos_token_id=[0]), stats=stats)[0].tolist()
        assert out == free[:room], f"room for {room} tokens"
        assert stats.finish_reason == "length"


# ---- preemption with OpenAI's processors ----------------------------------------------------------------------
def test_a_preempted_request_keeps_its_penalties_bias_logprobs_and_random_stream():
    gen = dict(
        max_new_tokens=50,
        eos_token_id=[0],
        do_sample=True,
        temperature=0.9,
        presence_penalty=0.7,
        frequency_penalty=0.6,
        logprobs=True,
        top_logprobs=2,
        seed=21,
    )
    questions = [f"Write about the number {i}." for i in range(4)]
    big = fresh()
    want = []
    for q in questions:
        result = pyvl.ChatResult()
        big.chat(None, q, gen, result=result)
        want.append(
            (result.choices[0].text, [(t.token, round(t.logprob, 3)) for t in result.choices[0].logprobs])
        )
    per_block = big.engine.cache.nbytes / big.engine.pool.num_blocks
    small = fresh(kv_cache_gb=6 * per_block / 1e9)
    stats = [pyvl.ChatStats() for _ in questions]
    got = [None] * len(questions)

    def ask(i):
        result = pyvl.ChatResult()
        small.chat(None, questions[i], gen, stats=stats[i], result=result)
        got[i] = (
            result.choices[0].text,
            [(t.token, round(t.logprob, 3)) for t in result.choices[0].logprobs],
        )

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sum(s.preemptions for s in stats) > 0
    assert got == want


# ---- n choices under the invariants ------------------------------------------------------------------------------
def test_choices_keep_every_block_invariant_at_every_step():
    """Calls of n choices (forked from one prefilled prompt: full blocks shared, the partial one copied) beside
    single requests, in a pool small enough to preempt: reference counts equal the blocks the running requests
    hold after every step, every answer is the one it gets alone, and everything is freed at the end."""
    from test_engine_invariants import check_invariants, checked, wait_idle

    gen = dict(max_new_tokens=20, eos_token_id=[0], do_sample=True, temperature=0.8, seed=3)
    long = "Say hello to the sea, please, and then to the sky. " * 12  # its prompt fills full blocks
    calls = [("Name a colour.", 3), (long, 2), ("Count.", 1), (long + "Again.", 3)]
    alone = fresh()
    want = []
    for question, n in calls:
        result = pyvl.ChatResult()
        alone.chat(None, question, dict(gen, n=n), result=result)
        want.append([c.text for c in result.choices])
    per_block = alone.engine.cache.nbytes / alone.engine.pool.num_blocks
    model = fresh(kv_cache_gb=12 * per_block / 1e9, max_num_seqs=8)
    steps = checked(model)
    got, errors = [None] * len(calls), []

    def ask(i):
        try:
            result = pyvl.ChatResult()
            model.chat(None, calls[i][0], dict(gen, n=calls[i][1]), result=result)
            got[i] = [c.text for c in result.choices]
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert errors == [] and got == want and steps[0] > 0
    wait_idle(model)
    check_invariants(model.engine)
    assert model.engine.pool.num_in_use == 0


def test_a_broken_bookkeeping_step_fails_its_requests_and_never_hangs_them(monkeypatch):
    """A bug that makes freeing a request raise (a block released twice, a count gone wrong) must reach every
    caller as an error: the engine thread fails everything it holds instead of dying with callers waiting
    forever. (Planted double releases hung the suite for minutes.)"""
    model = fresh()

    def release(block_ids):
        raise ValueError("a block released more times than it is held")

    monkeypatch.setattr(model.engine.pool, "release", release)
    requests = [model.submit(model.prompt(f"Question {i}.", []), dict(max_new_tokens=4)) for i in range(3)]
    for request in requests:
        assert request._done.wait(30), "a caller was left waiting"
        with pytest.raises(ValueError, match="released more times"):
            request.result()


def test_a_stream_gives_every_id_then_raises_the_engines_error():
    """The engine's error reaches a consumer that streams, blocking or awaiting, after the ids delivered before
    it (a stream that just ended would pass a failed answer off as a finished one)."""
    import asyncio

    from pyvl.engine.channel import TokenChannel

    def failed() -> TokenChannel:
        channel = TokenChannel()
        for token in (4, 5, 6):
            channel.append(token)
        channel.close(ValueError("the step failed"))
        return channel

    got = []
    with pytest.raises(ValueError, match="the step failed"):
        for token in failed().tokens():
            got.append(token)
    assert got == [4, 5, 6]

    async def batches():
        ids = []
        with pytest.raises(ValueError, match="the step failed"):
            async for batch in failed().batches():
                ids += batch
        return ids

    assert asyncio.run(batches()) == [4, 5, 6]
    done = TokenChannel()
    done.append(7)
    done.close()
    assert list(done.tokens()) == [7]


# ---- prefix cache eviction ---------------------------------------------------------------------------------
def test_a_full_pool_evicts_the_least_recently_used_prefix():
    """With the pool full of cached prefixes, a new prompt takes the blocks of the one used longest ago: the one
    asked last still answers from the cache."""
    probe = fresh()
    per_block, block = probe.engine.cache.nbytes / probe.engine.pool.num_blocks, probe.engine.pool.block_size
    probe.close()
    model = fresh(kv_cache_gb=9 * per_block / 1e9, max_num_seqs=1)  # two prompts' blocks, not three
    try:
        topics = ["the sea and its tides", "mountains in winter", "a city market at dawn"]
        questions = [f"Write a long and detailed story about {t}. " * 9 for t in topics]
        sizes = [len(model.prompt(q, []).ids) for q in questions]
        assert all(3 * block < n < 4 * block for n in sizes) and model.engine.pool.num_blocks == 9, sizes
        gen = dict(max_new_tokens=2)
        for q in questions:  # the third evicts the first's blocks (the least recently used), not the second's
            model.chat(None, q, gen)
        again = pyvl.ChatStats()
        model.chat(None, questions[1], gen, stats=again)
        assert again.cached_tokens >= 3 * block
    finally:
        model.close()
