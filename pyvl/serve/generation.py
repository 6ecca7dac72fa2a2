"""The choices of one completion on the model's engine, awaited on the event loop: no thread per request.

:meth:`Generation.events` yields one choice's ``("delta", text, logprobs)`` as the engine's tokens become text (the
model's text stream: stop ids and ``stop`` strings, whitespace as ``chat()`` strips it, or the raw bytes of a
constrained or raw completion; ``logprobs`` the :class:`~pyvl.results.TokenLogprob` of the tokens in the delta,
when asked for), then ``("end", finish_reason)`` or ``("error", exception)``. :class:`Call` runs the n choices of a
request (or of every prompt of a batched completion) and merges their events, each tagged with its choice index.
:meth:`Call.cancel` (the client left, the server is shutting down) cancels every engine request, which frees its
KV blocks at the engine's next step, and wakes the awaiting response at once.
"""

from __future__ import annotations

import asyncio
import time

from ..engine.request import ChatStats, Request
from ..results import TokenLogprob, token_logprobs

__all__ = ["Generation", "Call", "Disconnected"]


class Disconnected(Exception):
    """The client went away."""


class Generation:
    def __init__(self, model, request: Request, index: int, stops: tuple[str, ...], raw: bool = False):
        self.model = model
        self.request = request
        self.index = index  # the choice's index in the response
        self.stats: ChatStats = request.stats
        self.text = model.text_stream(request, stops, raw=raw)
        self.reason: BaseException | None = None  # why it was cancelled, when it was
        self.token_gaps: list[float] = []  # seconds between tokens as they reached this response
        # The tokens its answer kept: the engine may make a few more after a stop string before its cancel lands,
        # and how many depends on timing, so usage counts these.
        self.answer_tokens = 0

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop now; ``reason``, if given and the first one, ends the response as an error."""
        if reason is not None and self.reason is None:
            self.reason = reason
        self.request.cancel()

    def _logprobs(self, ids: list[int], start: int) -> list[TokenLogprob] | None:
        if not self.request.gen.logprobs:
            return None
        entries = self.request.logprobs[start : start + len(ids)]
        return token_logprobs(self.model.tokenizer, ids, entries, self.request.stop_ids)

    def _push(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text ``ids`` make, and the ids the answer keeps: none after the one that ends the text (a stop
        string or id), which may arrive in the same batch and must not get logprobs."""
        pieces = []
        for k, token in enumerate(ids):
            pieces.append(self.text.push(token))
            if self.text.stopped:
                return "".join(pieces), ids[: k + 1]
        return "".join(pieces), ids

    async def events(self):
        batches = self.request.batches()
        last = time.perf_counter()
        try:
            async for ids in batches:
                if self.reason is not None:
                    break
                now = time.perf_counter()
                if self.answer_tokens:  # a batch of k ids that arrived together: k gaps of (now - last) / k
                    self.token_gaps += [(now - last) / len(ids)] * len(ids)
                last = now
                piece, ids = self._push(ids)
                logprobs = self._logprobs(ids, self.answer_tokens)
                self.answer_tokens += len(ids)
                if piece or logprobs:
                    yield "delta", piece, logprobs
                if self.text.stopped:
                    break
            else:
                tail = self.text.finish()
                if tail:
                    yield "delta", tail, None
        except Exception as exc:
            yield (
                "error",
                exc,
            )  # delivered to the response: PyvlErrors are the client's, others are logged there
            return
        finally:
            await batches.aclose()  # cancels the engine request if it is still running
        if self.reason is not None:
            yield "error", self.reason
        else:
            yield "end", "stop" if self.text.matched_stop_string else self.stats.finish_reason


class Call:
    """Every choice of one request: cancelled together, their events merged in arrival order."""

    def __init__(self, generations: list[Generation]):
        self.generations = generations
        self._prompts = [g.stats for g in generations if g.request.choice == 0]  # one per prompt

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self._prompts)

    @property
    def cached_tokens(self) -> int:
        """Known once the engine has admitted the prompts."""
        return sum(s.cached_tokens for s in self._prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(g.answer_tokens for g in self.generations)

    def cancel(self, reason: BaseException | None = None) -> None:
        for generation in self.generations:
            generation.cancel(reason)

    async def events(self):
        """(choice index, event...) of every choice; a choice's "end" or "error" is its last event."""
        if len(self.generations) == 1:
            (only,) = self.generations
            async for event in only.events():
                yield (only.index, *event)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(generation: Generation) -> None:
            async for event in generation.events():
                await queue.put((generation.index, *event))

        tasks = [asyncio.create_task(pump(g)) for g in self.generations]
        try:
            for _ in range(len(self.generations)):
                while True:
                    event = await queue.get()
                    yield event
                    if event[1] != "delta":
                        break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
