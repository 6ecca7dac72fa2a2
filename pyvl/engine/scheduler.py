"""Which requests run, and on what memory: the engine's queue of waiting requests and its list of running ones,
admission against the block pool and the sampler's slots, the prefix cache, preemption (nano-vllm's Scheduler).

Admission: waiting requests are admitted, oldest first, while fewer than ``max_num_seqs`` run and the pool can
hold their prompts; each takes the longest cached prefix of its prompt (full blocks by chained hash, then a tail,
copied) and prefills only the rest. When the pool runs out, the youngest running request is preempted: its full
blocks are registered (so its recompute usually hits the prefix cache), freed, and it goes back to the front of
the queue with its output so far; it resumes exactly where it was. A request that cannot fit even in an empty
pool fails with a PromptError. Prefix caching is off for prompts longer than max_position_embeddings under dynamic
NTK (their keys are rotated with a base that depends on the whole length) and for prompt-logits requests.

The n choices of one call are admitted together (n sampler slots, and room for n - 1 copies of a partial block):
the first prefills the prompt, then :meth:`Scheduler.fork` starts the others on its blocks, each sharing the full
ones and copying the partial last one; from then on each is a request of its own (preempted and resumed alone).

Used from the engine thread alone (pyvl.engine.engine), which owns it.
"""

from __future__ import annotations

import functools
import time
from collections import deque

from ..errors import PromptError
from .blocks import BlockPool, PoolExhausted, SequenceBlocks
from .request import Request
from .sampling import Sampler

__all__ = ["Scheduler"]


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        runner,  # ModelRunner, or pyvl.parallel's DrivenRunner: copy_slots is a model call under tensor parallelism
        sampler: Sampler,
        max_num_seqs: int,
        prefix_caching: bool,
        prefix_limit: int | None,
    ):
        self.pool = pool
        self.runner = runner
        self.sampler = sampler
        self.max_num_seqs = max_num_seqs
        self.prefix_caching = prefix_caching
        self.prefix_limit = prefix_limit  # longest prompt whose keys do not depend on its length (None: any)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))  # one sampler slot per running request

    def end_cancelled(self) -> None:
        for r in [r for r in list(self.running) + list(self.waiting) if r.cancelled.is_set()]:
            self.end(r)

    def end_all(self, error: BaseException) -> None:
        for r in list(self.running) + list(self.waiting):
            try:
                self.end(r, error)
            except Exception:  # the bookkeeping itself is broken (a bug): the caller still hears, never hangs
                for queue in (self.running, self.waiting):
                    if r in queue:
                        queue.remove(r)
                for f in [r, *r.followers]:
                    f.finish(error)
                r.followers = []

    def admit(self) -> None:
        while self.waiting:
            r = self.waiting[0]
            unforked = sum(len(x.followers) for x in self.running)  # slots promised to choices not started
            if len(self.running) + unforked + 1 + len(r.followers) > self.max_num_seqs:
                return
            tokens = r.tokens_to_compute
            cacheable = (
                self.prefix_caching
                and not r.prompt_logits
                and (self.prefix_limit is None or len(r.prompt_ids) + r.rope_offset <= self.prefix_limit)
            )
            if cacheable:  # always compute the last prompt token: its logits choose the first new one
                match = self.pool.match_prefix(
                    r.all_keys()[: len(tokens)], max_tokens=len(tokens) - (0 if r.output_ids else 1)
                )
            else:
                match = None
            seq = SequenceBlocks(self.pool, match)
            cached = match.num_tokens if match else 0
            room = len(tokens) + (
                0 if r.prompt_logits else 1
            )  # a generating request needs its next token's slot
            # the other choices of an n > 1 call each copy the partial last block of the prompt
            needed = -(-room // self.pool.block_size) - len(seq.block_ids) + len(r.followers)
            if needed > self.pool.num_available:
                seq.release()
                if match and match.tail:
                    self.pool.release([match.tail.block_id])
                if not self.running:  # even an empty pool cannot hold it
                    self.waiting.popleft()
                    self.end(
                        r,
                        PromptError(
                            f"the prompt needs {needed + len(seq.block_ids)} KV blocks of {self.pool.block_size} "
                            f"tokens but the pool has {self.pool.num_blocks}; load with a larger kv_cache_gb"
                        ),
                    )
                    continue
                return  # wait for running requests to free blocks
            self.waiting.popleft()
            # running from here on: should the rest fail, end_all ends r and frees its blocks, never loses it
            r.seq = seq
            self.running.append(r)
            if match and match.tail:  # copy-on-write: the tail's tokens into this sequence's own block
                tail = match.tail
                try:
                    self.runner.copy_slots(
                        list(tail.source_slots(self.pool.block_size)), seq.append_slots(tail.num_tokens)
                    )
                finally:
                    self.pool.release([tail.block_id])
            if r.stats.queue_s == 0.0 and not r.output_ids:
                r.stats.queue_s = time.perf_counter() - r.created_at
            r.num_computed = cached
            r.slot = self._free_slots.pop()
            self.sampler.activate(r.slot, r.gen, r.output_ids, r.generator)
            if not r.output_ids:
                r.stats.cached_tokens = cached
            r.cacheable = cacheable

    def slots(self, r: Request, n: int) -> list[int] | None:
        """Slots for r's next n tokens, preempting younger requests when the pool is full; None if r itself
        was preempted or failed (it alone does not fit)."""

        def fail(exc: PoolExhausted) -> None:
            self.end(
                r,
                PromptError(
                    f"request of {len(r.tokens_to_compute) + 1} tokens does not fit the KV pool ({exc}); load "
                    "with a larger kv_cache_gb"
                ),
            )

        return self._with_room(r, lambda: r.seq.append_slots(n), fail)

    def _with_room(self, r: Request, allocate, fail):
        """allocate() for r, preempting the youngest other running request while the pool is exhausted; None,
        after fail(exc), when no other request is left to preempt."""
        while True:
            try:
                return allocate()
            except PoolExhausted as exc:
                victim = next((v for v in reversed(self.running) if v is not r), None)
                if victim is None:
                    fail(exc)
                    return None
                self.preempt(victim)

    def fork(self, r: Request) -> list[Request]:
        """Start the other choices of r, whose prompt is now prefilled (see the module doc); the ones started, in
        order. A choice that cannot get a block even after preempting every younger request fails alone."""
        started = []
        # one at a time: should a fork fail, ending r still reaches the choices not started
        while r.followers:
            f = r.followers.pop(0)
            if f.cancelled.is_set():
                f.finish()
                continue
            try:
                forked = self._with_room(r, r.seq.fork, functools.partial(_choice_does_not_fit, f))
                if forked is None:
                    continue
                f.seq, src, dst = forked
                if src:
                    self.runner.copy_slots(src, dst)
            except Exception as exc:  # f hears the error and frees its blocks; r's caller ends r and the rest
                self.end(f, exc)
                raise
            f.num_computed, f.cacheable = r.num_computed, r.cacheable
            f.stats.queue_s, f.stats.cached_tokens = r.stats.queue_s, r.stats.cached_tokens
            f.slot = self._free_slots.pop()
            self.sampler.activate(f.slot, f.gen, (), f.generator)
            self.running.append(f)
            started.append(f)
        return started

    def preempt(self, r: Request) -> None:
        self.register(r)
        self._release_slot(r)
        r.seq.release()
        r.seq, r.num_computed = None, 0
        r.stats.preemptions += 1
        self.running.remove(r)
        self.waiting.appendleft(r)

    def register(self, r: Request) -> None:
        """Offer r's full blocks to the prefix cache: only those whose every token's K/V is computed (a slot
        taken for this step's token is not written until the step runs)."""
        if r.cacheable and r.num_computed // self.pool.block_size > len(r.seq.hashes):  # a block filled since
            r.seq.register_full_blocks(r.all_keys(), upto=r.num_computed)

    def _release_slot(self, r: Request) -> None:
        """Give r's sampler slot back, keeping its random stream (a preempted request resumes with it)."""
        if r.slot is not None:
            r.generator = self.sampler.generator(r.slot)
            self.sampler.deactivate(r.slot)
            self._free_slots.append(r.slot)
            r.slot = None

    def end(self, r: Request, error: BaseException | None = None) -> None:
        """Finish r (done, cancelled or failed): cache what it computed, free its blocks, tell the caller."""
        if r.seq is not None:
            try:
                if error is None:  # after a failed step the K/V of its tokens may be half written: share none
                    self.register(r)
                    if r.cacheable and r.seq.num_tokens == r.num_computed:
                        r.seq.register_tail(r.all_keys())
            finally:
                r.seq.release()
                r.seq = None
        self._release_slot(r)
        if r in self.running:
            self.running.remove(r)
        if r in self.waiting:
            self.waiting.remove(r)
        r.finish(error)
        for f in r.followers:  # choices that never started share the first one's fate
            if error is None:
                f.cancel()
            f.finish(error)
        r.followers = []


def _choice_does_not_fit(f: Request, exc: PoolExhausted) -> None:
    f.finish(
        PromptError(f"choice {f.choice} does not fit the KV pool ({exc}); load with a larger kv_cache_gb")
    )
