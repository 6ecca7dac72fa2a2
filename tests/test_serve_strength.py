"""Server behaviour the planted-bug runs of issue 19 found unguarded: every redirect hop's host checked, the hop
and byte caps exact (http, local and data: sources), the tile cap exact, images reaching the model in the order of
the messages, usage counted once per prompt, and finish_reason after a stop string. Media are read through
``read_image_source`` against loopback http servers (127.0.0.2 standing for a refused host); the rest runs the
app in process (starlette's TestClient) on the demo model."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading

import pytest

pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import pyvl  # noqa: E402
from pyvl.demo import demo_model_path  # noqa: E402
from pyvl.serve import media  # noqa: E402
from pyvl.serve.app import ServeSettings, create_app  # noqa: E402
from pyvl.serve.errors import APIError  # noqa: E402
from pyvl.serve.media import MAX_REDIRECTS, MediaPolicy, read_image_source  # noqa: E402

PARAM = "messages[0].content[1].image_url"
CAP = 3000


def _png(width: int, height: int, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _serve(host: str, handler) -> str:
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://{host}:{server.server_address[1]}"


@pytest.fixture(scope="module")
def hosts():
    """A 'public' server on 127.0.0.1 (redirect chains, bodies of any size sent in small chunks) and a 'private'
    one on 127.0.0.2 holding an image."""
    where = {}

    class Public(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            kind, _, arg = self.path.strip("/").partition("/")
            if kind == "hops":  # /hops/<k>/<final url>: k more redirects, then the final url
                k, _, final = arg.partition("/")
                target = f"/hops/{int(k) - 1}/{final}" if int(k) > 1 else "/" + final
                if final.startswith("private"):
                    target = target if int(k) > 1 else where["private"] + "/img"
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()
            elif kind == "bytes":  # /bytes/<n>: n bytes, chunked, 500 at a time
                n = int(arg)
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, n, 500):
                    piece = b"x" * min(500, n - start)
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"public")

        def log_message(self, *args):
            pass

    class Private(Public):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"private image")

    where["public"] = _serve("127.0.0.1", Public)
    where["private"] = _serve("127.0.0.2", Private)
    return where


@pytest.fixture
def refusing(monkeypatch):
    """A policy that checks hosts, with 127.0.0.2 the one address refused (127.0.0.1 stands for the internet)."""
    monkeypatch.setattr(media, "_refused_address", lambda ip: str(ip) == "127.0.0.2")
    return MediaPolicy(max_bytes=CAP, allow_private_urls=False)


def _read(url: str, policy: MediaPolicy) -> bytes:
    return asyncio.run(read_image_source(url, policy, PARAM))


def _refused(url: str, policy: MediaPolicy) -> APIError:
    with pytest.raises(APIError) as info:
        _read(url, policy)
    assert info.value.param == PARAM
    return info.value


# ---- redirects -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hops", [0, 1, MAX_REDIRECTS])
def test_a_refused_host_is_refused_at_any_hop(hosts, refusing, hops):
    url = hosts["private"] + "/img" if hops == 0 else f"{hosts['public']}/hops/{hops}/private"
    error = _refused(url, refusing)
    assert (error.status, error.code) == (400, "url_not_allowed")


def test_exactly_max_redirects_hops_are_followed(hosts, refusing):
    assert _read(f"{hosts['public']}/hops/{MAX_REDIRECTS}/plain", refusing) == b"public"
    error = _refused(f"{hosts['public']}/hops/{MAX_REDIRECTS + 1}/plain", refusing)
    assert error.status == 422 and f"more than {MAX_REDIRECTS} times" in error.message


# ---- byte caps -------------------------------------------------------------------------------------------------
def test_the_download_cap_counts_the_whole_body(hosts, refusing):
    assert len(_read(f"{hosts['public']}/bytes/{CAP}", refusing)) == CAP
    for size in (CAP + 1, 3 * CAP):
        error = _refused(f"{hosts['public']}/bytes/{size}", refusing)
        assert (error.status, error.code) == (413, "image_too_large")


def test_a_local_file_of_exactly_the_cap_is_read(tmp_path):
    policy = MediaPolicy(max_bytes=CAP, local_root=tmp_path.resolve())
    (tmp_path / "at.png").write_bytes(b"x" * CAP)
    (tmp_path / "over.png").write_bytes(b"x" * (CAP + 1))
    assert len(_read(str(tmp_path / "at.png"), policy)) == CAP
    assert _refused(str(tmp_path / "over.png"), policy).code == "image_too_large"


@pytest.mark.parametrize("size", [CAP - 2, CAP - 1, CAP])
def test_a_data_url_of_up_to_the_cap_is_read_and_one_byte_more_refused(size):
    policy = MediaPolicy(max_bytes=size)
    assert _read(_data_url(b"y" * size), policy) == b"y" * size
    over = MediaPolicy(max_bytes=size - 1)
    assert _refused(_data_url(b"y" * size), over).code == "image_too_large"


# ---- through the app -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return pyvl.load(demo_model_path(), device="cpu")


def _client(model, **settings) -> TestClient:
    return TestClient(create_app(model, ServeSettings(served_model_name="demo", **settings)))


def _chat(client, messages, **kw):
    body = dict(model="demo", messages=messages, temperature=0, max_tokens=kw.pop("max_tokens", 4), **kw)
    return client.post("/v1/chat/completions", json=body)


def _image(url: str, detail: str = "low") -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


RED, BLUE, GREEN = _png(32, 32, (200, 0, 0)), _png(48, 32, (0, 0, 200)), _png(32, 48, (0, 200, 0))


def test_the_tile_cap_is_exact(model):
    tiles = model.prompts.image(RED, max_num=1).num_tiles
    client = _client(model, max_tiles_per_request=2 * tiles)
    two = [{"type": "text", "text": "Compare."}, _image(_data_url(RED)), _image(_data_url(BLUE))]
    for part in two[1:]:
        part["image_url"]["max_dynamic_patch"] = 1
    assert _chat(client, [{"role": "user", "content": two}]).status_code == 200
    three = two + [{"type": "image_url", "image_url": {"url": _data_url(GREEN), "max_dynamic_patch": 1}}]
    r = _chat(client, [{"role": "user", "content": three}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_tiles"


def test_images_reach_the_model_in_the_order_of_the_messages(model, monkeypatch):
    """The prompt the engine gets holds each image's tokens where its message puts it: the image digests in
    prompt order are those of the images in message order, in one message or across turns."""
    seen = []
    real = model.submit_choices

    def submit_choices(prompt, *args, **kwargs):
        seen.append([i.digest for i in sorted(prompt.images, key=lambda i: i.start)])
        return real(prompt, *args, **kwargs)

    monkeypatch.setattr(model, "submit_choices", submit_choices)
    client = _client(model)
    digest = {}
    for name, data in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        assert _chat(client, [{"role": "user", "content": [_image(_data_url(data))]}]).status_code == 200
        digest[name] = seen.pop()[0]
    assert len(set(digest.values())) == 3
    one_message = [{"type": "text", "text": "Which?"}] + [_image(_data_url(d)) for d in (BLUE, RED, GREEN)]
    assert _chat(client, [{"role": "user", "content": one_message}]).status_code == 200
    assert seen.pop() == [digest["blue"], digest["red"], digest["green"]]
    turns = [
        {"role": "user", "content": [_image(_data_url(GREEN)), {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [_image(_data_url(RED)), _image(_data_url(BLUE))]},
    ]
    assert _chat(client, turns).status_code == 200
    assert seen.pop() == [digest["green"], digest["red"], digest["blue"]]


def test_usage_counts_the_prompt_once_and_every_choice(model):
    client = _client(model)
    messages = [{"role": "user", "content": "Name three colours."}]
    one = _chat(client, messages, max_tokens=6).json()
    many = _chat(client, messages, max_tokens=6, n=3).json()
    prompt = len(model.prompt("Name three colours.", []).ids)
    assert one["usage"]["prompt_tokens"] == many["usage"]["prompt_tokens"] == prompt
    assert many["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"] == 18
    assert many["usage"]["total_tokens"] == prompt + 18


def test_finish_reason_is_stop_after_a_stop_string_and_length_at_the_limit(model):
    client = _client(model)
    messages = [{"role": "user", "content": "Tell me a story."}]
    free = _chat(client, messages, max_tokens=12).json()["choices"][0]
    assert free["finish_reason"] == "length"
    text = free["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and text.index(stop) > 0
    for stream in (False, True):
        r = _chat(client, messages, max_tokens=12, stop=[stop], stream=stream)
        if stream:
            chunks = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
            import json

            choices = [json.loads(c)["choices"][0] for c in chunks]
            got = "".join(c["delta"].get("content") or "" for c in choices)
            reason = [c["finish_reason"] for c in choices if c["finish_reason"]]
            assert reason == ["stop"], stream
        else:
            choice = r.json()["choices"][0]
            got, reason = choice["message"]["content"], choice["finish_reason"]
            assert reason == "stop"
        assert got == text[: text.index(stop)]
