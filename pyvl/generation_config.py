"""Generation settings, as the original ``chat(generation_config=...)`` takes them (an HF-style dict) or as a
frozen dataclass; every field type- and range-checked.

The engine's sampler (pyvl.engine.sampling) applies them as HF transformers 4.37's ``generate`` does: repetition
penalty (greedy too), then, when sampling, temperature -> top-k -> top-p, softmax and a multinomial draw from a
seeded generator. The repetition penalty sees the tokens generated so far plus the BOS id that HF seeds the output
with when ``generate`` is called with ``inputs_embeds`` (which is what InternVL's ``chat`` does), not the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import numpy as np

from . import checks
from .errors import ConfigError

__all__ = ["GenerationConfig", "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: tuple[int, ...] | None = None  # None: the chat stop set (<|im_end|>)
    num_beams: int = 1
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] | None = None  # a dict {token id: bias} is accepted too
    json_schema: str | None = None  # a JSON schema (a dict, or its JSON text); stored as JSON text
    regex: str | None = None
    grammar: str | None = None  # a Lark grammar

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None

    def __post_init__(self) -> None:
        """Type and range of every field (ConfigError naming it); numpy scalars become Python numbers."""

        def put(name, value):
            object.__setattr__(self, name, value)

        def where(name):
            return f"generation_config {name}"

        put(
            "max_new_tokens",
            checks.integer(self.max_new_tokens, where("max_new_tokens"), 0, error=ConfigError),
        )
        put("do_sample", checks.boolean(self.do_sample, where("do_sample"), error=ConfigError))
        put(
            "temperature",
            checks.real(self.temperature, where("temperature"), 0, low_open=True, error=ConfigError),
        )
        put("top_k", checks.integer(self.top_k, where("top_k"), 0, error=ConfigError))
        put("top_p", checks.real(self.top_p, where("top_p"), 0, 1, low_open=True, error=ConfigError))
        put(
            "repetition_penalty",
            checks.real(
                self.repetition_penalty, where("repetition_penalty"), 0, low_open=True, error=ConfigError
            ),
        )
        if self.seed is not None:  # torch.Generator.manual_seed takes 0..2**64-1; HF seeds are int64
            put("seed", checks.integer(self.seed, where("seed"), 0, 2**63 - 1, error=ConfigError))
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            if isinstance(eos, (int, np.integer)) and not isinstance(eos, bool):
                eos = (eos,)
            if not isinstance(eos, (tuple, list)) or not eos:
                raise ConfigError(
                    f"{where('eos_token_id')}={eos!r}: expected a token id or a non-empty list of token ids"
                )
            put(
                "eos_token_id",
                tuple(checks.integer(e, where("eos_token_id"), 0, error=ConfigError) for e in eos),
            )
        num_beams = checks.integer(self.num_beams, where("num_beams"), error=ConfigError)
        if num_beams != 1:
            raise ConfigError(
                f"{where('num_beams')}={num_beams}: beam search is not supported: num_beams must be 1"
            )
        put("n", checks.integer(self.n, where("n"), 1, 1024, error=ConfigError))
        put("logprobs", checks.boolean(self.logprobs, where("logprobs"), error=ConfigError))
        top = checks.integer(self.top_logprobs, where("top_logprobs"), 0, MAX_TOP_LOGPROBS, error=ConfigError)
        if top and not self.logprobs:
            raise ConfigError(f"{where('top_logprobs')}={top} needs logprobs=True")
        put("top_logprobs", top)
        for name in ("presence_penalty", "frequency_penalty"):
            put(name, checks.real(getattr(self, name), where(name), -2, 2, error=ConfigError))
        if self.logit_bias is not None:
            put("logit_bias", _logit_bias(self.logit_bias, where("logit_bias")))
        self._check_constraint(put, where)

    def _check_constraint(self, put, where) -> None:
        given = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"generation_config: {' and '.join(given)} exclude each other; give one")
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where('json_schema')}: not valid JSON ({exc})") from None
            if not isinstance(schema, (dict, bool)):
                raise ConfigError(
                    f"{where('json_schema')}: a JSON schema is an object (or true/false), got "
                    f"{type(schema).__name__}"
                )
            put("json_schema", json.dumps(schema, ensure_ascii=False))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{where(name)}: expected a non-empty str, got {value!r:.80}")

    def check_vocab(self, vocab_size: int) -> None:
        """ConfigError unless every logit_bias id is a token id of a vocab of ``vocab_size``."""
        outside = [i for i, _ in self.logit_bias or () if i >= vocab_size]
        if outside:
            raise ConfigError(
                f"generation_config logit_bias: token ids {outside[:5]} are outside the vocabulary "
                f"[0, {vocab_size})"
            )

    @classmethod
    def from_user(cls, config: GenerationConfig | dict | None) -> GenerationConfig:
        """Accept our dataclass, an HF-style dict as the original ``chat`` takes, or None (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if not isinstance(config, dict):
            raise ConfigError(
                f"generation_config must be a dict or GenerationConfig, got {type(config).__name__}"
            )
        known = {f.name for f in fields(cls)}
        if not all(isinstance(key, str) for key in config):
            raise ConfigError(f"generation_config keys must be strings, got {sorted(map(repr, config))}")
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"generation_config: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**config)


def _logit_bias(bias, where: str) -> tuple[tuple[int, float], ...] | None:
    """{token id: bias in -100..100} (or its items) -> sorted (id, bias) pairs; None when empty."""
    items = bias.items() if isinstance(bias, dict) else bias
    if not isinstance(items, (tuple, list, type({}.items()))):
        raise ConfigError(f"{where}: expected a dict of token id -> bias, got {type(bias).__name__}")
    pairs = {}
    for pair in items:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"{where}: expected token id -> bias pairs, got {pair!r:.80}")
        token = checks.integer(pair[0], f"{where} token id", 0, error=ConfigError)
        pairs[token] = checks.real(pair[1], f"{where}[{token}]", -100, 100, error=ConfigError)
    return tuple(sorted(pairs.items())) or None
