"""One chat completion on the model's engine, awaited on the event loop: no thread per request.

:meth:`Generation.events` yields ``("piece", text)`` as the engine's tokens become text (``model.atext``: stop ids
and ``stop`` strings, whitespace as ``chat()`` strips it), then ``("end", finish_reason)`` or ``("error",
exception)``. :meth:`Generation.cancel` (the client left, the server is shutting down) cancels the engine request,
which frees its KV blocks at the engine's next step, and wakes the awaiting response at once.
"""

from __future__ import annotations

from ..engine.request import ChatStats

__all__ = ["Generation", "Disconnected"]


class Disconnected(Exception):
    """The client went away."""


class Generation:
    def __init__(self, model, request, stats: ChatStats, stops: tuple[str, ...]):
        self.model = model
        self.request = request
        self.stats = stats
        self.text = model.text_stream(request, stops)
        self.reason: BaseException | None = None  # why it was cancelled, when it was

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop now; ``reason``, if given and the first one, ends the response as an error."""
        if reason is not None and self.reason is None:
            self.reason = reason
        self.request.cancel()

    async def events(self):
        pieces = self.model.atext(self.request, self.text)
        try:
            async for piece in pieces:
                if self.reason is not None:
                    break
                yield "piece", piece
        except (
            Exception
        ) as exc:  # delivered to the response; PyvlErrors are the client's, others are logged there
            yield "error", exc
            return
        finally:
            await pieces.aclose()  # cancels the engine request if it is still running
        if self.reason is not None:
            yield "error", self.reason
        else:
            yield "end", "stop" if self.text.matched_stop_string else self.stats.finish_reason
