"""The text side of streaming, for ``stream``, ``astream`` and the server alike: token ids in, the text
``chat()`` would return out, piece by piece, on the consumer's side (the engine thread only hands over ids).

Rules, in order:
  - a stop id ends the text (it is not part of it);
  - ids become text incrementally (``Tokenizer.stream_decoder``: "".join of the pieces equals
    ``decode(ids, skip_special_tokens=True)``);
  - ``chat()`` strips the answer at both ends, so leading whitespace is dropped and trailing whitespace is held
    back until more text follows;
  - stop strings (the server's ``stop``): text that could still be the start of one is held back; on a match,
    the match and everything after it is never sent and the stream is over.

:class:`ByteTextStream` gives the raw text instead: the ids' bytes (``Tokenizer.token_bytes``) decoded as UTF-8,
nothing stripped or cleaned up. It is the text a grammar matched (structured output), and a raw completion's
continuation (its first space kept).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from .tokenizer import Tokenizer

__all__ = ["TextStream", "ByteTextStream"]


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop_ids: Iterable[int], stop_strings: Iterable[str] = ()):
        self._decoder = tokenizer.stream_decoder()
        self._stop_ids = frozenset(stop_ids)
        self._stops = tuple(stop_strings)
        self._space = ""  # trailing whitespace held back
        self._started = False  # some text is out (leading whitespace is no longer dropped)
        self._held = ""  # text that may still start a stop string
        self.stopped = False  # a stop id or stop string ended the text: push no more
        self.matched_stop_string = False

    def push(self, token: int) -> str:
        """The text that ``token`` makes final (possibly ""); "" for every token once stopped."""
        if self.stopped:
            return ""
        if token in self._stop_ids:
            return self.finish()
        return self._match(self._trim(self._decoder.push(token)))

    def finish(self) -> str:
        """The rest of the text, once no token will follow (a stop id calls it)."""
        if self.stopped:
            return ""
        self.stopped = True
        tail = self._space + self._decoder.flush()
        self._space = ""
        return self._match(tail.rstrip() if self._started else tail.strip(), last=True)

    def _trim(self, text: str) -> str:
        text = self._space + text
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        body = text.rstrip()
        self._space = text[len(body) :]
        return body

    def _match(self, text: str, last: bool = False) -> str:
        if not self._stops:
            return text
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held, self.stopped, self.matched_stop_string = "", True, True
            return buffer[: min(hits)]
        if last:
            self._held = ""
            return buffer
        hold = max(
            (
                n
                for s in self._stops
                for n in range(min(len(s) - 1, len(buffer)), 0, -1)
                if buffer.endswith(s[:n])
            ),
            default=0,
        )
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]


class ByteTextStream(TextStream):
    def __init__(self, tokenizer: Tokenizer, stop_ids: Iterable[int], stop_strings: Iterable[str] = ()):
        super().__init__(tokenizer, stop_ids, stop_strings)
        self._bytes = tokenizer.token_bytes
        self._skipped = tokenizer.special_ids  # as decode(skip_special_tokens=True)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        if token in self._stop_ids:
            return self.finish()
        if token in self._skipped:
            return ""
        return self._match(self._utf8.decode(self._bytes[token]))

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.stopped = True
        return self._match(self._utf8.decode(b"", final=True), last=True)
