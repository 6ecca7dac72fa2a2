"""The FastAPI app: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, vLLM's
``POST /tokenize`` and ``POST /detokenize``, ``GET /health`` and ``GET /metrics``.

The app owns no model state: it validates the request and fetches its images, then in a worker thread builds the
prompt through the model's front door (images keyed by their bytes, counted from their headers, tiled only when
the engine lacks their features) and submits it (a grammar is compiled there too), and relays the answer of every
choice from a :class:`~pyvl.serve.generation.Call` awaited on the event loop (no thread per request;
pyvl.serve.responses). A parallel task watches the connection for ``http.disconnect`` and cancels the call;
shutdown ends every live stream with an error event.
``/health`` is 503 while shutting down or once the engine thread has stopped, and reports ``requests_in_flight``
and the engine pool's ``kv_blocks_in_use`` (the tests use it to see that a cancelled request freed its blocks).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..engine.request import ChatStats
from ..errors import ConfigError, ImageError, PromptError, PyvlError
from ..prompt import Prompt
from . import json_body
from .completions import CompletionShape, parse_completion_request
from .errors import APIError, envelope
from .generation import Call, Generation
from .media import MediaPolicy, read_image_source
from .metrics import Metrics
from .params import Limits
from .protocol import ChatCall, ChatShape, parse_chat_request
from .responses import CompletionResponse, Envelope, api_error
from .tokenize import parse_detokenize, parse_tokenize, tokenize_response

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("pyvl.serve")


@dataclass(frozen=True)
class ServeSettings:
    served_model_name: str
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()
    max_tiles_per_request: int = 40
    max_request_megapixels: float = 180.0  # about twice Pillow's limit for one image
    max_request_bytes: int = 50 * 2**20
    max_queue: int = 64
    prompt_workers: int = 4  # threads that read, key and (on a cache miss) tile requests' images


class ServerState:
    def __init__(self, model, settings: ServeSettings):
        self.model = model
        self.settings = settings
        self.live: set[Call] = set()
        self.shutting_down = False
        self.prompt_pool = ThreadPoolExecutor(settings.prompt_workers, thread_name_prefix="pyvl-serve-prompt")
        self.limits = Limits(
            model.max_context,
            model.config.llm.vocab_size,
            model.engine.config.max_num_seqs,
            model.tokenizer.max_token_bytes,
        )
        try:
            self.metrics: Metrics | None = Metrics(model, settings.served_model_name)
            self.metrics_missing = ""
        except PyvlError as exc:  # prometheus-client is not installed: /metrics says so
            self.metrics, self.metrics_missing = None, str(exc)

    def begin_shutdown(self) -> None:
        """Refuse new work and end every live stream with an error event (call on the event loop)."""
        self.shutting_down = True
        for call in list(self.live):
            call.cancel(APIError(503, "the server is shutting down", code="server_shutting_down"))


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    # (a length of more digits than any limit is over it: int() of 5000 digits would raise)
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > limit)
    ):
        raise APIError(
            413,
            f"the request body is over the {limit} byte limit (--max-request-mb)",
            code="request_too_large",
        )
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(
                    413,
                    f"the request body is over the {limit} byte limit (--max-request-mb)",
                    code="request_too_large",
                )
    except ClientDisconnect:  # nobody is left to answer: logged as what it is, not as a server error
        raise APIError(
            400, "the client disconnected before sending the whole body", code="client_disconnected"
        ) from None
    return bytes(body)


async def _json_body(request: Request, limit: int):
    raw = await _read_body(request, limit)
    try:
        return json_body.parse(raw)
    except json_body.BodyError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}"[:300], code="invalid_json") from None


def _image_sources(model, call, images: list[bytes], settings: ServeSettings) -> list:
    """Each image keyed with its own tile budget; the request's tiles and pixels are counted from the headers,
    before any image is decoded."""
    sources, tiles, pixels = [], 0, 0
    max_pixels = int(settings.max_request_megapixels * 1e6)
    for data, ref in zip(images, call.images):
        try:
            source = model.prompts.image(data, max_num=ref.max_tiles)
        except PyvlError as exc:
            raise APIError(400, f"cannot use the image: {exc}", ref.param, "invalid_image") from None
        tiles += source.num_tiles
        pixels += source.pixels
        if tiles > settings.max_tiles_per_request:
            raise APIError(
                400,
                f"the images need more than the {settings.max_tiles_per_request} tiles a request may use "
                "(--max-tiles-per-request); lower detail or max_dynamic_patch",
                ref.param,
                "too_many_tiles",
            )
        if pixels > max_pixels:
            raise APIError(
                400,
                f"the images have more than the {settings.max_request_megapixels:g} megapixels a request may "
                "decode (--max-request-megapixels); send smaller images",
                ref.param,
                "too_many_pixels",
            )
        sources.append(source)
    return sources


def _submit(
    model, prompt: Prompt, gen: dict, started: float, grammar_param: str | None, prompt_param: str | None
):
    """The prompt's choices on the engine; a grammar that does not compile, or a prompt over the context, is a
    400 naming the field."""
    try:
        return model.submit_choices(prompt, gen, ChatStats(), started)
    except ConfigError as exc:  # the settings were checked field by field: what is left is the grammar's
        raise APIError(400, str(exc)[:1000], grammar_param, "invalid_grammar") from None
    except PromptError as exc:
        raise APIError(400, str(exc), prompt_param, "invalid_prompt") from None


def _chat_job(model, call: ChatCall, images: list[bytes], settings: ServeSettings, started: float):
    """The chat call's prompt through the model's front door (tiling the images its caches lack), submitted
    (runs in a worker thread)."""
    sources = _image_sources(model, call, images, settings)
    system = call.system_message
    if call.tools is not None:  # the functions are described after the system message
        system = (system if system is not None else model.system_message) + "\n\n" + call.tools.instruction
    try:
        prompt = model.prompt(call.question, sources, call.history or None, system)
    except ImageError as exc:  # an image whose header was fine but whose data is not
        raise APIError(400, f"cannot use the image: {exc}", code="invalid_image") from None
    return prompt, _submit(model, prompt, call.generation, started, call.constraint_param, None)


def _completion_job(model, call, started: float) -> list[list]:
    """Each prompt's choices, submitted (runs in a worker thread)."""
    groups = []
    try:
        for ids in call.prompts:
            prompt = Prompt(ids, [], [], "")
            groups.append(_submit(model, prompt, call.generation, started, call.constraint_param, "prompt"))
    except APIError:
        for requests in groups:  # one bad prompt fails the request: the others stop too
            for r in requests:
                r.cancel()
        raise
    return groups


def _log_done(request_id: str, started: float, tiles: list[int], state: ServerState):
    """The response's log line and metrics, once it is over."""

    def done(call: Call, status: str) -> None:
        s = call.generations[0].stats
        log.info(
            "%s status=%s prompt=%d cached=%d completion=%d choices=%d images=%d tiles=%d ttft=%.3fs total=%.3fs",
            request_id,
            status,
            call.prompt_tokens,
            call.cached_tokens,
            call.completion_tokens,
            len(call.generations),
            len(tiles),
            sum(tiles),
            s.time_to_first_token_s,
            time.perf_counter() - started,
        )
        if state.metrics is not None:
            state.metrics.record(call)

    return done


def create_app(model, settings: ServeSettings) -> FastAPI:
    state = ServerState(model, settings)
    app = FastAPI(title="pyvl", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    name = settings.served_model_name

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "no such path" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(envelope(message, exc.status_code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        error = api_error(exc)
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

    def admit(requested: str) -> None:
        """404 for another model's name; 503 while shutting down or at the queue limit."""
        if requested != name:
            raise APIError(
                404,
                f"model {requested[:100]!r} is not served here; this server serves {name!r}",
                "model",
                "model_not_found",
            )
        if len(state.live) >= settings.max_queue:
            raise APIError(
                503,
                f"the server is at its limit of {settings.max_queue} requests (--max-queue); retry later",
                code="queue_full",
            )

    async def opened(request: Request) -> dict:
        """The authorized request's JSON body (503 while shutting down)."""
        authorize(request)
        if state.shutting_down:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        return await _json_body(request, settings.max_request_bytes)

    def logged(request_id: str, exc: APIError) -> APIError:
        log.info("%s status=%d %s", request_id, exc.status, exc.message[:200])
        return exc

    async def in_worker(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(state.prompt_pool, fn, *args)

    @app.get("/health")
    async def health():
        pool = model.engine.pool
        status = (
            "shutting_down" if state.shutting_down else ("ok" if model.engine.alive else "engine_stopped")
        )
        body = {
            "status": status,
            "model": name,
            "requests_in_flight": len(state.live),
            "kv_blocks_in_use": pool.num_in_use,
            "kv_blocks_cached": pool.num_cached,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return JSONResponse(
                envelope(state.metrics_missing, 501, code="metrics_unavailable"), status_code=501
            )
        content, media_type = state.metrics.render()
        return Response(content, media_type=media_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        entry = {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "pyvl",
            "max_model_len": model.max_context,
        }
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            call = parse_chat_request(await opened(request), state.limits)
            admit(call.model)
            images = [await read_image_source(ref.url, settings.media, ref.param) for ref in call.images]
            prompt, requests = await in_worker(_chat_job, model, call, images, settings, started)
        except APIError as exc:
            raise logged(request_id, exc) from None
        generations = [Generation(model, r, r.choice, call.stops) for r in requests]
        tiles = [source.num_tiles for source in prompt.sources]
        return CompletionResponse(
            state,
            Call(generations),
            ChatShape(call.tools),
            Envelope(request_id, name, call.include_usage),
            call.stream,
            _log_done(request_id, started, tiles, state),
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        try:
            body = await opened(request)
            call = parse_completion_request(
                body, state.limits, model.tokenizer, (*model.stop_ids, model.tokenizer.eos_id)
            )
            admit(call.model)
            groups = await in_worker(_completion_job, model, call, started)
        except APIError as exc:
            raise logged(request_id, exc) from None
        n = call.generation["n"]
        generations = [
            Generation(model, r, i * n + r.choice, call.stops, raw=True)
            for i, group in enumerate(groups)
            for r in group
        ]
        return CompletionResponse(
            state,
            Call(generations),
            CompletionShape(call),
            Envelope(request_id, name, call.include_usage),
            call.stream,
            _log_done(request_id, started, [], state),
        )

    @app.post("/tokenize")
    async def tokenize(request: Request):
        call = parse_tokenize(await opened(request), state.limits)
        if call.prompt is not None:
            ids = model.tokenizer.encode(call.prompt, add_bos=call.add_special_tokens)
        else:
            images = [await read_image_source(ref.url, settings.media, ref.param) for ref in call.images]
            ids = await in_worker(_chat_ids, model, call, images, settings)
        return tokenize_response(ids, call, model.tokenizer, model.max_context)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        tokens = parse_detokenize(await opened(request), len(model.tokenizer))
        return {"prompt": model.tokenizer.decode(tokens)}

    return app


def _chat_ids(model, call, images: list[bytes], settings: ServeSettings) -> list[int]:
    """The ids of a chat prompt, images counted from their headers and never tiled (runs in a worker thread)."""
    sources = _image_sources(model, call, images, settings)
    system = call.system_message if call.system_message is not None else model.system_message
    return model.prompts.build(call.question, sources, call.history, system).ids
