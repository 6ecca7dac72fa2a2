"""pyvl.tokenizer against the original slow InternLM2Tokenizer (golden probes and chat cases), plus streaming."""

import json
import random
import shutil
from pathlib import Path

import pytest

from pyvl.errors import ConfigError, PromptError
from pyvl.tokenizer import Tokenizer, clean_up_tokenization

GOLDEN = Path(__file__).parent / "data" / "golden"
PROBES = json.loads((GOLDEN / "tokenizer_probes.json").read_text(encoding="utf-8"))
VARIANTS = ("mini", "v15")
CASES = {v: json.loads((GOLDEN / v / "cases.json").read_text(encoding="utf-8"))["cases"] for v in VARIANTS}
GEN_CASES = [(v, name) for v in VARIANTS for name, c in CASES[v].items() if "decode_gen_ids" in c]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(GOLDEN / "tokenizer")


def _stream(tok, ids):
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


# ----------------------------------------------------------------------------------------- golden parity
@pytest.mark.parametrize("probe", PROBES["probes"], ids=lambda p: repr(p["text"][:20]))
def test_probe_encode_and_decode(tok, probe):
    assert tok.encode(probe["text"]) == probe["input_ids"]
    assert tok.tokenize(probe["text"]) == probe["tokens"]
    assert tok.decode(probe["input_ids"]) == probe["decode"]
    assert tok.decode(probe["input_ids"], skip_special_tokens=True) == probe["decode_skip_special"]


def test_decode_every_single_id(tok):
    assert len(tok) == tok.vocab_size == PROBES["len_tokenizer"] == 1009
    wrong = [
        i
        for i in range(len(tok))
        if tok.decode([i]) != PROBES["decode_single_id"][str(i)]
        or tok.decode([i], skip_special_tokens=True) != PROBES["decode_single_id_skip_special"][str(i)]
    ]
    assert wrong == []


def test_special_ids(tok):
    assert sorted(tok.special_ids) == PROBES["all_special_ids"]
    for text, i in PROBES["special_ids"].items():
        assert tok.token_to_id(text) == i and tok.id_to_piece(i) == text
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert (tok.im_end_id, tok.im_start_id) == (998, 999)
    assert (tok.img_start_id, tok.img_end_id, tok.img_context_id) == (1000, 1001, 1002)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_copies_match(tok, variant):
    other = Tokenizer.from_folder(GOLDEN / variant / "checkpoint")
    text = PROBES["probes"][8]["text"] + "<|im_end|><img><IMG_CONTEXT></img>"
    assert other.encode(text) == tok.encode(text) and other.special_ids == tok.special_ids


@pytest.mark.parametrize("variant,name", GEN_CASES)
def test_case_generations_decode(tok, variant, name):
    case = CASES[variant][name]
    assert tok.decode(case["gen_ids"]) == case["decode_gen_ids"]
    # chat(): decode with special tokens skipped, cut at <|im_end|>, strip
    assert (
        tok.decode(case["new_token_ids"], skip_special_tokens=True).split("<|im_end|>")[0].strip()
        == case["response"]
    )
    pieces, tail = _stream(tok, case["new_token_ids"])
    assert "".join(pieces) + tail == tok.decode(case["new_token_ids"], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------- round trips
PLAIN = [
    "Hello, who are you?",
    "Café ☕ naïve — 你好！ Emoji 🎨 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "tabs\tand  double  spaces\n\n",
    "  two leading spaces",
    "trailing space ",
    "中文和English混合，数字123。",
    "\x00\x01 control \r\n chars",
]


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.encode(text, add_bos=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == " <s>" + text


@pytest.mark.parametrize(
    "parts",
    [
        ("A", "<|im_end|>", "B"),
        ("你好", "<IMG_CONTEXT>", "🎨\tx"),
        ("x  ", "<img>", "  y", "</img>", "\nz"),
        ("", "<ref>", "a", "</ref>", ""),
    ],
)
def test_special_tokens_in_the_middle(tok, parts):
    text = "".join(parts)
    expected = [tok.bos_id]
    for k, part in enumerate(
        parts
    ):  # segments are encoded independently, each with SentencePiece's dummy prefix
        expected += [tok.token_to_id(part)] if k % 2 else tok.encode(part, add_bos=False)
    assert tok.encode(text) == expected
    # skip decoding rejoins the text segments; each later segment keeps its dummy-prefix space
    assert tok.decode(expected, skip_special_tokens=True) == " ".join(p for p in parts[::2] if p)


def test_longest_match_and_no_strip(tok):
    assert tok.encode("<IMG_CONTEXT><img>", add_bos=False) == [1002, 1000]
    assert tok.encode("<|im_start|>", add_bos=False) == [999]
    assert tok.encode("<img", add_bos=False) != [1000] and 1000 not in tok.encode("<img", add_bos=False)
    # whitespace next to added tokens stays in the text segments (no lstrip/rstrip)
    assert tok.encode(" <img> ", add_bos=False) == tok.encode(" ", add_bos=False) + [1000] + tok.encode(
        " ", add_bos=False
    )


def test_clean_up_is_applied_like_the_slow_tokenizer(tok):
    assert (
        clean_up_tokenization("a . b ? c ! d , e ' f do n't I 'm it 's we 've you 're")
        == "a. b? c! d, e'f don't I'm it's we've you're"
    )
    ids = tok.encode("Hello , world ! do n't")
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, world! don't"
    assert tok.decode(ids) == " <s>Hello, world! don't"


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(PromptError, match="1009"):
        tok.decode([1, 1009])
    with pytest.raises(PromptError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ConfigError, match="<nope>"):
        tok.token_to_id("<nope>")


# ----------------------------------------------------------------------------------------- streaming
def test_stream_holds_back_incomplete_utf8(tok):
    ids = tok.encode("a好🎨", add_bos=False)
    assert [tok.id_to_piece(i) for i in ids][-7:] == [
        "<0xE5>",
        "<0xA5>",
        "<0xBD>",
        "<0xF0>",
        "<0x9F>",
        "<0x8E>",
        "<0xA8>",
    ]
    pieces, tail = _stream(tok, ids)
    assert pieces[-7:] == ["", "", "好", "", "", "", "🎨"] and tail == ""
    assert all("\ufffd" not in p for p in pieces)


def test_stream_holds_back_what_clean_up_can_change(tok):
    ids = tok.encode("Hi , there do n't", add_bos=False)
    pieces, tail = _stream(tok, ids)
    text = "".join(pieces)
    assert text + tail == "Hi, there don't"
    assert all(not p.endswith(" ") for p in pieces)


@pytest.mark.parametrize(
    "text", ["a . b ? c ! d , e ' f do n't I 'm it 's we 've you 're", "x  ' 've  n ' t ''"]
)
def test_stream_clean_up_cut_at_every_character(tok, text):
    ids = [3 + b for b in text.encode()]  # one byte piece per character: every cut point is exercised
    pieces, tail = _stream(tok, ids)
    final = tok.decode(ids, skip_special_tokens=True)
    assert final == clean_up_tokenization(text)
    for k in range(len(pieces)):
        assert final.startswith("".join(pieces[: k + 1]))
    assert "".join(pieces) + tail == final


def test_stream_invalid_bytes_are_emitted_once_final(tok):
    ids = [3 + 0xE4, tok.token_to_id("x")]  # a lone lead byte followed by a normal piece: U+FFFD stays
    pieces, tail = _stream(tok, ids)
    assert pieces == ["", "\ufffdx"] and tail == ""
    pieces, tail = _stream(tok, [3 + 0xE4])  # a sequence cut by the end of the stream is flushed as is
    assert pieces == [""] and tail == tok.decode([3 + 0xE4], skip_special_tokens=True) == "\ufffd"


def _id_pools(tok):
    sp = tok._sp
    tricky = [
        i
        for i in range(sp.get_piece_size())
        if not sp.is_byte(i) and any(ch in sp.id_to_piece(i) for ch in "\u2581.,?!'nmtsvr")
    ]
    utf8 = [
        3 + b
        for b in (
            0x20,
            0x27,
            0x2E,
            0x2C,
            0x3F,
            0x6E,
            0x74,
            0x73,
            0x76,
            0x72,
            0xC3,
            0xA9,
            0xE4,
            0xBD,
            0xA0,
            0xF0,
            0x9F,
            0x8E,
            0xA8,
            0x80,
            0xBF,
        )
    ]
    # pieces that clean_up reacts to, bytes that build (or break) multi-byte characters, specials, anything
    return [tricky, utf8, list(range(3, 259)), sorted(tok.special_ids), list(range(len(tok)))]


def _check_stream_random(tok, seed, count):
    rnd, pools = random.Random(seed), _id_pools(tok)
    for _ in range(count):
        ids = [
            rnd.choice(rnd.choices(pools, weights=[35, 30, 10, 10, 15])[0]) for _ in range(rnd.randrange(24))
        ]
        final = tok.decode(ids, skip_special_tokens=True)
        dec, out = tok.stream_decoder(), ""
        for i in ids:
            out += dec.push(i)
            assert final.startswith(out), (ids, out, final)  # never emit text that a later token changes
        assert out + dec.flush() == final, ids


def test_stream_matches_decode_on_random_ids(tok):
    _check_stream_random(tok, seed=1234, count=4000)


def test_stream_long_text_and_reuse(tok):
    text = PROBES["probes"][8]["text"] + " It 's a b c , n't we 're .\n"
    ids = tok.encode(text * 40)
    dec = tok.stream_decoder()
    for _ in range(2):  # flush() resets, so the decoder can be reused
        out = "".join(dec.push(i) for i in ids) + dec.flush()
        assert out == tok.decode(ids, skip_special_tokens=True)


def _copy_tokenizer(tmp_path) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(GOLDEN / "tokenizer", folder)
    return folder


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_non_special_added_tokens(tmp_path):
    """Legacy added tokens (not special) are kept by skip decoding and split runs joined with " "."""
    folder = _copy_tokenizer(tmp_path)

    def add(cfg):
        cfg["added_tokens_decoder"]["1009"] = {"content": "<extra>", "special": False}

    _edit_json(folder / "tokenizer_config.json", add)
    tok = Tokenizer.from_folder(folder)
    assert len(tok) == 1010 and 1009 not in tok.special_ids
    ids = tok.encode("Hello<extra>world")
    assert ids == [1, 817, 1009] + tok.encode("world", add_bos=False)
    assert tok.decode(ids, skip_special_tokens=True) == "Hello <extra> world"
    assert tok.decode([1009, 894, 1009], skip_special_tokens=True) == "<extra> <extra>"  # empty run dropped
    assert tok.decode([1009, 894], skip_special_tokens=True) == "<extra> "  # ... unless it is the last
    _check_stream_random(tok, seed=7, count=1500)


def test_added_tokens_sharing_a_prefix_match_longest(tmp_path):
    """Leftmost-longest, whatever order the files list them in: the shorter token of a shared prefix is listed
    first in one pair ("<tool>" before "<tool>call") and last in the other ("<a|b>" after "<a|b|c>")."""
    folder = _copy_tokenizer(tmp_path)

    def add(cfg):
        cfg["added_tokens_decoder"]["1009"] = {"content": "<tool>", "special": False}
        cfg["added_tokens_decoder"]["1010"] = {"content": "<tool>call", "special": False}
        cfg["added_tokens_decoder"]["1011"] = {"content": "<a|b|c>", "special": False}

    _edit_json(folder / "tokenizer_config.json", add)
    _edit_json(folder / "added_tokens.json", lambda added: added.update({"<a|b>": 1012}))
    tok = Tokenizer.from_folder(folder)
    assert len(tok) == 1013
    enc = lambda text: tok.encode(text, add_bos=False)  # noqa: E731
    assert enc("<tool>call") == [1010]
    assert enc("<tool>") == [1009]
    assert enc("<tool>cal") == [1009] + enc("cal")  # no longer token fits: the shorter one, then text
    assert enc("x<tool>callx") == enc("x") + [1010] + enc("x")
    assert enc("<tool><tool>call") == [1009, 1010]
    assert enc("<a|b|c>") == [1011] and enc("<a|b>") == [1012]
    assert enc("<a|b|c><a|b>") == [1011, 1012]
    assert enc("<a|b>|c>") == [1012] + enc("|c>")
    # the longer token also wins against a built-in one it extends
    _edit_json(folder / "added_tokens.json", lambda added: added.update({"<img>x": 1013}))
    tok2 = Tokenizer.from_folder(folder)
    assert tok2.encode("<img>x<img>", add_bos=False) == [1013, 1000]


# ----------------------------------------------------------------------------------------- errors
def test_missing_or_corrupt_model(tmp_path):
    folder = _copy_tokenizer(tmp_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="tokenizer.model.*missing"):
        Tokenizer.from_folder(folder)
    (folder / "tokenizer.model").write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match="tokenizer.model.*SentencePiece"):
        Tokenizer.from_folder(folder)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"])
def test_malformed_json(tmp_path, name):
    folder = _copy_tokenizer(tmp_path)
    (folder / name).write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=name):
        Tokenizer.from_folder(folder)


def test_missing_tokenizer_config(tmp_path):
    folder = _copy_tokenizer(tmp_path)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer_config.json.*missing"):
        Tokenizer.from_folder(folder)


def _set(key, value):
    def edit(cfg):
        cfg["added_tokens_decoder"][key] = value

    return edit


@pytest.mark.parametrize(
    "file,edit,match",
    [
        ("tokenizer_config.json", _set("x", {"content": "<a>"}), "integer id"),
        ("tokenizer_config.json", _set("\u00b2", {"content": "<a>"}), "integer id"),  # '²'.isdigit()
        ("tokenizer_config.json", _set("9" * 5000, {"content": "<a>"}), "at most 9 digits"),
        ("tokenizer_config.json", _set("1009", "<a>"), "AddedToken"),
        ("tokenizer_config.json", _set("1009", {"content": ""}), "non-empty"),
        ("tokenizer_config.json", _set("1009", {"content": "<img>"}), "two ids"),
        ("tokenizer_config.json", _set("1010", {"content": "<gap>"}), "contiguous"),
        ("tokenizer_config.json", lambda c: c.update(added_tokens_decoder=[]), "must be an object"),
        ("added_tokens.json", lambda c: c.update({"<img>": 1005}), "id 1005 is '<ref>'"),
        ("added_tokens.json", lambda c: c.update({"<new>": -3}), "non-negative"),
        ("special_tokens_map.json", lambda c: c.update(bos_token="<nope>"), "<nope>"),
        ("special_tokens_map.json", lambda c: c.update(additional_special_tokens="<img>"), "must be a list"),
    ],
)
def test_inconsistent_added_tokens(tmp_path, file, edit, match):
    folder = _copy_tokenizer(tmp_path)
    _edit_json(folder / file, edit)
    with pytest.raises(ConfigError, match=match):
        Tokenizer.from_folder(folder)
