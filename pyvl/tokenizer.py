"""InternLM2 tokenizer: SentencePiece BPE plus HF "added tokens", bit-exact with the original slow tokenizer.

Files read from the model folder: `tokenizer.model` (SentencePiece BPE with byte fallback), `tokenizer_config.json`
(`added_tokens_decoder` id -> content, which overrides SentencePiece placeholders such as `[UNUSED_TOKEN_146]`;
bos/eos/unk/pad and `additional_special_tokens`), optionally `added_tokens.json` and `special_tokens_map.json`.

encode(text): split on added-token strings (leftmost-longest, surrounding whitespace kept), SentencePiece-encode
  every remaining segment on its own (so each segment gets the model's dummy-prefix "▁"), prepend <s>.
decode(ids) (transformers 4.37 `PreTrainedTokenizer._decode` + `InternLM2Tokenizer.convert_tokens_to_string`):
  "legacy" tokens (non-special added tokens and additional specials with id >= SentencePiece size, e.g. <img>)
  cut the ids into runs; sub-texts = runs (dropped when empty, except the last) and legacy strings, joined by " ".
  A run -> string: pieces are SentencePiece-decoded in stretches between special tokens; a special token appends
  " " (only when the previous token was not special) + decoded stretch + its text; then `clean_up_tokenization`.
  With skip_special_tokens every special id is dropped first. Example: [<s>, ▁Hi] -> " <s>Hi".
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import sentencepiece

from pyvl import checks
from pyvl.errors import ConfigError, PromptError

__all__ = ["Tokenizer", "StreamDecoder", "clean_up_tokenization"]

# transformers' clean_up_tokenization, applied in this order (the slow InternLM2 tokenizer always applies it)
_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
# last characters of the proper prefixes of those patterns (" ", " '", " n", " n'", " 'v", " 'r")
_CLEANUP_OPEN_TAIL = frozenset(" 'nvr")
_REPLACEMENT_CHAR = "\ufffd"  # what SentencePiece emits for invalid or not yet complete UTF-8 byte pieces


def clean_up_tokenization(text: str) -> str:
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path}: file is missing; the tokenizer folder needs it")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str:
    """A special-token entry is a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty token string or {{'content': str}}, got {value!r}")
    return value


class Tokenizer:
    """Slow InternLM2Tokenizer equivalent. Build with `Tokenizer.from_folder(path)`."""

    def __init__(
        self,
        sp: sentencepiece.SentencePieceProcessor,
        added: dict[int, dict],
        special_names: dict,
        additional_special: list[str],
        source: str = "<memory>",
    ):
        self._sp, self._source = sp, source
        self._n_sp = sp.get_piece_size()
        self._added = {i: t["content"] for i, t in added.items()}  # id -> content
        self._added_ids = {c: i for i, c in self._added.items()}  # content -> id
        self._rstrip = {c for i, c in self._added.items() if added[i].get("rstrip")}
        self._lstrip = {c for i, c in self._added.items() if added[i].get("lstrip")}
        self.vocab_size = max(self._n_sp, max(self._added, default=-1) + 1)  # == len(tokenizer) in HF
        self._special_strings = frozenset(list(special_names.values()) + list(additional_special))
        self._names = {k: self.token_to_id(v) for k, v in special_names.items()}  # bos_token -> id, ...
        self.special_ids = frozenset(self.token_to_id(s) for s in self._special_strings)
        self._legacy = frozenset(
            {c for c in self._added_ids if c not in self._special_strings}
            | {s for s in additional_special if self.token_to_id(s) >= self._n_sp}
        )
        # split on every added token, longest first so that Python's leftmost alternation is leftmost-longest
        alts = sorted(self._added_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None
        # SentencePiece ids whose piece text equals an added token map to that token (HF converts pieces by name)
        self._sp_remap = {}
        for content, i in self._added_ids.items():
            pid = sp.piece_to_id(content)
            if sp.id_to_piece(pid) == content and pid != i:
                self._sp_remap[pid] = i
        # anchor for decoding a tail of pieces on its own: a plain piece without "▁" whose text is known
        self._anchor = next((i for i in range(self._n_sp) if self._is_plain_anchor(i)), None)
        self._anchor_text = sp.decode([self._anchor]) if self._anchor is not None else ""

    def _is_plain_anchor(self, i: int) -> bool:
        sp = self._sp
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or i in self._added:
            return False
        piece = sp.id_to_piece(i)
        return bool(piece) and "\u2581" not in piece and sp.decode([i]) == piece

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        folder = Path(path)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise ConfigError(f"{model_file}: file is missing; expected a SentencePiece model")
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"{model_file}: not a valid SentencePiece model ({exc})") from exc
        cfg_file, map_file, added_file = (
            folder / n for n in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
        )
        cfg = _read_json(cfg_file, required=True)
        added: dict[int, dict] = {}
        decoder = cfg.get("added_tokens_decoder", {})
        if not isinstance(decoder, dict):
            raise ConfigError(
                f"{cfg_file}: 'added_tokens_decoder' must be an object id -> token, got "
                f"{type(decoder).__name__}"
            )
        for key, tok in decoder.items():
            where = f"{cfg_file}: added_tokens_decoder[{key!r}]"
            if not checks.is_decimal_id(key):
                raise ConfigError(f"{where}: key must be a non-negative integer id (at most 9 digits)")
            if not isinstance(tok, dict):
                raise ConfigError(f"{where}: expected an AddedToken object, got {tok!r}")
            added[int(key)] = {**tok, "content": _token_text(tok, where)}
        for content, i in _read_json(added_file, required=False).items():
            where = f"{added_file}: {content!r}"
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ConfigError(f"{where}: id must be a non-negative integer, got {i!r}")
            if i in added and added[i]["content"] != content:
                raise ConfigError(f"{where}: id {i} is {added[i]['content']!r} in {cfg_file.name}")
            added.setdefault(i, {"content": content})
        seen: dict[str, int] = {}
        for i, tok in sorted(added.items()):
            if tok["content"] in seen:
                raise ConfigError(
                    f"{folder}: added token {tok['content']!r} has two ids, {seen[tok['content']]} "
                    f"and {i} ({cfg_file.name} / {added_file.name})"
                )
            seen[tok["content"]] = i
        n_sp = sp.get_piece_size()
        extra = sorted(i for i in added if i >= n_sp)
        if extra != list(range(n_sp, n_sp + len(extra))):
            raise ConfigError(
                f"{folder}: added token ids beyond the {n_sp} SentencePiece pieces must be "
                f"contiguous from {n_sp}, got {extra}"
            )
        # special_tokens_map.json wins over tokenizer_config.json, as in transformers
        smap = {**cfg, **_read_json(map_file, required=False)}
        names = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if smap.get(key) is not None:
                names[key] = _token_text(smap[key], f"{folder}: {key}")
        extra_special = smap.get("additional_special_tokens") or []
        if not isinstance(extra_special, list):
            raise ConfigError(f"{folder}: additional_special_tokens must be a list, got {extra_special!r}")
        extra_special = [_token_text(t, f"{folder}: additional_special_tokens") for t in extra_special]
        return cls(sp, added, names, extra_special, source=str(folder))

    # ------------------------------------------------------------------------------------------- vocabulary
    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int:
        if token in self._added_ids:
            return self._added_ids[token]
        pid = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(pid) != token:
            raise ConfigError(
                f"{self._source}: token {token!r} is neither an added token nor a SentencePiece piece"
            )
        return pid

    def id_to_piece(self, token_id: int) -> str:
        if token_id in self._added:
            return self._added[token_id]
        if not 0 <= token_id < self._n_sp:
            raise PromptError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(token_id)

    @functools.cached_property
    def token_bytes(self) -> tuple[bytes, ...]:
        """Every id's bytes as generated text holds them: a piece with its "\u2581" as a space, a byte piece
        (``<0x0A>``) as that one byte, an added, control or unknown token as its text. The concatenation of an
        answer's token bytes is its raw text (before ``decode``'s clean-up and the first piece's "\u2581" drop)."""
        sp, table = self._sp, []
        for i in range(self.vocab_size):
            if i in self._added or not 0 <= i < self._n_sp:
                table.append(self._added.get(i, "").encode())
            elif sp.is_byte(i):
                table.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                table.append(sp.id_to_piece(i).encode())
            else:
                table.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
        return tuple(table)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a text of more than ``n * max_token_bytes`` characters
        is more than ``n`` tokens, known before it is tokenized."""
        return max(map(len, self.token_bytes))

    @functools.cached_property
    def byte_piece_ids(self) -> dict[int, int]:
        """Byte value -> the id of its byte piece (``<0xNN>``), for every byte the vocabulary has one for."""
        sp = self._sp
        return {
            self.token_bytes[i][0]: i for i in range(self._n_sp) if i not in self._added and sp.is_byte(i)
        }

    @functools.cached_property
    def marker_ids(self) -> frozenset[int]:
        """Ids that stand for no text (added tokens, SentencePiece's control and unknown pieces): a grammar
        never produces them."""
        sp = self._sp
        pieces = {i for i in range(self._n_sp) if sp.is_control(i) or sp.is_unknown(i)}
        return frozenset(pieces | set(self._added))

    def _named(self, key: str) -> int:
        if key not in self._names:
            raise ConfigError(f"{self._source}: no {key} in tokenizer_config.json / special_tokens_map.json")
        return self._names[key]

    bos_id = property(lambda self: self._named("bos_token"))
    eos_id = property(lambda self: self._named("eos_token"))
    pad_id = property(lambda self: self._named("pad_token"))
    unk_id = property(lambda self: self._named("unk_token"))
    im_start_id = property(lambda self: self.token_to_id("<|im_start|>"))
    im_end_id = property(lambda self: self.token_to_id("<|im_end|>"))
    img_start_id = property(lambda self: self.token_to_id("<img>"))
    img_end_id = property(lambda self: self.token_to_id("</img>"))
    img_context_id = property(lambda self: self.token_to_id("<IMG_CONTEXT>"))

    # ------------------------------------------------------------------------------------------- encoding
    def _segments(self, text: str) -> list[str]:
        """[text, token, text, token, ..., text]; whitespace kept unless a token asks for lstrip/rstrip."""
        parts = self._split_re.split(text) if self._split_re else [text]
        for k in range(1, len(parts), 2):
            if parts[k] in self._rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
            if parts[k] in self._lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
        return parts

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for k, part in enumerate(self._segments(text)):
            if k % 2:
                ids.append(self._added_ids[part])
            elif part:
                ids.extend(self._sp_remap.get(i, i) for i in self._sp.encode(part))
        return ids

    def tokenize(self, text: str, add_bos: bool = True) -> list[str]:
        return [self.id_to_piece(i) for i in self.encode(text, add_bos)]

    # ------------------------------------------------------------------------------------------- decoding
    def _run_to_string(self, ids: list[int]) -> str:
        """InternLM2Tokenizer.convert_tokens_to_string (its prefix-space step is a net no-op)."""
        out, pending, prev_special = "", [], False
        for i in ids:
            piece = self.id_to_piece(i)
            if piece in self._special_strings:
                out += ("" if prev_special else " ") + self._sp.decode(pending) + piece
                pending, prev_special = [], True
            else:
                pending.append(i)
                prev_special = False
        return clean_up_tokenization(out + self._sp.decode(pending))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        sub_texts, run = [], []
        for i in map(int, ids):
            if skip_special_tokens and i in self.special_ids:
                continue
            piece = self.id_to_piece(i)
            if piece in self._legacy:
                text = self._run_to_string(run) if run else ""
                if text:
                    sub_texts.append(text)
                sub_texts.append(piece)
                run = []
            else:
                run.append(i)
        if run:
            sub_texts.append(self._run_to_string(run))
        return " ".join(sub_texts)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def _safe_cut(ctx: str, text: str, end: int) -> int:
    """Largest s <= end such that clean_up(L + X) == clean_up(L) + clean_up(X) for every X, L = emitted + text[:s].

    clean_up only deletes spaces, and a replacement can straddle the cut only if L ends (at some stage) with a
    proper prefix of a pattern (" ", " '", " n", " n'", " 'v", " 'r"). Non-space characters are never deleted, so
    that is impossible when L's last char is none of " 'nvr", or when L's last three chars hold no space.
    """
    for s in range(end, 0, -1):
        tail = (ctx + text[max(0, s - 3) : s])[-3:]
        if tail[-1] not in _CLEANUP_OPEN_TAIL or " " not in tail:
            return s
    return 0


class StreamDecoder:
    """Incremental `decode(ids, skip_special_tokens=True)`: "".join(push(i) for i in ids) + flush() == decode.

    Raw SentencePiece text is emitted once final: trailing U+FFFD (a byte sequence that may still complete) and a
    tail that clean_up could still change are held back. Ids since the last non-byte piece form a window that is
    re-decoded (behind an anchor piece, so SentencePiece does not strip its leading "▁"); cost is O(window).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._n_sub = 0  # sub-texts already out (runs split by legacy added tokens are joined with " ")
        self._reset_run()

    def _reset_run(self) -> None:
        self._held = ""  # raw text (before clean-up) not emitted yet, from committed windows
        self._window: list[int] = []
        self._wskip = 0  # leading chars of the window's raw text already emitted (only when _held == "")
        self._ctx = ""  # last <= 3 raw chars emitted (clean-up context for _safe_cut)
        self._at_start = True  # SentencePiece strips "▁" from the run's first non-control piece
        self._run_open = False  # the current run has at least one id
        self._run_out = False  # the current run has emitted non-empty text (its " " separator is out)

    def _decode_window(self) -> str:
        tok = self._tok
        if self._at_start:
            return tok._sp.decode(self._window)
        return tok._sp.decode([tok._anchor] + self._window)[len(tok._anchor_text) :]

    def _emit(self, raw: str) -> str:
        text = clean_up_tokenization(raw)
        if text and not self._run_out:
            self._run_out = True
            return (" " if self._n_sub else "") + text
        return text

    def push(self, token_id: int) -> str:
        tok, token_id = self._tok, int(token_id)
        if token_id in tok.special_ids:
            return ""
        piece = tok.id_to_piece(token_id)
        if piece in tok._legacy:
            out = self._finish_run(last=False)
            sep = " " if self._n_sub else ""
            self._n_sub += 1
            return out + sep + piece
        self._run_open = True
        self._window.append(token_id)
        raw = self._decode_window()
        text = self._held + raw[self._wskip :]
        end = len(text)
        while end and text[end - 1] == _REPLACEMENT_CHAR:
            end -= 1
        s = _safe_cut(self._ctx, text, end)
        out = self._emit(text[:s])
        self._ctx = (self._ctx + text[:s])[-3:]
        if s <= len(self._held):
            self._held = self._held[s:]
        else:
            self._wskip += s - len(self._held)
            self._held = ""
        # a non-byte piece ends any byte sequence, so the window's text is final: commit it
        sp = tok._sp
        if (
            not sp.is_byte(token_id)
            and tok._anchor is not None
            and (not self._at_start or any(not sp.is_control(i) for i in self._window))
        ):
            self._held += raw[self._wskip :]
            self._window, self._wskip, self._at_start = [], 0, False
        return out

    def _finish_run(self, last: bool) -> str:
        """Emit all that is left of the current run and start a new one."""
        out = ""
        if self._run_open:
            out = self._emit(self._held + self._decode_window()[self._wskip :])
            if last and not self._run_out and self._n_sub:
                out = " "  # transformers appends the final run even when it decodes to ""
        if self._run_out:
            self._n_sub += 1
        self._reset_run()
        return out

    def flush(self) -> str:
        """Emit the held-back tail; the decoder is then ready for a new sequence."""
        out = self._finish_run(last=True)
        self._n_sub = 0
        return out
