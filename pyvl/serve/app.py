"""The FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

The app owns no model state: it validates the request and fetches its images, builds the prompt through the
model's front door in a worker thread (images keyed by their bytes, counted from their headers, tiled only when
the engine lacks their features), submits it, and relays the answer from a
:class:`~pyvl.serve.generation.Generation` awaited on the event loop (no thread per request). A parallel task
watches the connection for ``http.disconnect`` and cancels the generation; shutdown ends every live stream with
an error event.
``/health`` is 503 while shutting down or once the engine thread has stopped, and reports ``requests_in_flight``
and the engine pool's ``kv_blocks_in_use`` (the tests use it to see that a cancelled request freed its blocks).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..engine.request import ChatStats
from ..errors import ImageError, PyvlError
from .errors import APIError, envelope
from .generation import Disconnected, Generation
from .media import MediaPolicy, read_image_source
from .protocol import ChatCall, chunk_object, completion_object, parse_chat_request, usage_object

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("pyvl.serve")


@dataclass(frozen=True)
class ServeSettings:
    served_model_name: str
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()
    max_tiles_per_request: int = 40
    max_request_bytes: int = 50 * 2**20
    max_queue: int = 64
    prompt_workers: int = 4  # threads that read, key and (on a cache miss) tile requests' images


class ServerState:
    def __init__(self, model, settings: ServeSettings):
        self.model = model
        self.settings = settings
        self.live: set[Generation] = set()
        self.shutting_down = False
        self.prompt_pool = ThreadPoolExecutor(settings.prompt_workers, thread_name_prefix="pyvl-serve-prompt")

    def begin_shutdown(self) -> None:
        """Refuse new work and end every live stream with an error event (call on the event loop)."""
        self.shutting_down = True
        for generation in list(self.live):
            generation.cancel(APIError(503, "the server is shutting down", code="server_shutting_down"))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"the request body is over the {limit} byte limit (--max-request-mb)",
            code="request_too_large",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(
                413,
                f"the request body is over the {limit} byte limit (--max-request-mb)",
                code="request_too_large",
            )
    return bytes(body)


def _prompt(model, call: ChatCall, images: list[bytes], cap: int):
    """The call's prompt through the model's front door, each image with its own tile budget; the tile cap is
    checked from the headers, before any image is decoded (runs in a worker thread)."""
    sources, total = [], 0
    for data, ref in zip(images, call.images):
        try:
            source = model.prompts.image(data, max_num=ref.max_tiles)
        except PyvlError as exc:
            raise APIError(400, f"cannot use the image: {exc}", ref.param, "invalid_image") from None
        total += source.num_tiles
        if total > cap:
            raise APIError(
                400,
                f"the images need more than the {cap} tiles a request may use "
                "(--max-tiles-per-request); lower detail or max_dynamic_patch",
                ref.param,
                "too_many_tiles",
            )
        sources.append(source)
    try:
        return model.prompt(call.question, sources, call.history or None, call.system_message)
    except ImageError as exc:  # an image whose header was fine but whose data is not
        raise APIError(400, f"cannot use the image: {exc}", code="invalid_image") from None


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class CompletionResponse(Response):
    """Runs one generation to the client, streaming (SSE) or not, while a parallel task watches for the client
    leaving. Headers go out only with the first result, so an error before any token is a plain JSON error."""

    def __init__(
        self,
        state: ServerState,
        generation: Generation,
        call: ChatCall,
        request_id: str,
        started: float,
        tiles: list[int],
    ):
        # Not Response.__init__: the status and headers are decided by the first event, in __call__.
        self.state, self.generation, self.call = state, generation, call
        self.request_id, self.started, self.tiles = request_id, started, tiles
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        self.state.live.add(self.generation)
        self.events = self.generation.events()
        status = "ok"
        try:
            status = await (self._stream(send) if self.call.stream else self._whole(send))
        finally:
            watcher.cancel()
            self.generation.cancel()
            await self.events.aclose()
            self.state.live.discard(self.generation)
            s = self.generation.stats
            log.info(
                "%s status=%s prompt=%d cached=%d completion=%d images=%d tiles=%d ttft=%.3fs total=%.3fs",
                self.request_id,
                status,
                s.prompt_tokens,
                s.cached_tokens,
                s.new_tokens,
                len(self.tiles),
                sum(self.tiles),
                s.time_to_first_token_s,
                time.perf_counter() - self.started,
            )

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.generation.cancel(Disconnected())

    async def _whole(self, send) -> str:
        pieces = []
        async for kind, value in self.events:
            if kind == "piece":
                pieces.append(value)
                continue
            if kind == "end":
                body = completion_object(
                    self.request_id,
                    self.call,
                    self.state.settings.served_model_name,
                    "".join(pieces),
                    value,
                    self.generation.stats,
                )
                await _send_json(send, 200, body)
                return "200"
            return await _send_error(send, value)

    async def _stream(self, send) -> str:
        name = self.state.settings.served_model_name
        kind, value = await anext(self.events)
        if kind == "error":
            return await _send_error(send, value)
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
        await _body(
            send, _sse(chunk_object(self.request_id, self.call, name, {"role": "assistant", "content": ""}))
        )
        while kind == "piece":
            await _body(send, _sse(chunk_object(self.request_id, self.call, name, {"content": value})))
            kind, value = await anext(self.events)
        if kind == "end":
            await _body(send, _sse(chunk_object(self.request_id, self.call, name, {}, finish_reason=value)))
            if self.call.include_usage:
                await _body(
                    send,
                    _sse(
                        chunk_object(
                            self.request_id, self.call, name, None, usage=usage_object(self.generation.stats)
                        )
                    ),
                )
            status = "200"
        elif isinstance(value, Disconnected):
            status = "disconnected"
        else:
            error = _api_error(value)
            await _body(send, _sse(error.body()))
            status = f"{error.status} after start"
        await _body(send, b"data: [DONE]\n\n", more=False)
        return status


async def _body(send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await _body(send, data, more=False)


def _api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, PyvlError):  # bad input that only the model could see: a prompt over the context, ...
        return APIError(400, str(exc), code="invalid_prompt")
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, "internal server error (logged)", code="internal_error")


async def _send_error(send, exc: BaseException) -> str:
    if isinstance(exc, Disconnected):
        return "disconnected"
    error = _api_error(exc)
    await _send_json(send, error.status, error.body())
    return str(error.status)


def create_app(model, settings: ServeSettings) -> FastAPI:
    state = ServerState(model, settings)
    app = FastAPI(title="pyvl", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "no such path" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(envelope(message, exc.status_code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        error = _api_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise APIError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )

    @app.get("/health")
    async def health():
        pool = model.engine.pool
        status = (
            "shutting_down" if state.shutting_down else ("ok" if model.engine.alive else "engine_stopped")
        )
        body = {
            "status": status,
            "model": settings.served_model_name,
            "requests_in_flight": len(state.live),
            "kv_blocks_in_use": pool.num_in_use,
            "kv_blocks_cached": pool.num_cached,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "pyvl"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            authorize(request)
            if state.shutting_down:
                raise APIError(503, "the server is shutting down", code="server_shutting_down")
            raw = await _read_body(request, settings.max_request_bytes)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(
                    400, f"the request body is not valid JSON ({exc})"[:300], code="invalid_json"
                ) from None
            call = parse_chat_request(body, model.max_context)
            if call.model != settings.served_model_name:
                raise APIError(
                    404,
                    f"model {call.model[:100]!r} is not served here; this server serves "
                    f"{settings.served_model_name!r}",
                    "model",
                    "model_not_found",
                )
            if len(state.live) >= settings.max_queue:
                raise APIError(
                    503,
                    f"the server is at its limit of {settings.max_queue} requests (--max-queue); retry later",
                    code="queue_full",
                )
            images = [await read_image_source(ref.url, settings.media, ref.param) for ref in call.images]
            prompt = await asyncio.get_running_loop().run_in_executor(
                state.prompt_pool, _prompt, model, call, images, settings.max_tiles_per_request
            )
        except APIError as exc:
            log.info("%s status=%d %s", request_id, exc.status, exc.message[:200])
            raise
        stats = ChatStats()
        request = model.submit(prompt, call.generation, stats, started)
        generation = Generation(model, request, stats, call.stops)
        tiles = [source.num_tiles for source in prompt.sources]
        return CompletionResponse(state, generation, call, request_id, started, tiles)

    return app
