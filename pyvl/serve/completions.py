"""``POST /v1/completions``: a raw prompt continued, with no chat template, as OpenAI's legacy completions (and
vLLM) serve it.

``prompt`` is a string, a list of token ids, or a batch of either (at most ``MAX_PROMPTS``). A string is tokenized
with the BOS id first, as the chat template's prompts are; ids are used as given. Each prompt gets ``n`` choices,
indexed prompt-major (prompt i, choice j -> i * n + j). A continuation ends at the tokenizer's EOS or <|im_end|>,
a ``stop`` string, or ``max_tokens`` (16 by default, as OpenAI's). Its text is the tokens' raw bytes (the first
token's space kept), so prompt + text is the whole string; ``echo`` puts the prompt's text first. ``logprobs``
(0..20) gives the legacy shape (tokens, token_logprobs, top_logprobs, text_offset). ``response_format`` and the
guided fields hold the continuation to a grammar, as in chat. Refused with a 400: ``suffix``, a ``best_of`` other
than n, echo with logprobs (it would need the prompt's logprobs), and the chat-only fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..generation_config import MAX_TOP_LOGPROBS
from ..tokenizer import Tokenizer
from .errors import bad_request
from .params import Limits, constraint, generation, number, refuse_unsupported, stops
from .responses import Shape, logprob

__all__ = [
    "CompletionCall",
    "parse_completion_request",
    "CompletionShape",
    "MAX_PROMPTS",
    "DEFAULT_MAX_TOKENS",
]

MAX_PROMPTS = 64
CHAT_ONLY = ("messages", "tools", "tool_choice", "top_logprobs")
DEFAULT_MAX_TOKENS = 16


@dataclass
class CompletionCall:
    model: str
    prompts: list[list[int]]
    texts: list[str]  # each prompt as text (for echo)
    generation: dict
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool
    constraint_param: str | None


def _is_ids(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompts(value, tokenizer: Tokenizer, limits: Limits) -> tuple[list[list[int]], list[str]]:
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > MAX_PROMPTS:
        raise bad_request(
            f"'prompt' must be a string, a list of token ids, or a list of up to {MAX_PROMPTS} of either",
            "prompt",
        )
    ids, texts = [], []
    for k, prompt in enumerate(value):
        if isinstance(prompt, str):
            limits.check_prompt_chars([prompt], f"prompt[{k}]")
            ids.append(tokenizer.encode(prompt))
            texts.append(prompt)
        elif _is_ids(prompt):
            if len(prompt) > limits.max_context:
                raise bad_request(
                    f"the prompt has {len(prompt)} tokens; the context holds {limits.max_context}",
                    f"prompt[{k}]",
                    "context_length_exceeded",
                )
            outside = [t for t in prompt if not 0 <= t < limits.vocab_size]
            if outside:
                raise bad_request(
                    f"token ids {outside[:5]} are outside [0, {limits.vocab_size})", f"prompt[{k}]"
                )
            ids.append(list(prompt))
            raw = b"".join(tokenizer.token_bytes[t] for t in prompt if t not in tokenizer.special_ids)
            texts.append(raw.decode("utf-8", errors="replace"))
        else:
            raise bad_request("each prompt must be a string or a non-empty list of token ids", f"prompt[{k}]")
    return ids, texts


def parse_completion_request(
    body, limits: Limits, tokenizer: Tokenizer, stop_ids: tuple[int, ...]
) -> CompletionCall:
    """Validate a decoded JSON body; raises APIError(400) naming the field at fault."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise bad_request("'model' must be a string", "model")
    if body.get("suffix") not in (None, ""):
        raise bad_request(
            "'suffix' is not supported (no fill-in-the-middle)", "suffix", "unsupported_parameter"
        )
    chat_only = [name for name in CHAT_ONLY if body.get(name) is not None]
    if chat_only:
        raise bad_request(
            f"'{chat_only[0]}' is a /v1/chat/completions field; /v1/completions does not take it",
            chat_only[0],
        )
    refuse_unsupported(body)
    gen = generation(body, limits, DEFAULT_MAX_TOKENS)
    if body.get("best_of") not in (None, gen["n"]):
        raise bad_request(
            "'best_of' must equal n: choices are not ranked", "best_of", "unsupported_parameter"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be a boolean", "stream")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad_request("'echo' must be a boolean", "echo")
    top = number(body, "logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and echo:
        raise bad_request("'echo' with 'logprobs' would need the prompt's logprobs: not supported", "echo")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    prompts, texts = _prompts(body.get("prompt"), tokenizer, limits)
    grammar, param = constraint(body)
    gen |= dict(logprobs=top is not None, top_logprobs=top or 0, eos_token_id=list(stop_ids)) | grammar
    return CompletionCall(
        model=body["model"],
        prompts=prompts,
        texts=texts,
        generation=gen,
        stops=stops(body.get("stop")),
        stream=bool(stream),
        include_usage=bool(stream and options.get("include_usage")),
        echo=echo,
        constraint_param=param,
    )


class CompletionShape(Shape):
    """Completion choices: text, and the legacy logprobs whose text offsets run over each choice's text."""

    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, call: CompletionCall):
        self.call = call
        self._offset: dict[int, int] = {}  # per choice, the length of its text so far

    def _prompt_text(self, index: int) -> str:
        return self.call.texts[index // self.call.generation["n"]] if self.call.echo else ""

    def _logprobs(self, index: int, entries) -> dict | None:
        if entries is None:
            return None
        offsets, at = [], self._offset.get(index, len(self._prompt_text(index)))
        for t in entries:
            offsets.append(at)
            at += len(t.token)
        self._offset[index] = at
        return {
            "tokens": [t.token for t in entries],
            "token_logprobs": [logprob(t.logprob) for t in entries],
            "top_logprobs": [{top.token: logprob(top.logprob) for top in t.top} for t in entries],
            "text_offset": offsets,
        }

    def _choice(self, index: int, text: str, logprobs=None, reason: str | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def start(self, index: int) -> list[dict]:
        prompt = self._prompt_text(index)
        return [self._choice(index, prompt)] if prompt else []

    def piece(self, index: int, text: str, logprobs) -> list[dict]:
        return [self._choice(index, text, self._logprobs(index, logprobs))]

    def end(self, index: int, reason: str) -> list[dict]:
        return [self._choice(index, "", reason=reason)]

    def choice(self, index: int, text: str, logprobs, reason: str) -> dict:
        return self._choice(index, self._prompt_text(index) + text, self._logprobs(index, logprobs), reason)
