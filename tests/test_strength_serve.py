"""The server's contracts that a second round of planted bugs (issue 19) got past, checked as general
properties where one exists: a streamed answer equals the whole one (text, logprobs, text offsets, echo,
finish reasons, one end per choice) for chat and completions, batched or not; an error after the stream
started is an event, then ``[DONE]``, and no usage; every API path takes the key and refuses without it, and
every path refuses while shutting down; the body, queue, prompt-batch, vocabulary, max_dynamic_patch and
integer-digit limits take their limit and refuse one past; a batched completion with one bad prompt stops the
others; /tokenize, /detokenize, /v1/models and /health answer in full; conversations become the template's
turns exactly; metrics count every choice under vLLM's reason names; every logprob is finite JSON; an image
url's answer is the image only when it is a 200; hosts and local paths are refused as the policy says. The app
runs in process (starlette's TestClient) on the demo model; media are read through ``read_image_source`` (a
loopback http server standing for the internet)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import math
import socket
import threading
import urllib.parse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from PIL import Image  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402
from test_serve_strength import PARAM, _read, _refused  # noqa: E402

import pyvl  # noqa: E402
from pyvl.demo import demo_model_path  # noqa: E402
from pyvl.errors import PromptError  # noqa: E402
from pyvl.image import MAX_TILES  # noqa: E402
from pyvl.results import TokenLogprob, TopLogprob  # noqa: E402
from pyvl.serve import json_body, media  # noqa: E402
from pyvl.serve.app import ServeSettings, create_app  # noqa: E402
from pyvl.serve.completions import (  # noqa: E402
    MAX_PROMPTS,
    CompletionCall,
    CompletionShape,
    parse_completion_request,
)
from pyvl.serve.errors import APIError  # noqa: E402
from pyvl.serve.generation import Generation  # noqa: E402
from pyvl.serve.media import MediaPolicy  # noqa: E402
from pyvl.serve.params import Limits  # noqa: E402
from pyvl.serve.protocol import ChatShape, chat_logprobs, conversation, parse_chat_request  # noqa: E402
from pyvl.serve.responses import MIN_LOGPROB  # noqa: E402
from pyvl.serve.tools import plan_tools  # noqa: E402

KEY = "strength-key"
NAME = "demo"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Describe the sea."}], "temperature": 0}
STORY = "The lighthouse keeper opened the door and"  # the demo model does not stop within 16 tokens of it


@pytest.fixture(scope="module")
def model():
    m = pyvl.load(demo_model_path(), device="cpu")
    yield m
    m.close()


def _app(model, **settings):
    return create_app(model, ServeSettings(served_model_name=NAME, api_key=KEY, **settings))


@pytest.fixture(scope="module")
def client(model):
    return TestClient(_app(model), headers=AUTH)


def _events(response) -> list:
    """The SSE events of a stream: JSON objects, and the final "[DONE]"."""
    assert response.status_code == 200, response.text
    payloads = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def _error(response, status: int, param=None, code=None) -> dict:
    """The response is the full OpenAI error envelope with this status, param and code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert (error["param"], error["code"]) == (param, code), error
    return error


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def _in_flight(client) -> int:
    return client.get("/health").json()["requests_in_flight"]


# ---- streamed == whole -------------------------------------------------------------------------------------
def _chat_stream_by_choice(events, n: int):
    """Each choice's text, logprob entries and finish reasons, from chat chunks."""
    text, logprobs, reasons = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
    for event in events:
        for c in event["choices"]:
            text[c["index"]] += c["delta"].get("content") or ""
            logprobs[c["index"]] += (c["logprobs"] or {"content": []})["content"]
            if c["finish_reason"]:
                reasons[c["index"]].append(c["finish_reason"])
    return text, logprobs, reasons


def _same_entries(got: list[dict], expected: list[dict]) -> None:
    """Chat logprob entries alike up to float noise (a stream that hits the prefix cache computes the prompt's
    K/V in other chunks)."""
    assert [(e["token"], e["bytes"]) for e in got] == [(e["token"], e["bytes"]) for e in expected]
    assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in expected], abs=1e-4)
    for a, b in zip(got, expected):
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]


def test_a_streamed_chat_answer_equals_the_whole_one_for_every_choice(client):
    """n choices with logprobs, streamed with include_usage: each choice's text and logprob entries are the
    whole response's, each ends exactly once with its reason, every chunk carries "usage": null, then one
    usage chunk (no choices) whose counts are the whole response's, then [DONE]; nothing stays in flight. The
    whole response's content-length is its body's length in bytes (the answer is not ASCII)."""
    body = CHAT | {"max_tokens": 7, "n": 3, "logprobs": True, "top_logprobs": 2}
    reply = client.post("/v1/chat/completions", json=body)
    assert int(reply.headers["content-length"]) == len(reply.content) and not reply.content.isascii()
    whole = reply.json()
    events = _events(
        client.post(
            "/v1/chat/completions", json=body | {"stream": True, "stream_options": {"include_usage": True}}
        )
    )
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage["usage"][field] == whole["usage"][field]
    assert all(c["usage"] is None and c["id"] == usage["id"] for c in chunks)
    text, logprobs, reasons = _chat_stream_by_choice(chunks, 3)
    for k in range(3):  # each choice opens with the assistant's role
        first = next(c for chunk in chunks for c in chunk["choices"] if c["index"] == k)
        assert first["delta"] == {"role": "assistant", "content": ""}
    assert sorted(c["index"] for c in whole["choices"]) == [0, 1, 2]
    for c in whole["choices"]:
        k = c["index"]
        assert text[k] == c["message"]["content"]
        _same_entries(logprobs[k], c["logprobs"]["content"])
        assert reasons[k] == [c["finish_reason"]] == ["length"]
        assert len(c["logprobs"]["content"]) == 7
    assert _in_flight(client) == 0


def test_whole_usage_adds_up(client):
    """total_tokens is prompt plus completion tokens, also when part of the prompt came from the prefix
    cache."""
    body = CHAT | {"max_tokens": 3, "messages": [{"role": "user", "content": "Count the waves, " * 20}]}
    first, again = (client.post("/v1/chat/completions", json=body).json()["usage"] for _ in range(2))
    assert again["prompt_tokens_details"]["cached_tokens"] > 0
    for usage in (first, again):
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def _completion_stream_by_choice(events):
    text, offsets, tokens, reasons = {}, {}, {}, {}
    for event in events:
        for c in event["choices"]:
            k = c["index"]
            text[k] = text.get(k, "") + c["text"]
            if c["logprobs"]:
                offsets.setdefault(k, []).extend(c["logprobs"]["text_offset"])
                tokens.setdefault(k, []).extend(c["logprobs"]["tokens"])
            if c["finish_reason"]:
                reasons.setdefault(k, []).append(c["finish_reason"])
    return text, offsets, tokens, reasons


def test_a_streamed_batched_echoed_completion_equals_the_whole_one(client):
    """Two prompts, two choices each, echoed: choice i*n+j starts with prompt i, streamed or not, and the
    streamed text of each choice is the whole response's."""
    prompts = ["Alpha beta", "Gamma"]
    body = {"model": NAME, "prompt": prompts, "n": 2, "max_tokens": 5, "temperature": 0, "echo": True}
    whole = {c["index"]: c for c in client.post("/v1/completions", json=body).json()["choices"]}
    assert sorted(whole) == [0, 1, 2, 3]
    text, _, _, reasons = _completion_stream_by_choice(
        _events(client.post("/v1/completions", json=body | {"stream": True}))[:-1]
    )
    for k, c in whole.items():
        assert c["text"].startswith(prompts[k // 2]) and len(c["text"]) > len(prompts[k // 2])
        assert text[k] == c["text"] and reasons[k] == [c["finish_reason"]]


def test_completion_logprobs_offsets_run_over_the_text_streamed_or_not(client):
    """text_offset[k] is where token k starts in the choice's text (the sum of the earlier tokens' lengths),
    in the whole response and across the pieces of a stream alike."""
    body = {"model": NAME, "prompt": STORY, "max_tokens": 9, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = whole["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 9
    starts = [sum(len(t) for t in lp["tokens"][:k]) for k in range(9)]
    assert lp["text_offset"] == starts
    text, offsets, tokens, _ = _completion_stream_by_choice(
        _events(client.post("/v1/completions", json=body | {"stream": True}))[:-1]
    )
    assert (text[0], offsets[0], tokens[0]) == (whole["text"], starts, lp["tokens"])
    none_top = client.post("/v1/completions", json=body | {"logprobs": 0}).json()["choices"][0]["logprobs"]
    assert none_top["tokens"] == lp["tokens"] and none_top["top_logprobs"] == [{}] * 9  # logprobs=0 is asked


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT | {"n": 2, "max_tokens": 3}),
        ("/v1/completions", {"model": NAME, "prompt": ["Alpha", "Beta"], "max_tokens": 3, "temperature": 0}),
    ],
    ids=["chat", "completions"],
)
def test_a_stream_has_usage_only_when_asked(client, path, body):
    """Without stream_options.include_usage no chunk carries usage and none comes without choices."""
    events = _events(client.post(path, json=body | {"stream": True}))
    assert events[-1] == "[DONE]"
    assert all(e.get("usage") is None and e["choices"] for e in events[:-1])
    asked = _events(
        client.post(path, json=body | {"stream": True, "stream_options": {"include_usage": True}})
    )
    assert asked[-2]["choices"] == [] and asked[-2]["usage"]["completion_tokens"] == 6


def test_a_completion_stops_at_a_stop_string_streamed_or_not(client):
    """The text ends before the first occurrence of the stop string, with finish_reason "stop", whole or
    streamed."""
    body = {"model": NAME, "prompt": STORY, "max_tokens": 12, "temperature": 0}
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip() and free.index(stop) > 0
    whole = client.post("/v1/completions", json=body | {"stop": [stop]}).json()["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (free[: free.index(stop)], "stop")
    text, _, _, reasons = _completion_stream_by_choice(
        _events(client.post("/v1/completions", json=body | {"stop": stop, "stream": True}))[:-1]
    )
    assert (text[0], reasons[0]) == (whole["text"], ["stop"])


def test_a_completion_without_max_tokens_gets_sixteen(client):
    """OpenAI's default max_tokens for /v1/completions is 16 (the demo model does not stop before)."""
    reply = client.post("/v1/completions", json={"model": NAME, "prompt": STORY, "temperature": 0}).json()
    assert reply["usage"]["completion_tokens"] == 16 and reply["choices"][0]["finish_reason"] == "length"


# ---- errors after the start --------------------------------------------------------------------------------
def _fail_after_first_delta(monkeypatch) -> None:
    """From now on every choice's events end with a client error (a PyvlError) right after its first piece of
    text."""
    real = Generation.events

    async def events(self):
        async for event in real(self):
            yield event
            if event[0] == "delta":
                yield "error", PromptError("planted failure after the first piece")
                return

    monkeypatch.setattr(Generation, "events", events)


@pytest.fixture
def fails_after_first_delta(monkeypatch):
    _fail_after_first_delta(monkeypatch)


def test_an_error_after_the_stream_started_is_an_event_then_done_and_no_usage(
    client, fails_after_first_delta
):
    """Once the headers are out, an error is one ``data: {"error": ...}`` event followed by [DONE]: no usage
    chunk (the request did not complete) and no finish_reason; a whole response is the plain 400."""
    body = CHAT | {"max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
    events = _events(client.post("/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert (error["code"], error["type"]) == ("invalid_prompt", "invalid_request_error")
    assert "after the first piece" in error["message"]
    chunks = events[:-2]
    assert chunks and all("error" not in c and c["choices"] for c in chunks)
    assert not any(c["finish_reason"] for chunk in chunks for c in chunk["choices"])
    _error(client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 12}), 400, code="invalid_prompt")
    assert _in_flight(client) == 0


# ---- keys, shutdown, queue, body size ----------------------------------------------------------------------
ENDPOINTS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT | {"max_tokens": 1}),
    ("POST", "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 1}),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=[p for _, p, _ in ENDPOINTS])
def test_every_api_path_needs_the_key(client, method, path, body):
    """No key or a wrong one is a 401 on every API path; the scheme is case-insensitive (RFC 7235)."""
    bare = TestClient(client.app)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = bare.request(method, path, json=body, headers=headers)
        assert _error(r, 401, code="invalid_api_key")["type"] == "authentication_error"
    assert (
        bare.request(method, path, json=body, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    )
    assert bare.get("/health").status_code == 200 and bare.get("/metrics").status_code == 200


def test_models_and_health_answer_in_full(model, client):
    """Every field of /v1/models' entry (vLLM's max_model_len included) and of /health."""
    assert client.get("/v1/models").json() == {
        "object": "list",
        "data": [
            {
                "id": NAME,
                "object": "model",
                "created": 0,
                "owned_by": "pyvl",
                "max_model_len": model.max_context,
            }
        ],
    }
    health = client.get("/health").json()
    assert set(health) == {"status", "model", "requests_in_flight", "kv_blocks_in_use", "kv_blocks_cached"}
    assert (health["status"], health["model"], health["requests_in_flight"]) == ("ok", NAME, 0)


def test_a_shutting_down_server_refuses_every_path(model):
    """After begin_shutdown every API path is a 503 and /health says so with a 503 (load balancers read the
    status, not the body)."""
    app = _app(model)
    client = TestClient(app, headers=AUTH)
    app.state.serve.begin_shutdown()
    for method, path, body in ENDPOINTS[1:]:
        _error(client.request(method, path, json=body), 503, code="server_shutting_down")
    health = client.get("/health")
    assert (health.status_code, health.json()["status"]) == (503, "shutting_down")
    error = client.post("/v1/chat/completions", json=CHAT).json()["error"]
    assert error["type"] == "service_unavailable"


def test_errors_outside_the_endpoints_are_openai_envelopes(client):
    """Another model's name is a not_found_error naming 'model'; an unknown path says so; a wrong method says
    what starlette says."""
    wrong_model = client.post("/v1/chat/completions", json=CHAT | {"model": "gpt-4o"})
    assert _error(wrong_model, 404, "model", "model_not_found")["type"] == "not_found_error"
    nowhere = _error(client.get("/v1/nowhere"), 404)
    assert (nowhere["message"], nowhere["type"]) == ("no such path", "not_found_error")
    assert _error(client.get("/v1/chat/completions"), 405)["message"] == "Method Not Allowed"


def test_the_queue_limit_is_exact(model):
    """With max_queue=2 and one response live, a request is served; with two live it is a 503."""
    app = _app(model, max_queue=2)
    client, live = TestClient(app, headers=AUTH), app.state.serve.live
    live.add("a response being sent")
    assert client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 1}).status_code == 200
    assert live == {"a response being sent"}  # the finished response left the set
    live.add("another")
    _error(client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 1}), 503, code="queue_full")


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_refused(model):
    """The body cap, whether the client declares the length or streams the body chunked."""
    limit = 2000
    client = TestClient(
        _app(model, max_request_bytes=limit), headers=AUTH | {"Content-Type": "application/json"}
    )
    body = json.dumps(CHAT | {"max_tokens": 1}).encode()
    at_limit = body[:-1] + b" " * (limit - len(body)) + b"}"
    assert len(at_limit) == limit
    for content in (at_limit, iter([at_limit[:1000], at_limit[1000:]])):  # an iterator goes chunked
        r = client.post("/v1/chat/completions", content=content)
        assert r.status_code == 200, r.text
    over = at_limit[:-1] + b" }"
    for content in (over, iter([over[:1000], over[1000:]])):
        error = _error(client.post("/v1/chat/completions", content=content), 413, code="request_too_large")
        assert error["type"] == "invalid_request_error"


# ---- completions -------------------------------------------------------------------------------------------
def test_a_batched_completion_with_one_bad_prompt_stops_the_others(model, client, monkeypatch):
    """The second prompt fills the whole context (refused by the model at submit): the 400 names it, and the
    first prompt's choices, already submitted, are cancelled rather than left running."""
    submitted = []
    real = model.submit_choices

    def submit_choices(*args, **kwargs):
        requests = real(*args, **kwargs)
        submitted.extend(requests)
        return requests

    monkeypatch.setattr(model, "submit_choices", submit_choices)
    body = {"model": NAME, "prompt": [[5, 6, 7], [5] * model.max_context], "n": 2, "max_tokens": 3000}
    _error(client.post("/v1/completions", json=body), 400, "prompt", "invalid_prompt")
    assert len(submitted) == 2 and all(r.cancelled.is_set() for r in submitted)


def test_completion_prompt_limits_are_exact(model):
    """Up to MAX_PROMPTS prompts, and token ids up to vocab_size - 1."""
    limits = create_app(model, ServeSettings(served_model_name=NAME)).state.serve.limits
    vocab = model.config.llm.vocab_size

    def parse(prompt):
        return parse_completion_request({"model": NAME, "prompt": prompt}, limits, model.tokenizer, (2,))

    assert len(parse([[1]] * MAX_PROMPTS).prompts) == MAX_PROMPTS
    assert parse([vocab - 1]).prompts == [[vocab - 1]]
    for prompt, param in (
        ([[1]] * (MAX_PROMPTS + 1), "prompt"),
        ([vocab], "prompt[0]"),
        ([[1], [vocab]], "prompt[1]"),
        ([True, False], "prompt[0]"),  # booleans are not token ids
    ):
        with pytest.raises(APIError) as info:
            parse(prompt)
        assert (info.value.status, info.value.param) == (400, param)


def test_the_echo_of_token_ids_is_their_text_without_special_tokens(model, client):
    """Echoing an id prompt gives the raw text those ids spell (the first token's space kept); the BOS id
    spells nothing."""
    ids = model.tokenizer.encode("Alpha beta")
    assert ids[0] == model.tokenizer.bos_id
    body = {"model": NAME, "prompt": ids, "max_tokens": 2, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json=body | {"echo": True}).json()["choices"][0]["text"]
    assert echoed == " Alpha beta" + text


# ---- tokenize, detokenize ----------------------------------------------------------------------------------
def test_tokenize_and_detokenize_answer_in_full(model, client):
    """/tokenize gives no token_strs unless asked and the BOS id unless add_special_tokens is false; chat
    messages without a system message get the model's default, as /v1/chat/completions does; /detokenize takes
    ids up to the vocabulary's last."""
    ids = model.tokenizer.encode("Hello")
    assert client.post("/tokenize", json={"prompt": "Hello"}).json() == {
        "count": len(ids),
        "max_model_len": model.max_context,
        "tokens": ids,
        "token_strs": None,
    }
    bare = client.post("/tokenize", json={"prompt": "Hello", "add_special_tokens": False}).json()
    assert bare["tokens"] == ids[1:] and ids[0] == model.tokenizer.bos_id
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == model.prompt("Hi", []).ids and chat["count"] == len(chat["tokens"])
    last = len(model.tokenizer) - 1
    assert client.post("/detokenize", json={"tokens": [last]}).json() == {
        "prompt": model.tokenizer.decode([last])
    }
    _error(client.post("/detokenize", json={"tokens": [last + 1]}), 400, "tokens")


def test_detail_and_max_dynamic_patch_set_an_images_tiles(model, client):
    """/tokenize of a message with an image counts that image's tiles as its detail or max_dynamic_patch
    says: the ids are the model's prompt of the image tiled with that budget."""
    data = _png(900, 700)  # grids 3x2, 4x3 and 1x1 at 6, 12 and 1 tiles
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    counts = set()
    for spec, budget in (({"detail": "low"}, 6), ({"detail": "medium"}, 12), ({"max_dynamic_patch": 1}, 1)):
        content = [
            {"type": "image_url", "image_url": {"url": url, **spec}},
            {"type": "text", "text": "What?"},
        ]
        got = client.post("/tokenize", json={"messages": [{"role": "user", "content": content}]}).json()
        source = model.prompts.image(data, max_num=budget)
        assert (
            got["tokens"] == model.prompts.build("<image>\nWhat?", [source], None, model.system_message).ids
        )
        counts.add(got["count"])
    assert len(counts) == 3


# ---- conversations -----------------------------------------------------------------------------------------
def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_conversation_becomes_the_templates_turns_exactly():
    """Every system message kept (in order), consecutive same-role messages merged with a newline, text parts
    joined with a newline, every user/assistant pair in the history, and multi-image labels counted over the
    whole conversation."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, _image("a"), _image("b")]},
        {"role": "user", "content": "Which is red?"},
        {"role": "assistant", "content": "The first."},
        {
            "role": "user",
            "content": [
                _image("c"),
                _image("d"),
                {"type": "text", "text": "And"},
                {"type": "text", "text": "these?"},
            ],
        },
        {"role": "assistant", "content": "Neither."},
        {"role": "user", "content": "Thanks."},
    ]
    system, history, question, images = conversation(messages)
    assert system == "Be brief.\nBe kind."
    assert history == [
        ("Image-1: <image>\nImage-2: <image>\nLook:\nWhich is red?", "The first."),
        ("Image-3: <image>\nImage-4: <image>\nAnd\nthese?", "Neither."),
    ]
    assert question == "Thanks."
    assert [i.url for i in images] == ["a", "b", "c", "d"]


def test_tool_turns_become_user_turns_and_stray_ones_are_refused():
    """An assistant's tool_calls are shown as their JSON; the tool results after them become the next user
    turn, each labelled with its call id; a tool message after a plain answer, or an image outside a user
    message, is a 400 naming the field."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"days": 2}'},
    }
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
        {"role": "tool", "content": "windy"},
    ]
    system, history, question, images = conversation(messages)
    assert history == [("Weather?", '{"name": "get_weather", "arguments": "{\\"days\\": 2}"}')]
    assert (system, question, images) == (None, "Result of tool call call_1: 12C\nTool result: windy", [])
    plain = [messages[0], {"role": "assistant", "content": "Sunny."}, messages[2]]
    image = [{"type": "image_url", "image_url": {"url": "a"}}]
    for refused, param in (
        (plain, "messages[2].role"),
        ([messages[0], {"role": "assistant", "content": image}, messages[0]], "messages[1].content[0].type"),
        ([{"role": "system", "content": image}, messages[0]], "messages[0].content[0].type"),
    ):
        with pytest.raises(APIError) as info:
            conversation(refused)
        assert (info.value.status, info.value.param) == (400, param)


def test_tools_are_described_after_the_system_message(model, client, monkeypatch):
    """The prompt's system text is the request's system message (or the model's default) and then the tools'
    instruction."""
    systems = []
    real = model.prompt

    def prompt(question, sources, history=None, system_message=None, **kwargs):
        systems.append(system_message)
        return real(question, sources, history, system_message, **kwargs)

    monkeypatch.setattr(model, "prompt", prompt)
    weather = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    body = CHAT | {"max_tokens": 1, "tools": [weather], "tool_choice": "required"}
    instruction = plan_tools(body).instruction
    own = [{"role": "system", "content": "Be brief."}] + CHAT["messages"]
    for request in (body, body | {"messages": own}):
        assert client.post("/v1/chat/completions", json=request).status_code == 200
    assert systems == [model.system_message + "\n\n" + instruction, "Be brief.\n\n" + instruction]


def test_chat_field_limits_and_combinations():
    """max_dynamic_patch takes MAX_TILES; top_logprobs needs logprobs true, not merely present, unless it is 0
    (its neutral value, which asks for nothing)."""
    limits = Limits(max_context=64, vocab_size=100, max_num_seqs=4, max_token_bytes=16)

    def parse(content=None, **fields):
        messages = [{"role": "user", "content": content or "Hi"}]
        return parse_chat_request({"model": NAME, "messages": messages, **fields}, limits)

    def patch(tiles):
        return [{"type": "image_url", "image_url": {"url": "a", "max_dynamic_patch": tiles}}]

    assert parse(patch(MAX_TILES)).images[0].max_tiles == MAX_TILES
    assert parse(logprobs=True, top_logprobs=2).generation["top_logprobs"] == 2
    for fields in ({"top_logprobs": 0}, {"logprobs": False, "top_logprobs": 0}):
        assert (parse(**fields).generation["logprobs"], parse(**fields).generation["top_logprobs"]) == (
            False,
            0,
        )
    for content, fields, param in (
        (patch(MAX_TILES + 1), {}, "messages[0].content[0].image_url.max_dynamic_patch"),
        (None, {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ):
        with pytest.raises(APIError) as info:
            parse(content, **fields)
        assert (info.value.status, info.value.param) == (400, param)


def test_a_tool_call_cut_by_the_length_limit_says_length():
    """finish_reason is "tool_calls" only for a call that completed; one cut short stays "length"."""
    weather = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    tools = plan_tools({"tools": [weather], "tool_choice": "required"})
    for stream in (False, True):
        shape = ChatShape(tools)
        for reason, expected in (("stop", "tool_calls"), ("length", "length")):
            if stream:
                got = shape.end(0, reason)[-1]["finish_reason"]
            else:
                got = shape.choice(0, "{}", None, reason)["finish_reason"]
            assert got == expected, (stream, reason)


# ---- logprobs ----------------------------------------------------------------------------------------------
def test_every_logprob_is_finite_json_with_its_bytes():
    """A token of probability zero gets OpenAI's floor of -9999, so the body is strict JSON; each chat entry
    carries its token, logprob, bytes and top_logprobs."""
    zero = TokenLogprob(5, "x", b"x", -math.inf, [TopLogprob(5, "x", b"x", -math.inf)])
    entry = chat_logprobs([zero])["content"][0]
    assert entry == {
        "token": "x",
        "logprob": MIN_LOGPROB,
        "bytes": [120],
        "top_logprobs": [{"token": "x", "logprob": MIN_LOGPROB, "bytes": [120]}],
    }
    call = CompletionCall(NAME, [[1]], [""], {"n": 1}, (), False, False, False, None)
    legacy = CompletionShape(call).choice(0, "x", [zero], "length")["logprobs"]
    assert legacy["token_logprobs"] == [MIN_LOGPROB] and legacy["top_logprobs"] == [{"x": MIN_LOGPROB}]
    json.dumps([entry, legacy], allow_nan=False)


# ---- metrics -----------------------------------------------------------------------------------------------
def _metrics(client) -> dict[str, float]:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = name.replace(f'model_name="{NAME}"', "").replace("{,", "{").replace(",}", "}")
            values[name.replace("{}", "")] = float(value)
    return values


def test_metrics_count_every_choice_and_the_cached_tokens(client, monkeypatch):
    """request_success grows by one per choice, labelled with vLLM's reason names only (a failed answer too);
    prefix-cache queries are the responses' prompt tokens and hits their cached tokens."""
    before = _metrics(client)
    body = CHAT | {"max_tokens": 2, "n": 3}
    usage = [client.post("/v1/chat/completions", json=body).json()["usage"] for _ in range(2)]
    middle = _metrics(client)
    _fail_after_first_delta(monkeypatch)
    client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 6})  # fails after its first piece
    after = _metrics(client)

    def grew(name, start=before, end=middle):
        return end.get(name, 0.0) - start.get(name, 0.0)

    assert grew('pyvl:request_success_total{finished_reason="length"}') == 6
    assert (
        grew("pyvl:time_to_first_token_seconds_count") == grew("pyvl:e2e_request_latency_seconds_count") == 2
    )
    assert grew("pyvl:request_time_per_output_token_seconds_count") == 6  # each choice's 2 tokens
    assert grew("pyvl:request_generation_tokens_sum") == grew("pyvl:generation_tokens_total") == 12
    assert grew("pyvl:request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usage)
    assert grew("pyvl:prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usage)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    assert cached > 0 and grew("pyvl:prefix_cache_hits_total") == cached
    failed = {k: grew(k, middle, after) for k in after if k.startswith("pyvl:request_success_total")}
    assert sorted(v for v in failed.values() if v) == [1.0]
    (label,) = (k for k, v in failed.items() if v)
    assert label.split('finished_reason="')[1].rstrip('"}') in ("abort", "error")


# ---- media and bodies --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answering():
    """A loopback server: /status/<code> answers that status with a body and no Location, /next/<name>
    redirects to the relative url ../<name>, /away redirects to a file: url, /<name> is an image."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            kind, _, arg = self.path.strip("/").partition("/")
            status = int(arg) if kind == "status" else 302 if kind in ("next", "away") else 200
            self.send_response(status)
            if status == 302:
                self.send_header(
                    "Location", "../" + arg if kind == "next" else "file://localhost/etc/hostname"
                )
            body = b"" if status == 304 else b"image"  # a 304 has no body
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_only_a_200_answer_is_an_image(answering):
    """A success that is not 200 (a partial 206) is refused, not taken for the image, and so is a 3xx without
    a Location (a 304), not fetched again as a redirect to itself; a relative redirect is followed from the
    url that gave it."""
    policy = MediaPolicy(allow_private_urls=True)
    assert _read(answering + "/next/img.png", policy) == b"image"
    away = _refused(answering + "/away", policy)  # every hop is held to http(s), not only the first
    assert (away.status, away.code) == (400, "unsupported_url")
    for status in (203, 206, 300, 304):
        error = _refused(f"{answering}/status/{status}", policy)
        assert (error.status, error.code) == (422, "image_fetch_failed") and str(status) in error.message


def test_a_host_is_refused_when_any_of_its_addresses_is(monkeypatch):
    """A name that resolves to a public and a private address is refused (the connection may pick either), and
    so is one whose address carries an IPv6 scope id."""
    answers = {
        "mixed.example": ["93.184.216.34", "10.0.0.7"],
        "scoped.example": ["fe80::1%2"],
        "public.example": ["93.184.216.34"],
    }

    def getaddrinfo(host, port, *args, **kwargs):
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [(family[":" in a], socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for host in ("mixed.example", "scoped.example"):
        error = _refused(f"http://{host}/x.png", MediaPolicy())
        assert (error.status, error.code) == (400, "url_not_allowed"), host
    asyncio.run(media._check_host("http://public.example/x.png", MediaPolicy(), PARAM))


@pytest.mark.parametrize("host", ["224.0.0.1", "239.255.255.250", "[ff02::1]"])
def test_multicast_hosts_are_refused(host):
    error = _refused(f"http://{host}/x.png", MediaPolicy())
    assert (error.status, error.code) == (400, "url_not_allowed")


def test_local_paths_and_file_urls_stay_inside_the_root(tmp_path):
    """A file: url is percent-decoded (a space in a name); '..' out of the root is refused however it is
    written; an unreadable file is a 422 in the OpenAI envelope's invalid_request_error type."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a b.png").write_bytes(b"spaced")
    (tmp_path / "secret.png").write_bytes(b"secret")
    policy = MediaPolicy(local_root=root.resolve())
    assert _read("file://" + urllib.parse.quote(str(root / "a b.png")), policy) == b"spaced"
    for url in ("../secret.png", str(root / ".." / "secret.png"), "file://" + str(root) + "/../secret.png"):
        error = _refused(url, policy)
        assert (error.status, error.code) == (400, "local_path_not_allowed"), url
    error = _refused("missing.png", policy)
    assert error.status == 422 and error.body()["error"]["type"] == "invalid_request_error"


def test_a_negative_integer_may_have_as_many_digits_as_a_positive_one():
    """The digit bound counts digits: a minus sign is not one."""
    digits = "9" * json_body.MAX_INT_DIGITS
    assert json_body.parse(f'{{"seed": -{digits}, "n": {digits}}}'.encode()) == {
        "seed": -int(digits),
        "n": int(digits),
    }
