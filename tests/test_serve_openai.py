"""The whole OpenAI surface of `pyvl serve` through the official openai client (httpx for /metrics, /tokenize):
logprobs against the model's own logits, n choices, structured output, tools, logit_bias, penalties against a
step-by-step reference, /v1/completions against greedy continuation, /tokenize, /detokenize, /metrics, and the
400s of every new field. One server (demo model) started with the engine flags vLLM users know."""

from __future__ import annotations

import json
import re
import time
from typing import Literal

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pydantic = pytest.importorskip("pydantic")
import torch  # noqa: E402
from serve_helpers import KEY, NAME, Server  # noqa: E402

import pyvl  # noqa: E402
from pyvl.demo import demo_model_path  # noqa: E402

MAX_NUM_SEQS = 8
MAX_MODEL_LEN = 2048
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city over the next days.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "maximum": 99}, "b": {"type": "integer", "maximum": 99}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(
        tmp_path_factory.mktemp("logs"),
        "--api-key",
        KEY,
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--image-cache-gb",
        "0.5",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model():
    return pyvl.load(demo_model_path(), device="cpu", max_context=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _chat(client, question: str, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}], **kw)


def _prompt_ids(model, question: str) -> list[int]:
    return model.tokenizer.encode(model.build_query(question))


def _answer_ids(model, question: str, max_tokens: int, **settings) -> list[int]:
    result = pyvl.ChatResult()
    model.chat(None, question, dict(max_new_tokens=max_tokens, **settings), result=result)
    return [t for t in result.choices[0].token_ids if t not in model.stop_ids]


def _token_bytes(model, ids) -> list[list[int]]:
    return [list(model.tokenizer.token_bytes[t]) for t in ids]


def _raw(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


# ---- logprobs, n ------------------------------------------------------------------------------------------------
def test_logprobs_are_the_log_softmax_of_model_logits(client, model):
    question = "Describe the sea at night."
    ids = _answer_ids(model, question, 12)
    prompt = _prompt_ids(model, question)
    expected = model.logits(prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)].log_softmax(-1)
    whole = _chat(client, question, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5)
    streamed = _chat(
        client, question, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5, stream=True
    )
    streamed_entries = [
        e
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    for entries in (whole.choices[0].logprobs.content, streamed_entries):
        assert [e.bytes for e in entries] == _token_bytes(model, ids)
        for k, entry in enumerate(entries):
            assert entry.logprob == pytest.approx(float(expected[k, ids[k]]), abs=2e-4)
            values, top_ids = expected[k].topk(5)
            assert [t.bytes for t in entry.top_logprobs] == _token_bytes(model, top_ids.tolist())
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=2e-4)
    assert _chat(client, question, temperature=0, max_tokens=2).choices[0].logprobs is None


def test_sampled_logprobs_are_after_temperature_and_before_top_k_top_p(client, model):
    question, temperature = "Name a river.", 0.5
    settings = dict(do_sample=True, temperature=temperature, top_k=3, top_p=0.8, seed=5)
    ids = _answer_ids(model, question, 8, **settings)  # the same seed draws the same tokens as the server
    prompt = _prompt_ids(model, question)
    logits = model.logits(prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    expected = (logits / temperature).log_softmax(-1)
    reply = _chat(
        client,
        question,
        max_tokens=8,
        logprobs=True,
        temperature=temperature,
        top_p=0.8,
        seed=5,
        extra_body={"top_k": 3},
    )
    entries = reply.choices[0].logprobs.content
    assert [e.bytes for e in entries] == _token_bytes(model, ids)
    assert [e.logprob for e in entries] == pytest.approx(
        [float(expected[k, t]) for k, t in enumerate(ids)], abs=2e-4
    )


def test_n_greedy_choices_are_equal_and_usage_counts_every_choice(client, model):
    expected = model.chat(None, "Count the stars.", dict(max_new_tokens=10))
    reply = _chat(client, "Count the stars.", temperature=0, max_tokens=10, n=3)
    assert [c.message.content for c in reply.choices] == [expected] * 3
    assert [c.index for c in reply.choices] == [0, 1, 2]
    single = _chat(client, "Count the stars.", temperature=0, max_tokens=10)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert reply.usage.completion_tokens == 3 * single.usage.completion_tokens
    chunks = list(_chat(client, "Count the stars.", temperature=0, max_tokens=10, n=3, stream=True))
    texts = {
        i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
        for i in range(3)
    }
    assert texts == {i: expected for i in range(3)}


def test_seeded_choices_are_reproducible_and_choice_i_is_seed_plus_i(client):
    kw = dict(temperature=1.0, max_tokens=12, seed=21)
    first = [c.message.content for c in _chat(client, "Sing.", n=3, **kw).choices]
    again = [c.message.content for c in _chat(client, "Sing.", n=3, **kw).choices]
    alone = _chat(client, "Sing.", **(kw | {"seed": 23})).choices[0].message.content
    assert first == again and first[2] == alone and len(set(first)) > 1


# ---- structured output and tools ---------------------------------------------------------------------------------
def _check_person(person: dict) -> None:
    assert set(person) == {"name", "age", "role"}
    assert isinstance(person["name"], str) and 1 <= len(person["name"]) <= 10
    assert type(person["age"]) is int and 0 <= person["age"] <= 120 and person["role"] in ("admin", "user")


def test_json_schema_answers_parse_and_match_their_schema(client):
    schema = {"name": "person", "schema": PERSON, "strict": True}
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=4, n=3)):
        reply = _chat(client, "Who?", response_format={"type": "json_schema", "json_schema": schema}, **kw)
        for choice in reply.choices:
            _check_person(json.loads(choice.message.content))
            assert choice.finish_reason == "stop"
    chunks = _chat(
        client, "Who?", response_format={"type": "json_schema", "json_schema": schema}, stream=True
    )
    _check_person(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)))
    # json_object: any object, so a random model may still be inside a string when max_tokens ends it
    for choice in _chat(
        client, "Any", response_format={"type": "json_object"}, max_tokens=30, n=3, seed=2
    ).choices:
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def test_the_client_parse_helper_gets_a_typed_object(client):
    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=10)
        age: int = pydantic.Field(ge=0, le=120)
        role: Literal["admin", "user"]

    parsed = (
        client.chat.completions.parse(
            model=NAME, messages=[{"role": "user", "content": "Who?"}], response_format=Person
        )
        .choices[0]
        .message.parsed
    )
    assert isinstance(parsed, Person) and 0 <= parsed.age <= 120


def test_regex_grammar_and_choice_extensions(client):
    plate = (
        _chat(client, "Plate?", extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{4}"}).choices[0].message.content
    )
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", plate)
    pick = _chat(client, "Pick", extra_body={"structured_outputs": {"choice": ["red", "green"]}}).choices[0]
    assert pick.message.content in ("red", "green")
    lark = 'start: "n=" NUM\nNUM: /[0-9]{1,3}/'
    assert re.fullmatch(
        r"n=[0-9]{1,3}", _chat(client, "N", extra_body={"guided_grammar": lark}).choices[0].message.content
    )


def test_a_named_tool_call_parses_streamed_or_not(client):
    kw = dict(
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    reply = _chat(client, "Weather in Paris?", **kw).choices[0]
    (call,) = reply.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and reply.finish_reason == "tool_calls"
    assert set(arguments) == {"city", "days"} and 1 <= arguments["days"] <= 7 and len(arguments["city"]) <= 12
    chunks = list(_chat(client, "Weather in Paris?", stream=True, **kw))
    deltas = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_picks_one_of_the_tools_and_auto_is_refused_saying_why(client):
    for seed in range(3):
        reply = _chat(
            client, "Do it.", tools=[WEATHER, ADD], tool_choice="required", seed=seed, temperature=1.0
        )
        (call,) = reply.choices[0].message.tool_calls
        assert call.function.name in ("get_weather", "add")
        keys = {"get_weather": {"city", "days"}, "add": {"a", "b"}}[call.function.name]
        assert set(json.loads(call.function.arguments)) == keys
    for choice in ("auto", None):
        extra = {} if choice is None else {"tool_choice": choice}
        with pytest.raises(openai.BadRequestError, match="no trained tool-call format") as err:
            _chat(client, "Do it.", tools=[WEATHER], **extra)
        assert err.value.body["param"] == "tool_choice"
    plain = _chat(client, "Hi", tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=4).choices[0]
    assert plain.message.tool_calls is None and plain.message.content


def test_a_tool_result_conversation_continues(client):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 20 C"},
    ]
    reply = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=4)
    assert reply.usage.prompt_tokens > 30 and reply.choices[0].message.content


# ---- logit_bias and penalties ----------------------------------------------------------------------------------
def test_logit_bias_100_makes_every_token_that_token(client, model):
    token = 300
    reply = _chat(
        client,
        "Anything.",
        temperature=0.8,
        seed=1,
        max_tokens=8,
        logit_bias={str(token): 100},
        logprobs=True,
    )
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 8 and all(e.bytes == list(model.tokenizer.token_bytes[token]) for e in entries)
    banned = _answer_ids(model, "Anything.", 1)[0]
    reply = _chat(
        client, "Anything.", temperature=0, max_tokens=1, logit_bias={str(banned): -100}, logprobs=True
    )
    assert reply.choices[0].logprobs.content[0].bytes != list(model.tokenizer.token_bytes[banned])


def test_penalties_follow_openai_formula_step_by_step(client, model):
    """Reference: at each step, the model's logits for prompt + answer so far, minus frequency * count and
    presence * (count > 0) over the answer's tokens; the greedy choice and its logprob must match."""
    question, presence, frequency = "Repeat after me: la la la la", 0.6, 1.1
    reply = _chat(
        client,
        question,
        temperature=0,
        max_tokens=10,
        presence_penalty=presence,
        frequency_penalty=frequency,
        logprobs=True,
    )
    entries = reply.choices[0].logprobs.content
    prompt, answer = _prompt_ids(model, question), []
    for entry in entries:
        logits = model.logits(prompt + answer)[-1]
        counts = torch.bincount(torch.tensor(answer, dtype=torch.long), minlength=logits.shape[0]).float()
        reference = logits - counts * frequency - (counts > 0).float() * presence
        token = int(reference.argmax())
        assert entry.bytes == list(model.tokenizer.token_bytes[token])
        assert entry.logprob == pytest.approx(float(reference.log_softmax(-1)[token]), abs=2e-4)
        answer.append(token)
    unpenalised = _answer_ids(model, question, 10)
    assert answer != unpenalised and len(set(answer)) > len(
        set(unpenalised)
    )  # the penalties changed the answer


# ---- /v1/completions ------------------------------------------------------------------------------------------
def _raw_text(model, ids) -> str:
    specials = model.tokenizer.special_ids
    return b"".join(model.tokenizer.token_bytes[t] for t in ids if t not in specials).decode(
        "utf-8", "replace"
    )


def test_completions_equal_greedy_continuation_of_the_raw_tokens(client, model):
    text = "The lighthouse keeper opened the door and"
    ids = model.tokenizer.encode(text)
    stops = [*model.stop_ids, model.tokenizer.eos_id]
    continuation = model.generate(ids, generation_config=dict(max_new_tokens=12, eos_token_id=stops))[
        0
    ].tolist()
    expected = _raw_text(model, [t for t in continuation if t not in stops])
    for prompt in (text, ids):
        reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(ids)
    chunks = list(
        client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    echoed = client.completions.create(model=NAME, prompt=text, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == text + expected


def test_completions_logprobs_batches_json_schema_and_default_length(client, model):
    text = "Once upon a time"
    ids = model.tokenizer.encode(text)
    reply = client.completions.create(model=NAME, prompt=text, max_tokens=6, temperature=0, logprobs=3)
    out = _greedy_continuation(model, ids, 6)
    expected = model.logits(ids + out)[len(ids) - 1 : len(ids) - 1 + len(out)].log_softmax(-1)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [model.tokenizer.token_bytes[t].decode("utf-8", "replace") for t in out]
    assert lp.token_logprobs == pytest.approx([float(expected[k, t]) for k, t in enumerate(out)], abs=2e-4)
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    batch = client.completions.create(model=NAME, prompt=["Alpha", "Beta"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in sorted(batch.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in batch.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]
    assert batch.usage.completion_tokens == 16
    held = client.completions.create(
        model=NAME,
        prompt=text,
        max_tokens=200,  # the schema bounds it: a name of at most 10 characters of up to 4 bytes, ...
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}},
            "min_p": 0,
        },
    )
    _check_person(json.loads(held.choices[0].text))
    default = client.completions.create(model=NAME, prompt=text, temperature=0)
    assert default.usage.completion_tokens <= 16 and default.choices[0].finish_reason in ("length", "stop")


def _greedy_continuation(model, ids, n) -> list[int]:
    stops = [*model.stop_ids, model.tokenizer.eos_id]
    out = model.generate(ids, generation_config=dict(max_new_tokens=n, eos_token_id=stops))[0].tolist()
    return [t for t in out if t not in stops and t != model.tokenizer.pad_id]


# ---- /tokenize, /detokenize, /v1/models, /metrics --------------------------------------------------------------
def test_tokenize_detokenize_and_models(server, client, model):
    body = _raw(
        server, "/tokenize", {"model": NAME, "prompt": "Hello world", "return_token_strs": True}
    ).json()
    ids = model.tokenizer.encode("Hello world")
    assert body == {
        "count": len(ids),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": ids,
        "token_strs": [model.tokenizer.id_to_piece(i) for i in ids],
    }
    assert (
        _raw(server, "/tokenize", {"prompt": "Hello", "add_special_tokens": False}).json()["tokens"]
        == ids[1:2]
    )
    chat = _raw(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == _prompt_ids(model, "Hi")
    assert _raw(server, "/detokenize", {"tokens": ids}).json() == {"prompt": model.tokenizer.decode(ids)}
    (entry,) = client.models.list().data
    assert entry.model_extra["max_model_len"] == MAX_MODEL_LEN


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[re.sub(r',?model_name="demo",?', "", name).replace("{}", "")] = float(value)
    return values


def _metrics_once(server, name: str, at_least: float) -> dict[str, float]:
    """The metrics once ``name`` reaches ``at_least``: a request is recorded just after its last byte is sent,
    so a client that has its answer can be a moment ahead of /metrics."""
    deadline = time.monotonic() + 10
    while (values := _metrics(server)).get(name, 0.0) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return values


def test_metrics_show_the_histograms_and_counters_after_traffic(server, client):
    before = _metrics(server)
    replies = [_chat(client, question, temperature=0, max_tokens=5) for question in ("one", "one")]
    done = "pyvl:e2e_request_latency_seconds_count"
    reply, after = replies[-1], _metrics_once(server, done, before.get(done, 0.0) + 2)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("pyvl:time_to_first_token_seconds_count") == 2
    assert grew("pyvl:e2e_request_latency_seconds_count") == 2
    assert grew("pyvl:inter_token_latency_seconds_count") == 2 * (reply.usage.completion_tokens - 1)
    assert grew("pyvl:request_time_per_output_token_seconds_count") == 2
    assert grew("pyvl:generation_tokens_total") == 2 * reply.usage.completion_tokens
    assert grew("pyvl:prompt_tokens_total") >= 2 * reply.usage.prompt_tokens - 4
    assert grew('pyvl:request_success_total{finished_reason="length"}') == 2
    assert after["pyvl:num_requests_running"] == 0 and after["pyvl:num_requests_waiting"] == 0
    assert 0 <= after["pyvl:kv_cache_usage_perc"] <= 1 and "pyvl:image_cache_usage_perc" in after
    cached = sum(r.usage.prompt_tokens_details.cached_tokens for r in replies)
    assert (
        cached > 0 and grew("pyvl:prompt_tokens_cached_total") == cached
    )  # the second is a prefix-cache hit
    assert "pyvl:image_cache_queries_total" in after
    assert (
        after['pyvl:time_to_first_token_seconds_bucket{le="+Inf"}']
        == after["pyvl:time_to_first_token_seconds_count"]
    )


# ---- validation ----------------------------------------------------------------------------------------------
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", CHAT | {"n": 0}, "n"),
        ("/v1/chat/completions", CHAT | {"n": MAX_NUM_SEQS + 1}, "n"),
        ("/v1/chat/completions", CHAT | {"n": "2"}, "n"),
        ("/v1/chat/completions", CHAT | {"logit_bias": {"99999": 1}}, "logit_bias"),
        ("/v1/chat/completions", CHAT | {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", CHAT | {"logit_bias": {"a": 1}}, "logit_bias"),
        ("/v1/chat/completions", CHAT | {"logit_bias": [1]}, "logit_bias"),
        ("/v1/chat/completions", CHAT | {"presence_penalty": 5}, "presence_penalty"),
        ("/v1/chat/completions", CHAT | {"frequency_penalty": "x"}, "frequency_penalty"),
        (
            "/v1/chat/completions",
            CHAT | {"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
            "response_format.json_schema",
        ),
        (
            "/v1/chat/completions",
            CHAT
            | {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
            "response_format.json_schema.schema",
        ),
        ("/v1/chat/completions", CHAT | {"guided_regex": "[a-"}, "guided_regex"),
        ("/v1/chat/completions", CHAT | {"guided_json": "{not json"}, "guided_json"),
        (
            "/v1/chat/completions",
            CHAT | {"guided_regex": "a", "guided_grammar": "start: 'a'"},
            "guided_grammar",
        ),
        (
            "/v1/chat/completions",
            CHAT | {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
        ),
        (
            "/v1/chat/completions",
            CHAT | {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ("/v1/chat/completions", CHAT | {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", CHAT | {"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
        ("/v1/chat/completions", CHAT | {"min_p": 0.5}, "min_p"),
        ("/v1/chat/completions", CHAT | {"ignore_eos": True}, "ignore_eos"),
        ("/v1/chat/completions", CHAT | {"echo": True}, "echo"),
        (
            "/v1/chat/completions",
            CHAT
            | {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
            "response_format.json_schema.strict",
        ),
        ("/v1/completions", {"model": NAME, "prompt": "x", "min_tokens": 3}, "min_tokens"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "tools": [WEATHER]}, "tools"),
        (
            "/v1/completions",
            {"model": NAME, "prompt": "x", "response_format": {"type": "xml"}},
            "response_format",
        ),
        ("/v1/completions", {"model": NAME, "prompt": []}, "prompt"),
        ("/v1/completions", {"model": NAME, "prompt": [99999]}, "prompt[0]"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ("/v1/completions", {"model": NAME, "prompt": "x" * 3000 * 4}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": False},
            "add_generation_prompt",
        ),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
    ],
)
def test_new_fields_are_refused_with_a_400_naming_them(server, path, body, param):
    r = _raw(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and "Traceback" not in error["message"]


def test_an_invalid_schema_error_says_what_is_wrong(client):
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
    }
    with pytest.raises(openai.BadRequestError, match="Invalid type: nonsense"):
        _chat(client, "hi", response_format=bad)


def test_serve_groups_the_engine_flags_under_vllm_names(capsys):
    from pyvl.cli import _engine_options, build_parser

    flags = "--max-model-len 999 --max-num-seqs 3 --max-num-batched-tokens 64 --kv-cache-gb 0.5 --image-cache-gb 0.25"
    flags += " --tensor-parallel-size 2"
    args = build_parser().parse_args(["serve", *flags.split(), "--no-enable-prefix-caching"])
    assert _engine_options(args) == dict(
        max_context=999,
        max_num_seqs=3,
        max_batched_tokens=64,
        kv_cache_gb=0.5,
        image_cache_gb=0.25,
        prefix_caching=False,
        tensor_parallel_size=2,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    engine_group = capsys.readouterr().out.split("engine (vLLM's flag names")[1]
    for flag in (*flags.split()[::2], "--no-enable-prefix-caching"):
        assert flag in engine_group
