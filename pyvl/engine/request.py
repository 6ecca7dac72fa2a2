"""One call to the engine: its prompt, images, generation settings and stop set, its results and its stats.

A :class:`Request` is built by the caller's thread, handed to :meth:`pyvl.engine.engine.Engine.submit`, and
from then on written only by the engine thread, except :meth:`Request.cancel` (a flag) and its output channel
(pyvl.engine.channel), through which the engine hands the caller each new token, then the end (or the error); the
caller reads it blocking (:meth:`Request.stream_tokens`, :meth:`Request.result`) or awaiting (:meth:`Request.batches`). Nothing in a request is
shared with another request: the stats of one call are that call's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch

from ..generation_config import GenerationConfig
from .blocks import ContentKey, SequenceBlocks, content_keys
from .channel import TokenChannel
from .clock import StageClock
from .constraints import Constraint
from .sampling import TokenLogprobs

__all__ = ["ChatStats", "ImageInput", "Request"]


@dataclass
class ChatStats:
    """What one call cost; pass ``stats=ChatStats()`` to chat/stream/generate to have it filled in."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not prefilled)
    new_tokens: int = 0
    images: int = 0
    images_encoded: int = 0  # images that ran through the ViT (the others came from the feature cache)
    # Where the time to first token went. preprocess_s: the caller's thread, from the call to the engine's queue
    # (checks, images, prompt, tokenizing); queue_s: waiting for admission; then device time (CUDA events on a
    # GPU) of the ViT + projector, of the prefill chunks, and of sampling the first token. What TTFT holds beyond
    # their sum is host work between the stages.
    preprocess_s: float = 0.0
    queue_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    prefill_chunks: int = 0
    sample_s: float = 0.0  # the first token's
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    preemptions: int = 0
    # "stop" (a stop id, or the grammar complete), "length" (max_new_tokens or the context), "cancelled", "error"
    finish_reason: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_time if self.new_tokens > 1 and decode_time > 0 else 0.0


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: its digest, where its tokens sit in the prompt, and how to get its tiles.

    ``tiles()`` is called only when the image's features are needed (neither the prefix cache nor the feature
    cache has them), so a known raw image is not even preprocessed again.
    """

    digest: bytes
    start: int  # index of its first <IMG_CONTEXT> token
    length: int  # tiles * num_image_token
    tiles: Callable[[], torch.Tensor]  # -> [N, 3, S, S] on any device


class Request:
    def __init__(
        self,
        prompt_ids: list[int],
        images: list[ImageInput],
        gen: GenerationConfig,
        stop_ids: frozenset[int],
        output_scores: bool = False,
        stats: ChatStats | None = None,
        started_at: float | None = None,
        rope_offset: int = 0,
        prompt_logits: bool = False,
        constraint: Constraint | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.images = images
        self.gen = gen
        self.stop_ids = stop_ids
        self.output_scores = output_scores
        # Only the prompt's logits at every position (model.logits()): prefilled whole, nothing generated.
        self.prompt_logits = prompt_logits
        self.logits: list[torch.Tensor] = []  # float32 [chunk, vocab] per prefill chunk, when prompt_logits
        # The original runs a batch left-padded to its longest prompt, and its rotary table (which differs only
        # past max_position_embeddings, under dynamic NTK) is sized by that padded length: rows of a batch call
        # count their length from there, so they get the very same rotations.
        self.rope_offset = rope_offset
        self.constraint = constraint  # its grammar (structured output), advanced by the engine thread
        # The other choices of an n > 1 call: they wait here until this request's prompt is prefilled, then
        # start from its KV blocks (Scheduler.fork) and run as requests of their own.
        self.followers: list[Request] = []
        self.choice = 0  # its index among the choices of its call
        self.stats = stats if stats is not None else ChatStats()
        self.stats.prompt_tokens = len(prompt_ids)
        self.stats.images = len(images)
        self.keys: tuple[ContentKey, ...] = content_keys(
            prompt_ids, [(i.start, i.length, i.digest) for i in images]
        )
        # The call's start (preprocessing and hashing its images included): time to first token counts from here.
        now = time.perf_counter()
        self.submitted_at = started_at if started_at is not None else now
        self.stats.preprocess_s = now - self.submitted_at
        self.created_at = now  # when it was handed to the engine (queue time counts from here)
        # Engine-thread state.
        self._channel = TokenChannel()
        self.output_ids = self._channel.ids  # appended only through deliver()
        self.scores: list[torch.Tensor] = []
        # Per output id, when gen.logprobs: (its logprob, top (id, logprob) pairs); appended before the id is
        # delivered, so a consumer that has read k ids can read the first k entries.
        self.logprobs: list[TokenLogprobs] = []
        self.seq: SequenceBlocks | None = None
        self.num_computed = 0  # tokens whose K/V is in the cache
        self.cacheable = False  # its blocks may be shared through the prefix cache (set at admission)
        self.slot: int | None = None  # its row of the engine's sampler while it runs
        self.generator: torch.Generator | None = None  # its random stream, kept across a preemption
        self.finished = False
        self._stages: list[tuple[str, object, object]] = []  # (ChatStats field, start, end) marks, unread
        self.cancelled = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None

    # ---- what the engine computes ------------------------------------------------------------------------
    @property
    def tokens_to_compute(self) -> list[int]:
        """Prompt plus every output token but the last (which is fed by the next decode step)."""
        return self.prompt_ids + self.output_ids[:-1]

    @property
    def prefilling(self) -> bool:
        """Tokens remain to be prefilled (the prompt, or after a preemption the prompt and the output so far)."""
        return self.num_computed < len(self.tokens_to_compute)

    def all_keys(self) -> tuple[ContentKey, ...]:
        """Content keys of every token fed so far: the prompt's, then the output ids."""
        return self.keys + tuple(self.output_ids)

    def time_stage(self, name: str, start, end) -> None:
        """Add the device time between two :class:`~pyvl.engine.clock.StageClock` marks to stats.<name>; read
        when the next token is delivered (its marks are complete by then), so the engine never waits for it."""
        self._stages.append((name, start, end))

    def _read_stages(self) -> None:
        for name, start, end in self._stages:
            setattr(self.stats, name, getattr(self.stats, name) + StageClock.seconds(start, end))
        self._stages.clear()

    # ---- engine -> caller --------------------------------------------------------------------------------
    def deliver(self, token: int, scores: torch.Tensor | None, logprobs: TokenLogprobs | None = None) -> None:
        if self._stages:
            self._read_stages()
        now = time.perf_counter()
        if not self.output_ids:
            self.stats.time_to_first_token_s = now - self.submitted_at
        if scores is not None and self.output_scores:
            self.scores.append(scores)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        self.stats.new_tokens = len(self.output_ids) + 1
        self.stats.total_s = now - self.submitted_at
        self._channel.append(token)

    def finish(self, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self._stages:
            try:
                self._read_stages()
            except Exception:  # after a failed step its events may never complete: the stats lose that stage
                self._stages.clear()
        if error is not None:
            self.stats.finish_reason = "error"
        elif self.cancelled.is_set():
            self.stats.finish_reason = "cancelled"
        else:
            stopped = bool(self.output_ids) and self.output_ids[-1] in self.stop_ids
            grammar_done = self.constraint is not None and self.constraint.complete
            self.stats.finish_reason = "stop" if stopped or grammar_done else "length"
        self.stats.total_s = time.perf_counter() - self.submitted_at
        self._error = error
        self._done.set()
        self._channel.close(error)

    # ---- caller side -------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generating; the engine frees this request's blocks at its next step, and a consumer waiting on
        the output stops waiting now."""
        self.cancelled.set()
        self._channel.wake()

    def stream_tokens(self) -> Iterator[int]:
        """Each new token id as the engine produces it (stop id included), until the end or a cancel; raises the
        engine's error, if any. Closing the iterator early cancels the request."""
        try:
            yield from self._channel.tokens(self.cancelled.is_set)
        finally:
            if not self.finished:
                self.cancel()

    async def batches(self) -> AsyncIterator[list[int]]:
        """The new token ids since the last batch, awaited on the running event loop (no thread waits for
        them); as :meth:`stream_tokens` otherwise. Closing the iterator early cancels the request."""
        try:
            async for ids in self._channel.batches(self.cancelled.is_set):
                yield ids
        finally:
            if not self.finished:
                self.cancel()

    def result(self) -> list[int]:
        """Block until the request finishes; its output ids. (One wake-up at the end, not one per token: a
        caller that does not stream leaves the engine thread the interpreter.)"""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self.output_ids
