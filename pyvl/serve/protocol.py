"""OpenAI chat-completion requests -> a pyvl call, and pyvl results -> OpenAI response objects.

Messages map onto the internlm2-chat template: the system message(s) replace the model's default, user and
assistant turns before the last user message become ``history`` pairs, the last user message is the question.
Each image is one ``<image>`` placeholder at the start of its message: a message with one image gets
``"<image>\\n" + text`` (what ``model.chat`` asks on a first turn), one with several gets ``"Image-k: <image>\\n"``
lines, k counted over the whole conversation (InternVL's multi-image labels). A message's text never depends on
later messages, so turn 2 repeats turn 1's prompt exactly and the prefix cache serves it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..image import MAX_TILES
from ..template import with_image_labels
from .errors import bad_request

__all__ = [
    "ImageRef",
    "ChatCall",
    "parse_chat_request",
    "DETAIL_TILES",
    "completion_object",
    "chunk_object",
    "usage_object",
]

DETAIL_TILES = {"low": 6, "medium": 12, "high": 24}  # LMDeploy's per-image tile budgets; "auto": the model's
REFUSED_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
)
MAX_STOPS = 4


@dataclass(frozen=True)
class ImageRef:
    url: str
    max_tiles: int | None  # None: the model's max_dynamic_patch
    param: str  # where it sits in the request, for error messages


@dataclass
class ChatCall:
    model: str
    question: str
    history: list[tuple[str, str]]
    system_message: str | None
    images: list[ImageRef]
    generation: dict
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise bad_request(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}"[:300], name)
    return value


def _text_parts(content, param: str, allow_images: bool) -> tuple[str, list[ImageRef]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad_request("message content must be a string or a list of content parts", param)
    texts, images = [], []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request("a content part must be an object with a 'type'", where)
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request("a text part needs a string 'text'", f"{where}.text")
            texts.append(part["text"])
        elif part["type"] == "image_url" and allow_images:
            images.append(_image_ref(part.get("image_url"), f"{where}.image_url"))
        else:
            raise bad_request(
                f"content part type {part['type']!r} is not supported here"[:200], f"{where}.type"
            )
    return "\n".join(texts), images


def _image_ref(spec, param: str) -> ImageRef:
    if isinstance(spec, str):
        spec = {"url": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str) or not spec["url"]:
        raise bad_request("image_url must be a url string or an object with a string 'url'", param)
    tiles = spec.get("max_dynamic_patch")
    if tiles is not None:
        if isinstance(tiles, bool) or not isinstance(tiles, int) or not 1 <= tiles <= MAX_TILES:
            raise bad_request(
                f"max_dynamic_patch must be an integer in [1, {MAX_TILES}], got {tiles!r}"[:200],
                f"{param}.max_dynamic_patch",
            )
        return ImageRef(spec["url"], tiles, param)
    detail = spec.get("detail", "auto")
    if detail != "auto" and detail not in DETAIL_TILES:
        raise bad_request(
            f"detail must be one of low, medium, high, auto; got {detail!r}"[:200], f"{param}.detail"
        )
    return ImageRef(spec["url"], DETAIL_TILES.get(detail), param)


def _conversation(messages) -> tuple[str | None, list[tuple[str, str]], str, list[ImageRef]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    system, turns, images = [], [], []  # turns: [role, text] with consecutive same-role messages merged
    for k, message in enumerate(messages):
        param = f"messages[{k}]"
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad_request(
                f"message role {role!r} is not supported (system, user, assistant)"[:200], f"{param}.role"
            )
        text, found = _text_parts(message.get("content"), f"{param}.content", allow_images=role == "user")
        if role in ("system", "developer"):
            system.append(text)
            continue
        if found:
            text = with_image_labels(text, len(found), len(images) + 1)
            images.extend(found)
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise bad_request(
            "the conversation must start and end with a user message (after any system message)", "messages"
        )
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return ("\n".join(system) if system else None), history, turns[-1][1], images


def _stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stops)
    ):
        raise bad_request(
            f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings "
            "(256 characters each)",
            "stop",
        )
    return tuple(stops)


def _generation(body: dict, max_context: int) -> dict:
    max_tokens = _number(body, "max_completion_tokens", 1, max_context, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, max_context, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    temperature = 1.0 if temperature is None else temperature
    top_k = _number(body, "top_k", -1, 1 << 20, integer=True)
    gen = dict(
        max_new_tokens=max_context if max_tokens is None else max_tokens,  # the engine stops at the context
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=_number(body, "top_p", 0, 1) or 1.0,
        top_k=0 if top_k is None or top_k < 0 else top_k,
        repetition_penalty=_number(body, "repetition_penalty", 0.01, 10) or 1.0,
        seed=_number(body, "seed", 0, 2**63 - 1, integer=True),
    )
    if body.get("top_p") == 0:
        raise bad_request("'top_p' must be in (0, 1]", "top_p")
    return gen


def parse_chat_request(body, max_context: int) -> ChatCall:
    """Validate a decoded JSON body; raises APIError(400) naming the field at fault."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name in REFUSED_FIELDS:
        if body.get(name) not in (None, False, [], {"type": "text"}):
            raise bad_request(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise bad_request("'n' must be 1: one choice per request", "n", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad_request(
                f"'{name}' is not supported (use repetition_penalty)", name, "unsupported_parameter"
            )
    if not isinstance(body.get("model"), str):
        raise bad_request("'model' must be a string", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    system, history, question, images = _conversation(body.get("messages"))
    return ChatCall(
        model=body["model"],
        question=question,
        history=history,
        system_message=system,
        images=images,
        generation=_generation(body, max_context),
        stops=_stops(body.get("stop")),
        stream=bool(stream),
        include_usage=bool(stream and options.get("include_usage")),
    )


def usage_object(stats) -> dict:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def completion_object(
    request_id: str, call: ChatCall, model: str, text: str, finish_reason: str, stats
) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": call.created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_object(stats),
    }


def chunk_object(
    request_id: str,
    call: ChatCall,
    model: str,
    delta: dict | None,
    finish_reason: str | None = None,
    usage: dict | None = None,
) -> dict:
    chunk = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if call.include_usage:
        chunk["usage"] = usage
    return chunk
