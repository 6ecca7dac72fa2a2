"""Structured output: an answer held to a JSON schema, a regular expression or a Lark grammar, with llguidance
(a grammar engine with no dependencies), imported only when a request asks for a constraint.

  Grammars     the model's tokens as llguidance sees them (each id's bytes, Tokenizer.token_bytes; ids that stand
               for no text prefixed with 0xFF, so no grammar produces them), built once on first use;
               ``constraint(gen)`` compiles a request's grammar in the caller's thread, or raises a ConfigError
               naming what is wrong.
  Constraint   one request's matcher: the mask of the tokens it allows next, then the token chosen.
  MaskWorker   the engine's helper thread: before a decode step's forward the engine hands it the step's
               constrained rows, and it writes their masks into the sampler's host mask while the device runs the
               forward (on the CPU: while the engine thread's torch ops, which release the GIL, run it). llguidance
               computes masks with the GIL released too. The sampler then applies them on the device.

JSON is generated compactly with fixed separators (", " and ": ", no other whitespace), so a bounded schema
(``maxLength``, ``enum``, ``maximum``, ``additionalProperties: false``, ...) ends in bounded output; a schema's
``x-guidance`` options override that. A grammar accepts the end of the answer (the model's stop ids) only where it
is complete, and the engine ends a request whose grammar can take nothing more.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import ConfigError, PyvlError
from ..generation_config import GenerationConfig
from ..tokenizer import Tokenizer

__all__ = ["Grammars", "Constraint", "MaskWorker", "JSON_FORMAT"]

JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MARKER = b"\xff"  # llguidance's prefix of a special token's text


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise PyvlError(
            "structured output (json_schema, regex, grammar) needs llguidance: pip install 'pyvl[serve]' "
            "or pip install llguidance"
        ) from None
    return llguidance


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: each id's bytes, the end ids, and an encoder whose tokens'
    bytes are exactly its input."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        table = tokenizer.token_bytes
        self.tokens = [
            MARKER + table[i] if i in tokenizer.marker_ids else table[i] for i in range(len(table))
        ]
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.marker_ids)

    def __call__(self, data: bytes) -> list[int]:
        """SentencePiece's ids for ``data`` without its dummy "\u2581" prefix; byte pieces where the two views
        cannot agree (llguidance needs the tokens' bytes to be exactly ``data``)."""
        if isinstance(data, str):
            data = data.encode()
        table = self.tokens  # llguidance's bytes: a special id's never equal text (encode makes "<img>" one)
        ids = self._tokenizer.encode(data.decode("utf-8", errors="replace"), add_bos=False)
        got = b"".join(table[i] for i in ids)
        if got == b" " + data and ids and table[ids[0]] == b" ":
            return ids[1:]
        byte_ids = self._tokenizer.byte_piece_ids
        if got == data or not all(b in byte_ids for b in data):
            return ids
        return [byte_ids[b] for b in data]


class Grammars:
    """Compiles constraints against one model's tokenizer (thread-safe; the token table is built once)."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: tuple[int, ...]):
        self._tokenizer = tokenizer
        self._eos_ids = tuple(eos_ids)
        self._lltokenizer = None
        self._lock = threading.Lock()

    def _tokens(self):
        with self._lock:
            if self._lltokenizer is None:
                llg = _llguidance()
                vocabulary = _Vocabulary(self._tokenizer, self._eos_ids)
                self._lltokenizer = llg.LLTokenizer(
                    llg.TokenizerWrapper(vocabulary),
                    n_vocab=len(vocabulary.tokens),
                    eos_token=list(self._eos_ids),
                )
            return self._lltokenizer

    def grammar(self, gen: GenerationConfig) -> str:
        """The llguidance grammar of gen's constraint (ConfigError for one llguidance cannot read)."""
        llg = _llguidance()
        try:
            if gen.json_schema is not None:
                return llg.LLMatcher.grammar_from_json_schema(gen.json_schema, defaults=JSON_FORMAT)
            if gen.regex is not None:
                return llg.LLMatcher.grammar_from_regex(gen.regex)
            return llg.LLMatcher.grammar_from_lark(gen.grammar)
        except ValueError as exc:
            raise ConfigError(f"generation_config {_kind(gen)}: {exc}") from None

    def constraint(self, gen: GenerationConfig) -> Constraint:
        """A fresh matcher of gen's constraint; ConfigError naming the first problem of an invalid one."""
        llg = _llguidance()
        matcher = llg.LLMatcher(self._tokens(), self.grammar(gen), log_level=0)
        if matcher.is_error():
            raise ConfigError(f"generation_config {_kind(gen)} is invalid: {matcher.get_error()[:500]}")
        return Constraint(matcher)


def _kind(gen: GenerationConfig) -> str:
    return "json_schema" if gen.json_schema is not None else "regex" if gen.regex is not None else "grammar"


class Constraint:
    """One request's grammar state (engine thread only, once submitted)."""

    def __init__(self, matcher):
        self.matcher = matcher

    def copy(self) -> Constraint:
        """An independent matcher in the same state (the other choices of an n > 1 request)."""
        return Constraint(self.matcher.deep_copy())

    def accept(self, token: int) -> bool:
        """Advance by the chosen token; False if the grammar refuses it (the request must end)."""
        return self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """Nothing more can follow: the answer is over."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class MaskWorker:
    """Fills the sampler's host mask rows of constrained requests on a helper thread (see the module doc)."""

    def __init__(self, mask_host: torch.Tensor):
        self._mask = mask_host
        self._pool: ThreadPoolExecutor | None = None
        self._executor = None

    def start(self, rows: list[tuple[Constraint, int]]) -> Future | None:
        """Begin writing the masks of (constraint, sampler slot) rows; ``wait`` the result before sampling."""
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="pyvl-masks")
            self._executor = _llguidance().LLExecutor()
        return self._pool.submit(self.fill, rows)

    def fill(self, rows: list[tuple[Constraint, int]]) -> None:
        """Write the masks now (in the calling thread)."""
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        capacity, words = self._mask.shape
        self._executor.unsafe_compute_mask_ptr(
            [(c.matcher, slot) for c, slot in rows], self._mask.data_ptr(), words * 4, capacity
        )

    @staticmethod
    def wait(pending: Future | None) -> None:
        if pending is not None:
            pending.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
