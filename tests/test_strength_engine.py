"""The engine core where held-out planted bugs of issue 19 went uncaught: the scheduler's admission (slots promised
to unforked choices, the first new token's block), which request is preempted and where it waits, what a
preempted request resumes from, what the forked choices inherit, failures while admitting or forking (they must
reach every caller, never lose a request), prompt logits over several chunks, a prompt preempted in the step it
was to be prefilled, token streams (closed early, stopped while waiting, every id once), the rotary length of
every decode row, a request's stats on a clock that ticks, and an image known only to the disk tier.

The scheduler tests drive pyvl.engine.scheduler directly, on a real BlockPool and Sampler and a runner that only
records copies, so every admission and preemption happens at a known step; the rest run the golden v15 model."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import GOLDEN
from test_engine import SHORT, wait_idle

import pyvl
import pyvl.engine.request as request_module
from pyvl.engine.blocks import BlockPool
from pyvl.engine.channel import TokenChannel
from pyvl.engine.request import Request
from pyvl.engine.sampling import Sampler
from pyvl.engine.scheduler import Scheduler
from pyvl.errors import PromptError
from pyvl.generation_config import GenerationConfig

BS = 4  # tokens per block in the scheduler tests


class CopyingRunner:
    """The runner's one call the scheduler makes: copying K/V slots (recorded, nothing to copy here)."""

    def __init__(self):
        self.copies: list[tuple[list[int], list[int]]] = []

    def copy_slots(self, src, dst) -> None:
        self.copies.append((list(src), list(dst)))


def scheduler(num_blocks: int, max_num_seqs: int = 4) -> Scheduler:
    pool = BlockPool(num_blocks, BS)
    return Scheduler(pool, CopyingRunner(), Sampler(max_num_seqs, 64, 1), max_num_seqs, True, None)


def request(prompt, n: int = 1) -> Request:
    """A greedy request, with its other n - 1 choices waiting as followers (as pyvl.chat submits them)."""
    first = Request(list(prompt), [], GenerationConfig(max_new_tokens=50), frozenset())
    for i in range(1, n):
        follower = Request(list(prompt), [], GenerationConfig(max_new_tokens=50), frozenset())
        follower.choice = i
        first.followers.append(follower)
    return first


def compute(s: Scheduler, r: Request, n: int) -> None:
    """What an engine step does for r: slots for its next n tokens, their K/V computed, full blocks offered."""
    assert s.slots(r, n) is not None
    r.num_computed += n
    s.register(r)


def step(s: Scheduler, r: Request, token: int) -> None:
    """Deliver a token to r, then feed it (one decode step)."""
    r.deliver(token, None)
    compute(s, r, 1)


def test_the_youngest_running_request_is_preempted_and_waits_first_in_line():
    """When the pool is full, the youngest other running request gives its blocks back (the oldest keeps going),
    and it goes back to the FRONT of the queue, ahead of requests that never ran, with nothing held."""
    s = scheduler(num_blocks=3, max_num_seqs=3)
    a, b, c, d = (request([10 + i, 20, 30]) for i in range(4))
    s.waiting.extend([a, b, c, d])
    s.admit()
    assert s.running == [a, b, c] and list(s.waiting) == [d]
    for r in (a, b, c):
        compute(s, r, 3)
        step(s, r, 5)  # the 4th token fills each one's only block
    step(s, a, 6)  # a's 5th token needs a block: c, the youngest, is preempted
    assert s.running == [a, b] and list(s.waiting) == [c, d]
    assert (c.stats.preemptions, a.stats.preemptions, b.stats.preemptions) == (1, 0, 0)
    assert c.seq is None and c.slot is None and c.num_computed == 0
    assert s.sampler.active_slots == sorted([a.slot, b.slot])
    s.pool.check()


def test_a_preempted_request_resumes_from_the_blocks_it_computed():
    """A preempted request's computed full blocks go to the prefix cache, so on readmission it recomputes none of
    them: it resumes decoding at once."""
    s = scheduler(num_blocks=3)
    a, b = request([1, 2, 3]), request([7, 8, 9, 10])
    s.waiting.extend([a, b])
    s.admit()
    compute(s, a, 3)
    compute(s, b, 4)  # b's one block is full (and registered)
    step(s, a, 5)
    b.deliver(11, None)
    assert s.slots(b, 1) is not None  # b takes the last free block for its 5th token
    step(s, a, 6)  # a needs one: b is preempted with its full block computed, its 5th token not
    assert list(s.waiting) == [b] and s.pool.num_cached == 1
    s.end(a)
    s.admit()
    assert s.running == [b] and b.num_computed == 4 and not b.prefilling
    assert b.output_ids == [11] and b.stats.cached_tokens == 0  # the prompt was not cached when b started


def test_admission_keeps_the_slots_of_choices_not_yet_forked():
    """A call of n choices holds n sampler slots from its admission, before its other choices are forked: a
    request behind it waits instead of taking a slot the fork will need."""
    s = scheduler(num_blocks=20, max_num_seqs=3)
    choices, single = request([1, 2, 3, 4, 5, 6], n=3), request([9, 9, 9])
    s.waiting.extend([choices, single])
    s.admit()
    assert s.running == [choices] and list(s.waiting) == [single]
    compute(s, choices, 6)
    followers = list(choices.followers)
    assert s.fork(choices) == followers and s.running == [choices, *followers]
    assert len(s.running) == 3 and sorted(r.slot for r in s.running) == [0, 1, 2]
    s.admit()
    assert list(s.waiting) == [single]


def test_admission_counts_the_block_of_the_first_new_token():
    """A generating prompt needs a slot for its first new token too: a prompt that exactly fills an empty pool
    cannot be answered and fails at admission, before any work; one token shorter, it runs."""
    s = scheduler(num_blocks=2)
    exact = request(range(1, 2 * BS + 1))
    s.waiting.append(exact)
    s.admit()
    assert exact.finished and s.running == [] and exact.output_ids == []
    with pytest.raises(PromptError, match="needs 3 KV blocks"):
        exact.result()
    shorter = request(range(1, 2 * BS))
    s.waiting.append(shorter)
    s.admit()
    assert s.running == [shorter]
    compute(s, shorter, 2 * BS - 1)
    shorter.deliver(5, None)
    assert s.slots(shorter, 1) is not None  # the first new token's slot, in the blocks admission counted


def test_forked_choices_inherit_the_prompt_stats_and_a_cancelled_one_never_starts():
    """Choices forked from a prefilled prompt report its cached tokens and queue time (they share that prompt),
    and a choice cancelled before the fork ends there: cancelled, without blocks, slot or tokens."""
    s = scheduler(num_blocks=20)
    warm = request([1, 2, 3, 4, 5, 6, 7, 8, 9])
    s.waiting.append(warm)
    s.admit()
    compute(s, warm, 9)
    s.end(warm)  # its two full blocks stay cached
    first = request([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], n=3)
    cancelled, kept = first.followers
    s.waiting.append(first)
    s.admit()
    assert first.num_computed == first.stats.cached_tokens == 9  # two full blocks and the tail's one token
    compute(s, first, 1)
    cancelled.cancel()
    assert s.fork(first) == [kept]
    assert s.running == [first, kept]
    # the tail's one token copied at admission, then the partial last block's two for the one choice forked
    assert [len(src) for src, _ in s.runner.copies] == [1, 2]
    assert (kept.stats.cached_tokens, kept.stats.queue_s) == (first.stats.cached_tokens, first.stats.queue_s)
    assert cancelled.finished and cancelled.stats.finish_reason == "cancelled"
    assert cancelled.seq is None and cancelled.slot is None and cancelled.output_ids == []


# ---- the engine on the golden model ----------------------------------------------------------------------------
CHECKPOINT = GOLDEN / "v15" / "checkpoint"


def fresh(**kwargs):
    return pyvl.load(CHECKPOINT, device="cpu", dtype="float32", backend="reference", **kwargs)


def failing_copies(monkeypatch, model) -> None:
    def copy_slots(src, dst):
        raise RuntimeError("planted copy failure")

    monkeypatch.setattr(model.engine.runner, "copy_slots", copy_slots)


def ends_with_the_error(requests) -> None:
    for r in requests:
        assert r._done.wait(20), f"choice {r.choice} was lost: its caller would wait forever"
        with pytest.raises(RuntimeError, match="planted copy failure"):
            r.result()


def test_a_failure_while_admitting_reaches_the_caller_and_frees_everything(monkeypatch):
    """Copying a cached tail happens while the request is admitted: if it fails, the request must end with the
    error (not vanish between the queue and the running list, its caller waiting forever) and hold nothing."""
    model = fresh()
    model.chat(None, "Tell me about cats.", dict(max_new_tokens=4))
    failing_copies(monkeypatch, model)
    request = model.submit(model.prompt("Tell me about dogs.", []), dict(max_new_tokens=4))
    ends_with_the_error([request])
    monkeypatch.undo()
    wait_idle(model)
    model.engine.pool.check()
    assert model.engine.pool.num_in_use == 0
    assert model.chat(None, "Tell me about dogs.", SHORT) == fresh().chat(None, "Tell me about dogs.", SHORT)


def test_a_failure_while_forking_choices_reaches_every_choice(monkeypatch):
    """Forking copies the prompt's partial last block for each other choice: if that fails, every choice of the
    call ends with the error (none is left waiting) and the pool is left clean."""
    model = fresh(prefix_caching=False)  # the only copies are the fork's
    failing_copies(monkeypatch, model)
    requests = model.submit_choices(model.prompt("Name a colour.", []), dict(n=3, max_new_tokens=4))
    ends_with_the_error(requests)
    monkeypatch.undo()
    wait_idle(model)
    model.engine.pool.check()
    assert model.engine.pool.num_in_use == 0


def test_prompt_logits_cover_every_chunk_of_a_long_prompt():
    """model.logits() of a prompt prefilled in several chunks (max_batched_tokens) gives a row for every token,
    the very rows of a one-chunk prefill: the request ends after its last chunk, not its first."""
    chunked = fresh(max_batched_tokens=16)
    ids = chunked.tokenizer.encode(
        "Tell me a long story about the sea, the ships and the sailors on them. " * 3
    )
    assert len(ids) > 2 * 16
    got = chunked.logits(ids)
    assert got.shape == (len(ids), chunked.config.llm.vocab_size)
    torch.testing.assert_close(got, fresh().logits(ids), rtol=1e-4, atol=1e-4)


def test_closing_a_stream_early_cancels_its_request():
    """A consumer that stops reading (closes the token stream, blocking or async) cancels the request at once,
    so the engine stops generating for nobody and frees its blocks; the answer ends 'cancelled'."""
    model = fresh()
    for consume in ("blocking", "async"):
        stats = pyvl.ChatStats()
        request = model.submit(
            model.prompt("Tell me a very long story.", []), dict(max_new_tokens=400, eos_token_id=[0]), stats
        )
        if consume == "blocking":
            stream = request.stream_tokens()
            next(stream)
            stream.close()
        else:

            async def first_batch():
                batches = request.batches()
                await anext(batches)
                await batches.aclose()

            asyncio.run(first_batch())
        assert request.cancelled.is_set(), consume
        assert request._done.wait(20)
        assert stats.finish_reason == "cancelled" and len(request.output_ids) < 400
    wait_idle(model)
    assert model.engine.pool.num_in_use == 0


def test_a_waiting_consumer_stops_when_its_stop_condition_holds():
    """A consumer blocked on a channel with no new id (its request still queued, say) must return as soon as its
    stop condition holds and it is woken (Request.cancel does both), blocking or async, not wait for an id that
    may never come."""
    for consume in ("blocking", "async"):
        channel, stop, got = TokenChannel(), threading.Event(), []
        channel.append(3)

        def read():
            if consume == "blocking":
                got.extend(channel.tokens(stop.is_set))
            else:

                async def batches():
                    async for ids in channel.batches(stop.is_set):
                        got.extend(ids)

                asyncio.run(batches())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while not got:  # it has read the one id and waits for more
            reader.join(0.01)
        stop.set()
        channel.wake()
        reader.join(10)
        assert not reader.is_alive(), f"a {consume} consumer kept waiting after its stop condition held"
        assert got == [3]


def test_a_prompt_preempted_by_an_older_one_in_the_same_step_resumes_later():
    """An older prompt's prefill can preempt a younger one that holds cached blocks in the very step the younger
    one was to be prefilled: the younger one is skipped (it holds nothing now), readmitted later, and both get
    the answers they get alone."""
    gen = GenerationConfig(max_new_tokens=6, eos_token_id=(0,))
    shared = [1] + [300 + i % 50 for i in range(149)]  # prefilled first: its blocks stay cached
    younger = shared[:140] + [700 + i for i in range(10)]  # 2 cached full blocks, then a cached tail
    older = [2] + [900 + i % 80 for i in range(199)]  # 4 blocks of its own (its first token's included)
    alone = fresh()
    want = [alone.generate(ids, None, gen)[0].tolist() for ids in (older, younger)]
    per_block = alone.engine.cache.nbytes / alone.engine.pool.num_blocks
    model = fresh(kv_cache_gb=4 * per_block / 1e9)
    engine = model.engine
    assert engine.pool.num_blocks == 4 and engine.pool.block_size == 64
    model.generate(shared, None, dict(max_new_tokens=2, eos_token_id=[0]))
    requests = [Request(ids, [], gen, frozenset({0})) for ids in (older, younger)]
    with engine._wake:  # both reach the engine's queue together: admitted in one step, the older first
        for r in requests:
            engine.submit(r)
    assert [r.result() for r in requests] == want
    assert [r.stats.preemptions for r in requests] == [0, 1]
    wait_idle(model)
    engine.pool.check()


def test_every_id_reaches_a_streaming_consumer_once_and_in_order():
    """Joined, the batches an async consumer awaits and the ids a blocking one reads are the answer itself: no
    id repeated or skipped however the engine's appends and the consumer's looks interleave."""
    model = fresh()
    gen = dict(max_new_tokens=40, eos_token_id=[0])
    want = model.generate(model.prompt("Count to twenty.", []).ids, None, gen)[0].tolist()

    # one id more than the answer is enough to fail (a stream that repeats ids never ends)
    def read(ids, got) -> bool:
        got += ids
        return len(got) > len(want)

    async def awaited():
        request, got = model.submit(model.prompt("Count to twenty.", []), gen), []
        async for ids in request.batches():
            if read(ids, got):
                break
        return got, request

    streamed, request = asyncio.run(awaited())
    assert streamed == request.result() == want
    request, streamed = model.submit(model.prompt("Count to twenty.", []), gen), []
    for token in request.stream_tokens():
        if read([token], streamed):
            break
    assert streamed == request.result() == want


def test_each_decode_row_is_rotated_for_its_length_after_the_token():
    """Under dynamic NTK the rotary base depends on the sequence length, which for a decode row is its position
    plus one (the token it feeds), plus its left padding in a batch call (Request.rope_offset): the length the
    original's padded batch has at that step."""
    model = fresh()
    engine = model.engine
    prompts = [model.tokenizer.encode("Tell me a story about the sea."), model.tokenizer.encode("Hi.")]
    pad = len(prompts[0]) - len(prompts[1])
    rows, real_fill = [], engine.runner.fill
    engine.runner.fill = lambda batch: (rows.append(list(batch)), real_fill(batch))
    gen = GenerationConfig(max_new_tokens=5, eos_token_id=(0,))
    requests = [
        Request(ids, [], gen, frozenset({0}), rope_offset=offset) for ids, offset in zip(prompts, (0, pad))
    ]
    with engine._wake:  # both reach the engine together: prefilled in one step, then decoded side by side
        for r in requests:
            engine.submit(r)
    assert [len(r.result()) for r in requests] == [5, 5]
    assert [len(batch) for batch in rows] == [2] * 4
    for long, short in rows:
        assert (long.rope_length, short.rope_length) == (long.position + 1, short.position + 1 + pad)


def test_a_requests_stats_time_its_first_token_and_its_decode_rate(monkeypatch):
    """On a clock that ticks one second per reading: the time to first token is the first token's, never a later
    one's, and the decode rate counts the tokens after the first over the time after it."""
    ticks = iter(range(100, 200))
    monkeypatch.setattr(request_module, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    r = Request([1, 2, 3], [], GenerationConfig(max_new_tokens=3), frozenset())  # submitted at 100
    for token in (7, 8, 9):  # delivered at 101, 102, 103
        r.deliver(token, None)
    r.finish()  # at 104
    s = r.stats
    assert (s.new_tokens, s.time_to_first_token_s, s.total_s, s.finish_reason) == (3, 1.0, 4.0, "length")
    assert s.decode_tokens_per_s == 2 / 3  # tokens 2 and 3 in the 3 s after the first
    assert pyvl.ChatStats(new_tokens=1, time_to_first_token_s=1.0, total_s=2.0).decode_tokens_per_s == 0.0


def test_an_image_known_only_to_the_disk_tier_is_neither_tiled_nor_encoded_and_moves_to_memory(tmp_path):
    """A model whose memory cache is empty but whose disk tier holds an image's features answers about it without
    tiling it (the front door asks the engine, which asks both tiers) or running the ViT, keeps the features in
    memory afterwards (a second turn reads no file), and answers as the model that encoded it."""
    from test_front_door import count_tiling, photo, png

    path = tmp_path / "a.png"
    path.write_bytes(png(photo(3)))
    load = dict(device="cpu", dtype="float32", backend="reference", image_cache_dir=tmp_path / "features")
    writer = pyvl.load(GOLDEN / "v15" / "checkpoint", **load)
    answer = writer.chat(str(path), "What is in the image?", SHORT)
    writer.engine.shutdown()  # the features queued for the disk are written
    reader = pyvl.load(GOLDEN / "v15" / "checkpoint", **load)
    tiled, stats = count_tiling(reader), pyvl.ChatStats()
    assert reader.chat(str(path), "What is in the image?", SHORT, stats=stats) == answer
    assert (tiled[0], stats.images_encoded, len(reader.engine.features)) == (0, 0, 1)
    reader.engine.store.get = None  # a second turn must not touch the disk
    assert reader.chat(str(path), "What is in the image?", SHORT) == answer
