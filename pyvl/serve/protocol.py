"""OpenAI chat-completion requests -> a pyvl call, and pyvl results -> OpenAI chat response objects.

Messages map onto the internlm2-chat template: the system message(s) replace the model's default, user and
assistant turns before the last user message become ``history`` pairs, the last user message is the question.
Each image is one ``<image>`` placeholder at the start of its message: a message with one image gets
``"<image>\\n" + text`` (what ``model.chat`` asks on a first turn), one with several gets ``"Image-k: <image>\\n"``
lines, k counted over the whole conversation (InternVL's multi-image labels). A message's text never depends on
later messages, so turn 2 repeats turn 1's prompt exactly and the prefix cache serves it. An assistant's earlier
``tool_calls`` are shown as their JSON, a ``tool`` message as a user turn carrying the result.

The answer may be held to a grammar by one of ``response_format`` (json_object, json_schema), vLLM's guided
fields (pyvl.serve.params) or ``tools`` (pyvl.serve.tools); :class:`ChatShape` writes the choices, tool calls and
logprobs as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..generation_config import MAX_TOP_LOGPROBS
from ..image import MAX_TILES
from ..template import with_image_labels
from .errors import bad_request
from .params import Limits, constraint, generation, number, refuse_unsupported, stops
from .responses import Shape, logprob
from .tools import ToolPlan, plan_tools, render_tool_calls, tool_calls

__all__ = [
    "ImageRef",
    "ChatCall",
    "conversation",
    "parse_chat_request",
    "DETAIL_TILES",
    "ChatShape",
    "chat_logprobs",
]

DETAIL_TILES = {"low": 6, "medium": 12, "high": 24}  # LMDeploy's per-image tile budgets; "auto": the model's
# refused unless absent, false or empty: OpenAI's legacy functions and other modalities, vLLM's prompt overrides
REFUSED_FIELDS = (
    "functions",
    "function_call",
    "audio",
    "prediction",
    "chat_template",
    "continue_final_message",
    "echo",
)


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
    tools: ToolPlan | None = None
    constraint_param: str | None = None  # the field the answer's grammar came from (its errors name it)


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
    if not isinstance(detail, str) or (detail != "auto" and detail not in DETAIL_TILES):
        raise bad_request(
            f"detail must be one of low, medium, high, auto; got {detail!r}"[:200], f"{param}.detail"
        )
    return ImageRef(spec["url"], DETAIL_TILES.get(detail), param)


def _message_text(message: dict, role: str, param: str) -> tuple[str, list[ImageRef]]:
    """A message's text (an assistant's tool calls rendered, a tool result labelled) and its images."""
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls"):
        calls = render_tool_calls(message["tool_calls"], f"{param}.tool_calls")
        text = "" if content is None else _text_parts(content, f"{param}.content", False)[0]
        return "\n".join(t for t in (text, calls) if t), []
    text, images = _text_parts(content, f"{param}.content", allow_images=role == "user")
    if role == "tool":
        call_id = message.get("tool_call_id")
        text = (
            f"Result of tool call {call_id}: {text}" if isinstance(call_id, str) else f"Tool result: {text}"
        )
    return text, images


def _answers_tool_calls(previous) -> bool:
    return isinstance(previous, dict) and (
        previous.get("role") == "tool"
        or (previous.get("role") == "assistant" and bool(previous.get("tool_calls")))
    )


def conversation(messages) -> tuple[str | None, list[tuple[str, str]], str, list[ImageRef]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    system, turns, images = [], [], []  # turns: [role, text] with consecutive same-role messages merged
    for k, message in enumerate(messages):
        param = f"messages[{k}]"
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(
                f"message role {role!r} is not supported (system, user, assistant, tool)"[:200],
                f"{param}.role",
            )
        if role == "tool" and not (k and _answers_tool_calls(messages[k - 1])):
            raise bad_request(
                "a 'tool' message must follow an assistant message with 'tool_calls' (or another tool message)",
                f"{param}.role",
            )
        text, found = _message_text(message, role, param)
        if role in ("system", "developer"):
            system.append(text)
            continue
        if found:
            text = with_image_labels(text, len(found), len(images) + 1)
            images.extend(found)
        role = "user" if role == "tool" else role  # a tool's result is the next thing the model is told
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise bad_request(
            "the conversation must start and end with a user (or tool) message, after any system message",
            "messages",
        )
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return ("\n".join(system) if system else None), history, turns[-1][1], images


def _logprobs(body: dict) -> dict:
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs")
    top = number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return {"logprobs": bool(wanted), "top_logprobs": top or 0}


def parse_chat_request(body, limits: Limits) -> ChatCall:
    """Validate a decoded JSON body; raises APIError(400) naming the field at fault."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name in REFUSED_FIELDS:
        if body.get(name) not in (None, False, []):
            raise bad_request(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise bad_request("only text output is supported ('modalities': ['text'])", "modalities")
    if not isinstance(body.get("model"), str):
        raise bad_request("'model' must be a string", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    system, history, question, images = conversation(body.get("messages"))
    limits.check_prompt_chars(
        [system or "", question, *(text for turn in history for text in turn)], "messages"
    )
    refuse_unsupported(body)
    tools = plan_tools(body)
    grammar, param = constraint(body, *([({"json_schema": tools.schema}, "tools")] if tools else []))
    return ChatCall(
        model=body["model"],
        question=question,
        history=history,
        system_message=system,
        images=images,
        generation=generation(body, limits) | _logprobs(body) | grammar,
        stops=stops(body.get("stop")),
        stream=bool(stream),
        include_usage=bool(stream and options.get("include_usage")),
        tools=tools,
        constraint_param=param,
    )


def _entry(t) -> dict:
    return {"token": t.token, "logprob": logprob(t.logprob), "bytes": list(t.bytes)}


def chat_logprobs(entries) -> dict | None:
    """OpenAI's chat ``logprobs`` of some TokenLogprobs (None when none were asked for)."""
    if entries is None:
        return None
    return {
        "content": [_entry(t) | {"top_logprobs": [_entry(top) for top in t.top]} for t in entries],
        "refusal": None,
    }


class ChatShape(Shape):
    """Chat choices: text deltas, or with tools one tool call whose arguments stream as they are written (when
    the function is known before the answer; when the answer names it, the call comes whole at the end)."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, tools: ToolPlan | None):
        self.tools = tools
        self._written: dict[int, list[str]] = {}  # per choice, the answer so far (tool calls only)
        self._calls: dict[int, dict] = {}  # per choice, its streamed tool call

    def _choice(self, index: int, delta: dict, logprobs=None, reason: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": reason}

    def start(self, index: int) -> list[dict]:
        if self.tools is None:
            return [self._choice(index, {"role": "assistant", "content": ""})]
        delta = {"role": "assistant", "content": None}
        if self.tools.name is not None:
            call = tool_calls(self.tools, "")[0]
            self._calls[index] = call
            delta["tool_calls"] = [{"index": 0, **call}]
        return [self._choice(index, delta)]

    def piece(self, index: int, text: str, logprobs) -> list[dict]:
        if self.tools is None:
            return [self._choice(index, {"content": text}, logprobs)]
        self._written.setdefault(index, []).append(text)
        if self.tools.name is None:  # the name comes with the whole answer
            return [self._choice(index, {}, logprobs)] if logprobs else []
        return [
            self._choice(index, {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}, logprobs)
        ]

    def _reason(self, reason: str) -> str:
        return "tool_calls" if self.tools is not None and reason == "stop" else reason

    def end(self, index: int, reason: str) -> list[dict]:
        chunks = []
        if self.tools is not None and self.tools.name is None:
            call = tool_calls(self.tools, "".join(self._written.get(index, [])))[0]
            chunks.append(self._choice(index, {"tool_calls": [{"index": 0, **call}]}))
        return chunks + [self._choice(index, {}, reason=self._reason(reason))]

    def choice(self, index: int, text: str, logprobs, reason: str) -> dict:
        if self.tools is None:
            message = {"role": "assistant", "content": text}
        else:
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls(self.tools, text)}
        return {
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(logprobs),
            "finish_reason": self._reason(reason),
        }
