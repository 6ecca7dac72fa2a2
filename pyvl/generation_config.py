"""Generation settings, as the original ``chat(generation_config=...)`` takes them (an HF-style dict) or as a
frozen dataclass; every field type- and range-checked.

The engine's sampler (pyvl.engine.sampling) applies them as HF transformers 4.37's ``generate`` does: repetition
penalty (greedy too), then, when sampling, temperature -> top-k -> top-p, softmax and a multinomial draw from a
seeded generator. The repetition penalty sees the tokens generated so far plus the BOS id that HF seeds the output
with when ``generate`` is called with ``inputs_embeds`` (which is what InternVL's ``chat`` does), not the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from . import checks
from .errors import ConfigError

__all__ = ["GenerationConfig"]


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
