"""The sampling fields chat and completion requests share -> a pyvl generation config (a dict), each validated
like OpenAI validates it: a value of the wrong type or out of range is a 400 naming the field, never ignored.

Fields: ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (0 is greedy), ``top_p``, ``seed``, ``n``,
``presence_penalty`` / ``frequency_penalty`` (-2..2), ``logit_bias`` ({"token id": -100..100}), ``stop``, and
vLLM's extensions ``top_k``, ``repetition_penalty`` and the structured-output fields: ``guided_json``,
``guided_regex``, ``guided_grammar`` (Lark), ``guided_choice``, or the same as ``structured_outputs`` {"json",
"regex", "grammar", "choice"}, and ``response_format`` (json_object, json_schema) as a grammar too.
vLLM's other sampling extensions (``min_p``, ``min_tokens``, ``ignore_eos``...) are refused with a 400 unless they
hold their neutral value: pyvl does not implement them, and an answer must never silently differ from the one
asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import checks
from ..generation_config import MIN_TEMPERATURE
from .errors import bad_request

__all__ = ["Limits", "number", "stops", "generation", "constraint", "refuse_unsupported", "MAX_STOPS"]

MAX_STOPS = 4
_GUIDED = {
    "json": "guided_json",
    "regex": "guided_regex",
    "grammar": "guided_grammar",
    "choice": "guided_choice",
}

# vLLM's sampling extensions pyvl does not implement -> the values that leave the answer as it is
UNSUPPORTED = {
    "min_p": (0, 0.0),
    "min_tokens": (0,),
    "ignore_eos": (False,),
    "stop_token_ids": ([],),
    "bad_words": ([],),
    "allowed_token_ids": (),
    "prompt_logprobs": (),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (),
    "logits_processors": ([],),
    "guided_decoding_backend": (),
    "guided_whitespace_pattern": (),
    "reasoning_effort": (),
}


def refuse_unsupported(body: dict) -> None:
    """A 400 naming the first field that would change the answer in a way pyvl does not implement."""
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise bad_request(
                f"'{name}' is not supported by this server (got {value!r:.80})", name, "unsupported_parameter"
            )


@dataclass(frozen=True)
class Limits:
    """What the model allows: the context, the vocabulary, the sequences the engine decodes at once."""

    max_context: int
    vocab_size: int
    max_num_seqs: int
    max_token_bytes: int  # the most text one token stands for (Tokenizer.max_token_bytes)

    def check_prompt_chars(self, texts, param: str) -> None:
        """Refuse, before anything is tokenized, text that cannot fit the context (tokenizing megabytes costs
        seconds and hundreds of MB only to be refused afterwards)."""
        chars = sum(map(len, texts))
        if chars > self.max_context * self.max_token_bytes:
            raise bad_request(
                f"the prompt has {chars} characters: more than the {self.max_context} tokens of the context hold "
                f"(a token stands for at most {self.max_token_bytes} characters)",
                param,
                "context_length_exceeded",
            )


def number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise bad_request(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}"[:300], name)
    return value


def stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    found = [value] if isinstance(value, str) else value
    if (
        not isinstance(found, list)
        or len(found) > MAX_STOPS
        or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in found)
    ):
        raise bad_request(
            f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings (256 characters each)",
            "stop",
        )
    return tuple(found)


def _logit_bias(value, vocab_size: int) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("'logit_bias' must be an object of token id -> bias", "logit_bias")
    bias = {}
    for key, amount in value.items():
        if not (checks.is_decimal_id(key) and int(key) < vocab_size):
            raise bad_request(
                f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {key!r}"[:200], "logit_bias"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise bad_request(
                f"'logit_bias' values must be numbers in [-100, 100], got {amount!r} for {key}"[:200],
                "logit_bias",
            )
        bias[int(key)] = float(amount)
    return bias or None


def generation(body: dict, limits: Limits, default_max_tokens: int | None = None) -> dict:
    """The generation config of a request's sampling fields (the constraint apart: :func:`guided`)."""
    max_tokens = number(body, "max_completion_tokens", 1, limits.max_context, integer=True)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", 1, limits.max_context, integer=True)
    if max_tokens is None:  # the engine stops at the context
        max_tokens = default_max_tokens or limits.max_context
    temperature = number(body, "temperature", 0, 2)
    temperature = 1.0 if temperature is None else temperature
    if 0 < temperature < MIN_TEMPERATURE:
        raise bad_request(
            f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, 2], got {temperature!r}",
            "temperature",
        )
    top_k = number(body, "top_k", -1, 1 << 20, integer=True)
    if body.get("top_p") == 0:
        raise bad_request("'top_p' must be in (0, 1]", "top_p")
    n = number(body, "n", 1, limits.max_num_seqs, integer=True)
    return dict(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=number(body, "top_p", 0, 1) or 1.0,
        top_k=0 if top_k is None or top_k < 0 else top_k,
        repetition_penalty=number(body, "repetition_penalty", 0.01, 10) or 1.0,
        seed=number(body, "seed", 0, 2**63 - 1, integer=True),
        n=1 if n is None else n,
        presence_penalty=number(body, "presence_penalty", -2, 2) or 0.0,
        frequency_penalty=number(body, "frequency_penalty", -2, 2) or 0.0,
        logit_bias=_logit_bias(body.get("logit_bias"), limits.vocab_size),
    )


def guided(body: dict) -> tuple[dict, str | None]:
    """(generation config fields, the request field it came from) of vLLM's structured-output extensions."""
    found = {name: body[name] for name in _GUIDED.values() if body.get(name) is not None}
    options = body.get("structured_outputs")
    if options is not None:
        if not isinstance(options, dict) or not set(options) <= set(_GUIDED):
            raise bad_request(
                f"'structured_outputs' must be an object with one of {sorted(_GUIDED)}", "structured_outputs"
            )
        found |= {f"structured_outputs.{key}": value for key, value in options.items() if value is not None}
    if not found:
        return {}, None
    if len(found) > 1:
        raise bad_request(f"give one structured-output field, got {sorted(found)}", sorted(found)[0])
    ((param, value),) = found.items()
    kind = param.rsplit(".", 1)[-1].removeprefix("guided_")
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise bad_request(f"'{param}' is not valid JSON ({exc})"[:300], param) from None
        if not isinstance(value, (dict, bool)):
            raise bad_request(f"'{param}' must be a JSON schema (an object)", param)
        return {"json_schema": value}, param
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request(f"'{param}' must be a non-empty list of non-empty strings", param)
        return {"grammar": "start: " + " | ".join(json.dumps(c) for c in value)}, param
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{param}' must be a non-empty string", param)
    return {"regex" if kind == "regex" else "grammar": value}, param


def _response_format(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(
            "'response_format' type must be text, json_object or json_schema", "response_format"
        )
    if value["type"] == "text":
        return {}
    if value["type"] == "json_object":
        return {"json_schema": {"type": "object"}}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise bad_request(
            "'response_format.json_schema' must be an object whose 'schema' is a JSON schema",
            "response_format.json_schema",
        )
    if spec.get("strict") not in (None, True, False):
        raise bad_request(
            "'response_format.json_schema.strict' must be a boolean", "response_format.json_schema.strict"
        )
    return {"json_schema": spec.get("schema", {})}


def constraint(body: dict, *more: tuple[dict, str]) -> tuple[dict, str | None]:
    """The answer's grammar fields and the request field they came from, from ``response_format``, the guided
    fields, or ``more`` (fields, param) sources (tools); at most one."""
    sources = []
    fields = _response_format(body.get("response_format"))
    if fields:
        sources.append((fields, "response_format.json_schema.schema"))
    fields, param = guided(body)
    if fields:
        sources.append((fields, param))
    sources += more
    if len(sources) > 1:
        raise bad_request(
            f"only one of response_format, tools and the guided fields may shape the answer, got "
            f"{[p for _, p in sources]}",
            sources[1][1],
        )
    return sources[0] if sources else ({}, None)
