"""A request's output: token ids from the engine thread to one consumer, who blocks or awaits on them.

The engine only appends and notifies, under a lock held for a few instructions: it never waits for a consumer,
whatever the consumer does. A consumer takes every id delivered since its last look in one go, so a slow one
costs the engine nothing and itself one wake-up per batch of ids. A blocking consumer waits on a condition; an
async one is woken through its own event loop (``call_soon_threadsafe``), and only when it is actually waiting,
so an asyncio server needs no thread per request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

__all__ = ["TokenChannel"]


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TokenChannel:
    def __init__(self):
        self.ids: list[int] = []  # every id delivered, in order; appended only by the engine thread
        self._cond = threading.Condition(threading.Lock())  # not reentrant: cheaper, and never re-entered
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    # ---- the engine's side ---------------------------------------------------------------------------------
    def append(self, token: int) -> None:
        with self._cond:
            self.ids.append(token)
            waiter = self._notify()
        self._wake(waiter)

    def close(self, error: BaseException | None = None) -> None:
        """No id will follow; ``error``, if given, is raised to the consumer after the ids before it."""
        with self._cond:
            self._closed, self._error = True, error
            waiter = self._notify()
        self._wake(waiter)

    def wake(self) -> None:
        """Make a waiting consumer look again now (its ``stop`` condition may have changed)."""
        with self._cond:
            waiter = self._notify()
        self._wake(waiter)

    def _notify(self):
        self._cond.notify_all()
        waiter, self._waiter = self._waiter, None
        return waiter

    @staticmethod
    def _wake(waiter) -> None:
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    # ---- the consumer's side -------------------------------------------------------------------------------
    def _look(self, start: int, stop: Callable[[], bool]) -> tuple[list[int], bool]:
        """(ids from ``start`` on, whether the consumer is done after them); under the lock."""
        return self.ids[start:], self._closed or stop()

    def _end(self) -> None:
        if self._error is not None:
            raise self._error

    def tokens(self, stop: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """Each id as it comes, blocking between them; ends when the channel is closed or ``stop()`` holds
        (checked whenever the consumer is woken); raises the engine's error, if any, after the ids before it."""
        seen = 0
        while True:
            with self._cond:
                new, over = self._look(seen, stop)
                while not new and not over:
                    self._cond.wait()
                    new, over = self._look(seen, stop)
            seen += len(new)
            yield from new
            if over and not new:
                self._end()
                return

    async def batches(self, stop: Callable[[], bool] = lambda: False) -> AsyncIterator[list[int]]:
        """The ids delivered since the last batch, awaited on the running event loop; as :meth:`tokens`."""
        loop = asyncio.get_running_loop()
        seen = 0
        while True:
            with self._cond:
                new, over = self._look(seen, stop)
                if not new and not over:
                    future = loop.create_future()
                    self._waiter = (loop, future)
            if new:
                seen += len(new)
                yield new
            elif over:
                self._end()
                return
            else:
                await future
