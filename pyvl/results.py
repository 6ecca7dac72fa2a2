"""What a call gives beyond its text: every choice (``n``) and the tokens' log-probabilities (``logprobs``).

``chat()`` returns one string, as the original does. Pass ``result=pyvl.ChatResult()`` and it also fills the
result, as ``stats=`` fills a ChatStats:

    result = pyvl.ChatResult()
    model.chat(None, "Name a colour.", dict(n=3, do_sample=True, logprobs=True, top_logprobs=2), result=result)
    [c.text for c in result.choices]; result.choices[0].logprobs[0].top

A token's log-probability is the log-softmax of the scores it was drawn from after the repetition, presence and
frequency penalties, the logit_bias and the temperature, and before top-k, top-p and a grammar's mask, which only
restrict which tokens may be drawn (pyvl.engine.sampling). Stop ids are not part of the text, and have no entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine.request import Request
from .engine.sampling import TokenLogprobs
from .tokenizer import Tokenizer

__all__ = ["ChatResult", "Choice", "TokenLogprob", "TopLogprob", "token_logprobs"]


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str  # its bytes as UTF-8 (U+FFFD where a token holds part of a character)
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob(TopLogprob):
    top: list[TopLogprob] = field(default_factory=list)  # the top_logprobs most likely tokens, best first


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]  # as generated (a stop id included)
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    logprobs: list[TokenLogprob] | None = None  # one per generated token but stop ids, when asked for


@dataclass
class ChatResult:
    """Every choice of one call, and its token counts (``completion_tokens`` over all choices)."""

    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def fill(self, requests: list[Request], texts: list[str], tokenizer: Tokenizer) -> None:
        """The finished requests of one call (choice i = requests[i]) and their texts."""
        self.choices = [
            Choice(
                r.choice,
                text,
                list(r.output_ids),
                r.stats.finish_reason,
                token_logprobs(tokenizer, r.output_ids, r.logprobs, r.stop_ids) if r.gen.logprobs else None,
            )
            for r, text in zip(requests, texts)
        ]
        self.prompt_tokens = requests[0].stats.prompt_tokens
        self.cached_tokens = requests[0].stats.cached_tokens
        self.completion_tokens = sum(r.stats.new_tokens for r in requests)


def _top(tokenizer: Tokenizer, token: int, logprob: float) -> TopLogprob:
    raw = tokenizer.token_bytes[token]
    return TopLogprob(token, raw.decode("utf-8", errors="replace"), raw, logprob)


def token_logprobs(
    tokenizer: Tokenizer, ids: list[int], entries: list[TokenLogprobs], skip: frozenset[int] = frozenset()
) -> list[TokenLogprob]:
    """The entries of ``ids`` (as the engine delivered them) as TokenLogprobs, leaving out the ids in ``skip``."""
    out = []
    for token, (logprob, top) in zip(ids, entries):
        if token in skip:
            continue
        chosen = _top(tokenizer, token, logprob)
        out.append(TokenLogprob(**vars(chosen), top=[_top(tokenizer, i, lp) for i, lp in top]))
    return out
