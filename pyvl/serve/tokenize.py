"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, in vLLM's shapes.

/tokenize   {"prompt": str, "add_special_tokens": true} -> the prompt's ids (the BOS id first unless
            add_special_tokens is false), or {"messages": [...]} -> the ids of the chat prompt that
            /v1/chat/completions would run (images counted from their headers, never decoded; the template always
            ends with the assistant's turn, so ``add_generation_prompt`` must stay true);
            "return_token_strs": true adds each id's piece.
            -> {"count", "max_model_len", "tokens", "token_strs"}
/detokenize {"tokens": [ids]} -> {"prompt": their text (special tokens kept)}
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import bad_request
from .params import Limits
from .protocol import ImageRef, conversation

__all__ = ["TokenizeCall", "parse_tokenize", "tokenize_response", "parse_detokenize"]


@dataclass
class TokenizeCall:
    prompt: str | None  # a raw prompt, or None for messages
    add_special_tokens: bool
    return_token_strs: bool
    system_message: str | None = None
    history: list[tuple[str, str]] | None = None
    question: str = ""
    images: list[ImageRef] | None = None


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean", name)
    return value


def parse_tokenize(body, limits: Limits) -> TokenizeCall:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    strs = _flag(body, "return_token_strs", False)
    if "messages" in body:
        if not _flag(body, "add_generation_prompt", True):
            raise bad_request(
                "pyvl's chat template always ends with the assistant's turn; add_generation_prompt must be true",
                "add_generation_prompt",
            )
        system, history, question, images = conversation(body["messages"])
        limits.check_prompt_chars(
            [system or "", question, *(t for turn in history for t in turn)], "messages"
        )
        return TokenizeCall(None, True, strs, system, history or None, question, images)
    if not isinstance(body.get("prompt"), str):
        raise bad_request("give 'prompt' (a string) or 'messages'", "prompt")
    limits.check_prompt_chars([body["prompt"]], "prompt")
    return TokenizeCall(body["prompt"], _flag(body, "add_special_tokens", True), strs)


def tokenize_response(ids: list[int], call: TokenizeCall, tokenizer, max_model_len: int) -> dict:
    return {
        "count": len(ids),
        "max_model_len": max_model_len,
        "tokens": ids,
        "token_strs": [tokenizer.id_to_piece(i) for i in ids] if call.return_token_strs else None,
    }


def parse_detokenize(body, vocab_size: int) -> list[int]:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in tokens
    ):
        raise bad_request(f"'tokens' must be a list of token ids in [0, {vocab_size})", "tokens")
    return tokens
