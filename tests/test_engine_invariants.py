"""The engine's bookkeeping checked after every step of busy, hostile workloads (golden v15 model, float32, CPU):
block-pool invariants and reference counts that match exactly the blocks the running requests hold, sequence
lengths that match what was computed, sampler slots that match the running requests; cancellation at every phase
of a request; preemption and resume equal to an uninterrupted run; exact stop and length limits."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from conftest import GOLDEN, image_for_key

import pyvl

CHECKPOINT = GOLDEN / "v15" / "checkpoint"


def fresh(**kwargs):
    return pyvl.load(CHECKPOINT, device="cpu", dtype="float32", backend="reference", **kwargs)


def checked(model) -> list[int]:
    """Check the engine's invariants after every step it takes from now on; returns [steps checked]."""
    engine, steps = model.engine, [0]
    real_step = engine._step

    def step() -> None:
        real_step()
        check_invariants(engine)
        steps[0] += 1

    engine._step = step
    scheduler, real_register = engine.scheduler, engine.scheduler.register

    def register(r) -> None:  # also from preempt and end, between the steps' own checks
        real_register(r)
        registered = len(r.seq.hashes) * engine.pool.block_size
        assert registered <= r.num_computed, "a block offered to the prefix cache before its K/V was written"

    scheduler.register = register
    return steps


def check_invariants(engine) -> None:
    pool, scheduler = engine.pool, engine.scheduler
    pool.check()
    held = Counter(b for r in scheduler.running for b in r.seq.block_ids)
    refs = {b: pool.ref_count(b) for b in range(pool.num_blocks)}
    assert refs == {b: held.get(b, 0) for b in range(pool.num_blocks)}, "a reference not held by any request"
    for r in scheduler.running:
        seq = r.seq
        assert seq.num_tokens == r.num_computed, "slots taken for tokens never computed"
        assert len(seq.block_ids) == -(-seq.num_tokens // pool.block_size), "a block too many or too few"
        assert len(seq.hashes) <= r.num_computed // pool.block_size, "a block registered before it was full"
        assert r.slot is not None and not r.finished
    for r in scheduler.waiting:
        assert r.seq is None and r.slot is None, "a waiting request holds blocks or a sampler slot"
    assert sorted(r.slot for r in scheduler.running) == engine.sampler.active_slots


def wait_idle(model, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not model.engine.idle:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


def one_tile_image():
    return pyvl.load_image(image_for_key("gradient_800x600@max1")[0], max_num=1)


def test_a_busy_mixed_workload_keeps_every_invariant_at_every_step():
    cold = fresh()
    pixels = one_tile_image()
    calls = [
        (pixels if i % 3 == 0 else None, f"Question {i % 4}: tell me about item {i % 4}.") for i in range(12)
    ]
    gen = dict(max_new_tokens=30)
    want = [cold.chat(p, q, gen) for p, q in calls]
    per_block = cold.engine.cache.nbytes / cold.engine.pool.num_blocks
    model = fresh(
        kv_cache_gb=14 * per_block / 1e9, max_num_seqs=6, max_batched_tokens=96
    )  # too small: preempts
    steps = checked(model)
    results, errors = [None] * len(calls), []

    def ask(i: int) -> None:
        try:
            pixels_i, question = calls[i]
            if i % 5 == 4:  # a stream closed after its first piece: cancelled mid-decode
                stream = model.stream(pixels_i, question, gen)
                next(stream)
                stream.close()
            else:
                results[i] = model.chat(pixels_i, question, gen)
        except Exception as exc:  # surfaced below: a worker thread never throws
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and steps[0] > 30
    assert [r for i, r in enumerate(results) if i % 5 != 4] == [w for i, w in enumerate(want) if i % 5 != 4]
    wait_idle(model)
    check_invariants(model.engine)
    assert model.engine.pool.num_in_use == 0


@pytest.mark.parametrize("phase", ["waiting", "prefilling", "decoding", "finished"])
def test_a_request_cancelled_in_any_phase_frees_everything(phase):
    model = fresh(max_num_seqs=1, max_batched_tokens=16)  # one at a time; a prompt takes several steps
    steps = checked(model)
    engine = model.engine
    blocker = model.submit(
        model.prompt("Tell me a very long story about the sea.", []), dict(max_new_tokens=300)
    )
    if phase != "waiting":
        blocker.cancel()
        wait_idle(model)
    stats = pyvl.ChatStats()
    question = "Describe the colours of a sunset over the sea in great detail."
    mid_prefill, resume = threading.Event(), threading.Event()
    if phase == "prefilling":  # the engine holds after the request's first chunk (polling could miss it)
        prefill_chunk = engine._prefill_chunk

        def first_chunk_then_hold(r, budget):
            done = prefill_chunk(r, budget)
            if r.stats is stats and 0 < r.num_computed < len(r.prompt_ids) and not mid_prefill.is_set():
                mid_prefill.set()
                resume.wait(30)
            return done

        engine._prefill_chunk = first_chunk_then_hold
    request = model.submit(model.prompt(question, []), dict(max_new_tokens=200, eos_token_id=[0]), stats)
    if phase == "waiting":
        _wait_for(lambda: request in engine.scheduler.waiting and blocker in engine.scheduler.running)
    elif phase == "prefilling":
        assert mid_prefill.wait(30), "the request's prompt never took more than one step"
    elif phase == "decoding":
        _wait_for(lambda: len(request.output_ids) >= 2)
    else:
        request.result()
    request.cancel()
    blocker.cancel()
    resume.set()
    wait_idle(model)
    check_invariants(engine)
    assert engine.pool.num_in_use == 0 and steps[0] > 0
    assert stats.finish_reason == ("length" if phase == "finished" else "cancelled")
    assert model.chat(None, "hi", dict(max_new_tokens=4)) == fresh().chat(None, "hi", dict(max_new_tokens=4))


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine never reached that phase"
        time.sleep(0.001)


@pytest.mark.parametrize("sampled", [False, True])
def test_preempted_requests_resume_exactly_where_they_were(sampled):
    gen = dict(max_new_tokens=60, eos_token_id=[0])
    if sampled:
        gen.update(do_sample=True, temperature=0.8, top_k=20, repetition_penalty=1.3, seed=7)
    questions = [f"Say something about the number {i}." for i in range(5)]
    big = fresh()
    want = [big.chat(None, q, gen) for q in questions]
    per_block = big.engine.cache.nbytes / big.engine.pool.num_blocks
    small = fresh(kv_cache_gb=7 * per_block / 1e9)
    checked(small)
    stats = [pyvl.ChatStats() for _ in questions]
    results = [None] * len(questions)
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, small.chat(None, questions[i], gen, stats=stats[i]))
        )
        for i in range(len(questions))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sum(s.preemptions for s in stats) > 0
    assert results == want


@pytest.mark.parametrize("tokens", [63, 64, 65, 127, 128, 129])
def test_prompts_around_block_boundaries_decode_as_a_full_recompute(tokens):
    model = fresh()
    checked(model)
    filler = model.tokenizer.encode(" ".join(["the sea"] * 200))[:tokens]
    new = model.generate(filler, None, dict(max_new_tokens=6, eos_token_id=[0]))[0].tolist()
    assert len(new) == 6
    assert new == [int(model.logits(filler + new[:k])[-1].argmax()) for k in range(6)]


def test_limits_stop_exactly_where_they_should():
    model = fresh()
    checked(model)
    ids = model.tokenizer.encode("Tell me a story.")
    free = model.generate(ids, None, dict(max_new_tokens=12, eos_token_id=[0]))[0].tolist()
    assert len(free) == 12  # exactly max_new_tokens
    stop = free[4]
    stopped = model.generate(ids, None, dict(max_new_tokens=12, eos_token_id=[stop]))[0].tolist()
    first = free.index(stop)
    assert stopped == free[: first + 1]  # the stop id is the last token, never one more


def test_the_repetition_penalty_sees_bos_and_the_answer_never_the_prompt():
    """Step by step against HF's processors (tests/hf_sampling.py): the penalised ids are BOS plus the tokens
    generated so far, as HF generate does when called with inputs_embeds (InternVL's chat does), never the
    prompt's. The prompt is made to end where the model would repeat one of its tokens, so that penalising the
    prompt would change the very first answer token."""
    import torch
    from hf_sampling import process_logits

    from pyvl.generation_config import GenerationConfig

    model = fresh()
    checked(model)
    ids = model.tokenizer.encode("Tell me a story.")
    greedy = model.generate(ids, None, dict(max_new_tokens=12, eos_token_id=[0]))[0].tolist()
    k = next(k for k in range(1, 12) if greedy[k] in ids + greedy[:k])  # the model repeats itself here
    prompt = ids + greedy[:k]
    cfg = GenerationConfig(max_new_tokens=8, repetition_penalty=3.0, eos_token_id=(0,))
    new = model.generate(prompt, None, cfg)[0].tolist()
    assert new[0] == greedy[k]  # not penalised: BOS is all the first step's penalty sees
    for step, token in enumerate(new):
        seen = torch.tensor([[model.tokenizer.bos_id, *new[:step]]])
        scores = process_logits(model.logits(prompt + new[:step])[-1:], seen, cfg)
        assert int(scores.argmax()) == token, f"step {step}"
