"""Seeded hostile traffic for ``pyvl serve``: each request a raw HTTP/1.1 exchange over its own socket.

:func:`requests` yields ``count`` requests drawn with one seed from the classes in ``CLASSES`` (malformed bodies,
nesting and numbers that break parsers, every field with a wrong type, URLs and paths an OS call chokes on,
sampling values where the math breaks, sizes that cost time or memory before they are refused, clients that
disconnect mid-body or half-close). :func:`send` runs one and reports what came back: a status, or how the
exchange failed (``"reset"``, ``"refused"``, ``"timeout"``, ``"no answer"``). Everything is plain bytes on a socket, so the test
sees what the server sends, not what a client library makes of it.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from functools import cache

from PIL import Image

__all__ = ["CLASSES", "Exchange", "Hostile", "requests", "send"]

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Hostile:
    kind: str  # the class it was drawn from
    what: str  # a short description, for failure messages
    path: str
    body: bytes
    declared_length: int | None = None  # a Content-Length other than len(body): a client that goes away
    half_close: bool = False  # shut the write side after the request, then read the answer
    content_type: str = "application/json"
    expect_answer: bool = True  # False: the client leaves before the server could answer


@dataclass(frozen=True)
class Exchange:
    status: int | None  # None: no status line came back
    failure: str | None  # "reset", "refused", "timeout", "no answer" or None
    body: bytes
    seconds: float


def _json(value) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


def _chat(messages=None, **fields) -> dict:
    body = {"model": "demo", "messages": messages or [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    body.update(fields)
    return body


def _image_message(url: str, **part) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": url, **part}}
    return [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]


@cache
def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 160, 30)).save(buf, "PNG")
    return buf.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose data is a few bytes: refused from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _nested(depth: int, rng: random.Random) -> str:
    """JSON text of arrays and objects nested ``depth`` deep (as text: json.dumps itself recurses)."""
    opens = [rng.choice(("[", '{"a":')) for _ in range(depth)]
    return "".join(opens) + '"x"' + "".join("]" if o == "[" else "}" for o in reversed(opens))


def _with_field(body: dict, field: str, json_text: str) -> bytes:
    """``body`` as JSON with ``field`` set to the raw ``json_text``."""
    return (_json(body)[:-1].decode() + f', "{field}": {json_text}}}').encode()


WRONG_VALUES = [
    {},
    [],
    [[]],
    "x",
    "",
    -1,
    0,
    1.5,
    1e308,
    -1e308,
    True,
    None,
    "9" * 300,
    {"a": [1, {"b": None}]},
]
FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "max_dynamic_patch",
]


def _malformed_body(rng: random.Random) -> Hostile:
    bodies = [
        b"",
        b"{",
        b'{"model": "demo", "messages": [',
        b"\xff\xfe\x00garbage",
        b"\xef\xbb\xbf" + _json(_chat()),
        b"[]",
        b"42",
        b'"a string"',
        b"null",
        b'{"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": NaN}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}',
        b'{"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "temperature": 1e999}',
        b'{"model": "demo", "model": "demo", "messages": 1}',
        _json(_chat())[:-1] + b"  ,}",
    ]
    body = rng.choice(bodies)
    content_type = rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])
    return Hostile("body", f"body {body[:40]!r} as {content_type}", CHAT, body, content_type=content_type)


def _deep(rng: random.Random) -> Hostile:
    depth = rng.choice([100, 1000, 10_000, 100_000])
    field = rng.choice(["messages", "stop", "logit_bias", "response_format", "tools", "extra"])
    body = _chat()
    body.pop(field, None)
    return Hostile(
        "deep", f"{field} nested {depth} deep", CHAT, _with_field(body, field, _nested(depth, rng))
    )


def _big_int(rng: random.Random) -> Hostile:
    field = rng.choice(["max_tokens", "seed", "n", "top_k", "temperature", "top_logprobs", "logit_bias"])
    digits = rng.choice([20, 400, 5000, 50_000])
    number = "9" * digits
    body = _json(_chat()).decode()
    if field == "logit_bias":
        key = rng.choice([number, "\\u00b2", "\\u0663"])  # '²' and Arabic-Indic 3 pass str.isdigit()
        text = body[:-1] + f', "logit_bias": {{"{key}": 1}}}}'
    else:
        text = body[:-1] + f', "{field}": -{number}}}'
    return Hostile("big_int", f"{field} with {digits} digits", CHAT, text.encode())


def _wrong_type(rng: random.Random) -> Hostile:
    field = rng.choice(FIELDS)
    value = rng.choice(WRONG_VALUES)
    body = _chat(**{field: value})
    where = rng.random()
    if where < 0.3:  # inside a message instead
        key = rng.choice(["role", "content", "name", "tool_calls"])
        body["messages"] = [{"role": "user", "content": "Hi", key: value}]
    elif where < 0.45:
        body["messages"] = [
            {"role": "user", "content": [{"type": rng.choice(["text", "image_url", "x"]), "text": value}]}
        ]
    return Hostile("wrong_type", f"{field} = {json.dumps(value)[:40]}", CHAT, _json(body))


def _detail(rng: random.Random) -> Hostile:
    detail = rng.choice([{}, [], 5, None, "huge", "\u0000", {"low": 1}])
    body = _chat(_image_message(_data_url(_png(64, 48)), detail=detail))
    return Hostile("detail", f"detail = {detail!r}", CHAT, _json(body))


def _bad_url(rng: random.Random) -> Hostile:
    urls = [
        "http://[::1:80/x.png",
        "http://host:99999/x.png",
        "http://exa\u0000mple.com/x.png",
        "/images/a\u0000b.png",
        "/images/\ud800.png",
        "http://\udfff/x.png",
        "http://" + "a" * 64 + ".com/x.png",
        "file:///etc/passwd",
        "file:///%00",
        "//host/x.png",
        "ftp://host/x.png",
        "http://",
        "data:",
        "data:image/png;base64,!!!!",
        "data:image/png,rawbytes",
        "../" * rng.choice([10, 10_000, 1_700_000]) + "etc/passwd",
        "C:\\Windows\\win.ini",
        "",
    ]
    url = rng.choice(urls)
    body = _json(_chat(_image_message(url)))
    return Hostile("bad_url", f"url {url[:40]!r} ({len(url)} chars)", CHAT, body)


def _sampling(rng: random.Random) -> Hostile:
    values = {
        "temperature": [1e-43, 5e-324, 1e-30, -0.0, 1e-8, 2.0000001, 1e30],
        "top_p": [1e-45, 5e-324, 0.0, 1.0000001, -0.1],
        "top_k": [-5, 0, 1, 2**31, 2**63],
        "repetition_penalty": [0.0, 1e-40, -1.0, 1e40],
        "max_tokens": [0, -1, 2**31, 2**63, 1],
        "seed": [-1, 2**64, 2**63 - 1],
        "n": [0, -1, 129, 2],
        "presence_penalty": [-2.0000001, 5, 2],
        "frequency_penalty": [-5, 2.5, 0],
        "top_logprobs": [50, -1, 21, 0],
    }
    field = rng.choice(sorted(values))
    value = rng.choice(values[field])
    return Hostile(
        "sampling",
        f"{field} = {value!r}",
        CHAT,
        _json(_chat(**{field: value, "temperature": 1.0} if field != "temperature" else {field: value})),
    )


def _long_prompt(rng: random.Random) -> Hostile:
    text = "word " * rng.choice([200_000, 1_000_000])
    body = _json(_chat([{"role": "user", "content": text}]))
    return Hostile("long_prompt", f"a {len(text)}-character prompt", CHAT, body)


def _many_parts(rng: random.Random) -> Hostile:
    parts = [{"type": "text", "text": "a"}] * rng.choice([1000, 20_000])
    body = _json(_chat([{"role": "user", "content": parts}]))
    return Hostile("many_parts", f"{len(parts)} content parts", CHAT, body)


def _many_messages(rng: random.Random) -> Hostile:
    roles = ["user", "assistant"]
    messages = [{"role": rng.choice(roles), "content": "a"} for _ in range(rng.choice([1000, 20_000]))]
    return Hostile("many_messages", f"{len(messages)} messages", CHAT, _json(_chat(messages)))


def _many_stops(rng: random.Random) -> Hostile:
    stop = ["x" * rng.choice([1, 100])] * rng.choice([5, 1000, 10_000])
    return Hostile("many_stops", f"{len(stop)} stop strings", CHAT, _json(_chat(stop=stop)))


def _many_images(rng: random.Random) -> Hostile:
    image = _data_url(_png(32, 32))
    parts = [{"type": "image_url", "image_url": {"url": image}}] * rng.choice([2, 41, 200])
    body = _json(_chat([{"role": "user", "content": parts}]))
    return Hostile("many_images", f"{len(parts)} images", CHAT, body)


def _image_bomb(rng: random.Random) -> Hostile:
    width, height = rng.choice([(100_000, 100_000), (60_000, 60_000), (1, 10_000_000), (9000, 9000)])
    image = _data_url(_png_header_claiming(width, height))
    body = _json(_chat(_image_message(image)))
    return Hostile("image_bomb", f"a PNG header claiming {width}x{height}", CHAT, body)


def _big_image(rng: random.Random) -> Hostile:
    side = rng.choice([8000, 9000])
    image = _data_url(_png(side, side))
    return Hostile("big_image", f"a real {side}x{side} PNG", CHAT, _json(_chat(_image_message(image))))


def _disconnect(rng: random.Random) -> Hostile:
    body = _json(_chat())
    cut = rng.randrange(0, len(body))
    return Hostile(
        "disconnect",
        f"leaves after {cut} of {len(body)} bytes",
        CHAT,
        body[:cut],
        declared_length=len(body),
        expect_answer=False,
    )


def _half_close(rng: random.Random) -> Hostile:
    body = _chat(stream=rng.random() < 0.5)
    return Hostile(
        "half_close",
        f"half-closes after a valid request (stream={body['stream']})",
        CHAT,
        _json(body),
        half_close=True,
    )


def _other_routes(rng: random.Random) -> Hostile:
    path = rng.choice(
        [
            "/v1/completions",
            "/tokenize",
            "/detokenize",
            "/v1/models",
            "/v1/chat/completions/x",
            "/%00",
            "/v1/../v1/models",
        ]
    )
    bodies = [_with_field({"model": "demo"}, "prompt", _nested(5000, rng))]
    bodies += [_json(b) for b in ({"prompt": "a" * 10}, {"tokens": [-1, 2**40]}, {"tokens": "x"}, {})]
    body = rng.choice(bodies)
    return Hostile("routes", f"{path} with a hostile body", path, body)


CLASSES = {
    "body": _malformed_body,
    "deep": _deep,
    "big_int": _big_int,
    "wrong_type": _wrong_type,
    "detail": _detail,
    "bad_url": _bad_url,
    "sampling": _sampling,
    "long_prompt": _long_prompt,
    "many_parts": _many_parts,
    "many_messages": _many_messages,
    "many_stops": _many_stops,
    "many_images": _many_images,
    "image_bomb": _image_bomb,
    "big_image": _big_image,
    "disconnect": _disconnect,
    "half_close": _half_close,
    "routes": _other_routes,
}


def requests(count: int, seed: int) -> list[Hostile]:
    """``count`` requests, the classes in turn (so every class is drawn), each drawn with one seeded generator."""
    rng = random.Random(seed)
    makers = list(CLASSES.values())
    return [makers[i % len(makers)](rng) for i in range(count)]


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    data = bytearray()
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def send(port: int, request: Hostile, api_key: str, timeout_s: float) -> Exchange:
    """Run one exchange on a fresh connection (``Connection: close``); the answer is read until the server closes."""
    length = request.declared_length if request.declared_length is not None else len(request.body)
    head = (
        f"POST {request.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: {request.content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(head.encode() + request.body)
            if not request.expect_answer:
                return Exchange(None, None, b"", time.monotonic() - start)
            if request.half_close:
                sock.shutdown(socket.SHUT_WR)
            raw = _read_all(sock, start + timeout_s)
    except TimeoutError:
        return Exchange(None, "timeout", b"", time.monotonic() - start)
    except (ConnectionResetError, BrokenPipeError):
        return Exchange(None, "reset", b"", time.monotonic() - start)
    except ConnectionRefusedError:
        return Exchange(None, "refused", b"", time.monotonic() - start)
    seconds = time.monotonic() - start
    head_end = raw.find(b"\r\n\r\n")
    if not raw.startswith(b"HTTP/1.1 ") or head_end < 0:
        return Exchange(None, "no answer", raw[:200], seconds)
    status = int(raw[9:12])
    body = raw[head_end + 4 :]
    if b"transfer-encoding: chunked" in raw[:head_end].lower():
        body = _unchunk(body)
    return Exchange(status, None, body, seconds)


def _unchunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out)
        size = int(data[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += data[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
