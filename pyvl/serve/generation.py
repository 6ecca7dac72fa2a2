"""One chat completion running on the model's engine, off the event loop.

A daemon thread iterates ``model.stream`` (which blocks between tokens) and hands each text piece to the event
loop through an ``asyncio.Queue`` (``call_soon_threadsafe``): items are ``("piece", text)``, then ``("end",
finish_reason)`` or ``("error", exception)``. ``cancel()`` (client gone, server shutting down) makes the thread
close the stream at the next token, which cancels the engine request and frees its KV blocks.
Stop strings are matched on the text: what could still be the start of a stop string is held back, the match
and everything after it is never sent, and the generation stops there.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from ..engine.request import ChatStats

__all__ = ["Generation", "StopMatcher", "Disconnected"]

log = logging.getLogger("pyvl.serve")


class Disconnected(Exception):
    """The client went away (queued by the disconnect watcher)."""


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string matched)."""
        buffer = self.pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buffer[:min(hits)], True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(buffer)), 0, -1)
                    if buffer.endswith(s[:n])), default=0)
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class Generation:
    def __init__(self, model, loop: asyncio.AbstractEventLoop, pixels, patches, call):
        self.model = model
        self.loop = loop
        self.pixels = pixels
        self.patches = patches
        self.call = call
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stats = ChatStats()
        self.cancelled = threading.Event()

    def start(self) -> "Generation":
        threading.Thread(target=self._run, name="pyvl-serve-request", daemon=True).start()
        return self

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop at the next token; ``reason``, when given, is queued for the response (it ends the stream)."""
        self.cancelled.set()
        if reason is not None:
            self.queue.put_nowait(("error", reason))

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server exiting): nobody is listening
            pass

    def _run(self) -> None:
        call, matcher = self.call, StopMatcher(self.call.stops)
        finish = None
        try:
            pieces = self.model.stream(self.pixels, call.question, call.generation, history=call.history or None,
                                       num_patches_list=self.patches, stats=self.stats,
                                       system_message=call.system_message)
            try:
                for piece in pieces:
                    if self.cancelled.is_set():
                        return
                    text, matched = matcher.push(piece)
                    if text:
                        self._put(("piece", text))
                    if matched:
                        finish = "stop"
                        break
                else:
                    tail = matcher.flush()
                    if tail:
                        self._put(("piece", tail))
            finally:
                pieces.close()  # cancels the engine request if it is still running
            self._put(("end", finish or self.stats.finish_reason))
        except Exception as exc:  # delivered to the response; PyvlErrors are the client's, others are logged there
            self._put(("error", exc))
