"""One completion to the client, streaming (SSE) or whole, in the shape of its endpoint.

:class:`CompletionResponse` runs a :class:`~pyvl.serve.generation.Call` while a parallel task watches for the
client leaving. Headers go out only with the first result, so an error before any token is a plain JSON error; an
error after the stream has started is a ``data: {"error": ...}`` event, then ``data: [DONE]``. What a choice
looks like is the endpoint's :class:`Shape` (chat: pyvl.serve.protocol; completions: pyvl.serve.completions); the
envelope (id, object, created, model, usage) is the same for both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from starlette.responses import Response

from ..errors import PyvlError
from .errors import APIError
from .generation import Call, Disconnected

__all__ = ["Shape", "Envelope", "CompletionResponse", "api_error", "send_json", "usage_object"]

log = logging.getLogger("pyvl.serve")
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI's floor for a token of probability zero


def logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


class Shape:
    """What an endpoint's choices look like; one instance per response (it may keep per-choice state)."""

    object: str  # the whole response's "object"
    chunk_object: str  # a stream chunk's "object"

    def start(self, index: int) -> list[dict]:
        """Chunk choices sent when the stream opens."""
        return []

    def piece(self, index: int, text: str, logprobs) -> list[dict]:
        """Chunk choices for a piece of a choice's answer (and its tokens' logprobs, or None)."""
        raise NotImplementedError

    def end(self, index: int, reason: str) -> list[dict]:
        """Chunk choices that end a choice (the last with its finish_reason)."""
        raise NotImplementedError

    def choice(self, index: int, text: str, logprobs, reason: str) -> dict:
        """A choice of the whole response."""
        raise NotImplementedError


@dataclass
class Envelope:
    request_id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def usage_object(call: Call) -> dict:
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "total_tokens": call.prompt_tokens + call.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": call.cached_tokens},
    }


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _body(send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await _body(send, data, more=False)


def api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PyvlError):  # bad input that only the model could see: a prompt over the context, ...
        return APIError(400, str(exc), code="invalid_prompt")
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, "internal server error (logged)", code="internal_error")


async def _send_error(send, exc: BaseException) -> str:
    if isinstance(exc, Disconnected):
        return "disconnected"
    error = api_error(exc)
    await send_json(send, error.status, error.body())
    return str(error.status)


class CompletionResponse(Response):
    def __init__(self, state, call: Call, shape: Shape, envelope: Envelope, stream: bool, on_done):
        # Not Response.__init__: the status and headers are decided by the first event, in __call__.
        self.state, self.call, self.shape, self.envelope, self.stream = state, call, shape, envelope, stream
        self.on_done = on_done  # on_done(call, status): the log line and the metrics
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        self.state.live.add(self.call)
        self.events = self.call.events()
        status = "ok"
        try:
            status = await (self._stream(send) if self.stream else self._whole(send))
        finally:
            watcher.cancel()
            self.call.cancel()
            await self.events.aclose()
            self.state.live.discard(self.call)
            self.on_done(self.call, status)

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.call.cancel(Disconnected())

    def _envelope(self, obj: str, choices: list[dict], usage: dict | None = None) -> dict:
        e = self.envelope
        body = {"id": e.request_id, "object": obj, "created": e.created, "model": e.model, "choices": choices}
        if obj == self.shape.object or e.include_usage:
            body["usage"] = usage
        return body

    async def _whole(self, send) -> str:
        n = len(self.call.generations)
        texts, logprobs, reasons = [[] for _ in range(n)], [None] * n, [None] * n
        position = {g.index: k for k, g in enumerate(self.call.generations)}
        async for index, kind, *value in self.events:
            k = position[index]
            if kind == "delta":
                texts[k].append(value[0])
                if value[1] is not None:
                    logprobs[k] = (logprobs[k] or []) + value[1]
            elif kind == "end":
                reasons[k] = value[0]
            else:
                return await _send_error(send, value[0])
        choices = [
            self.shape.choice(
                g.index,
                "".join(texts[k]),
                (logprobs[k] or []) if g.request.gen.logprobs else None,
                reasons[k],
            )
            for k, g in enumerate(self.call.generations)
        ]
        await send_json(send, 200, self._envelope(self.shape.object, choices, usage_object(self.call)))
        return "200"

    async def _chunk(self, send, choices: list[dict]) -> None:
        for choice in choices:
            await _body(send, _sse(self._envelope(self.shape.chunk_object, [choice])))

    async def _stream(self, send) -> str:
        event = await anext(self.events)
        if event[1] == "error":
            return await _send_error(send, event[2])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        for g in self.call.generations:
            await self._chunk(send, self.shape.start(g.index))
        status, open_choices = "200", len(self.call.generations)
        while True:
            index, kind, *value = event
            if kind == "delta":
                await self._chunk(send, self.shape.piece(index, value[0], value[1]))
            elif kind == "end":
                await self._chunk(send, self.shape.end(index, value[0]))
                open_choices -= 1
            elif isinstance(value[0], Disconnected):
                status = "disconnected"
                break
            else:
                error = api_error(value[0])
                await _body(send, _sse(error.body()))
                status = f"{error.status} after start"
                break
            if not open_choices:
                break
            event = await anext(self.events)
        if status == "200" and self.envelope.include_usage:
            await _body(send, _sse(self._envelope(self.shape.chunk_object, [], usage_object(self.call))))
        await _body(send, b"data: [DONE]\n\n", more=False)
        return status
