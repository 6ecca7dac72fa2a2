"""Sampling, structured output, the image-feature disk tier, tools and request parameters, where the
planted-bug runs of issue 19 found them unguarded: a seed (0 included) names one random stream; a grammar ends
on any of the model's stop ids, only where complete, and text spelling a special token is answered in ordinary
tokens; a feature folder holds entries that fit exactly and a rewrite evicts nothing; through the server:
max_completion_tokens, top_k -1, guided choices with quotes, cached tokens under n > 1, text held back for a
stop string, a stop string ending the answer's logprobs, tokens that make no text yet keeping theirs,
"required" with one tool or several, earlier tool calls in the history, structured_outputs equal to the guided
fields, and the exact bounds of the fields test_serve_limits does not cover. The sampler runs on small random
logits, the rest on the demo model (random weights, CPU), the server in process (starlette's TestClient)."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch

import pyvl
from pyvl.demo import demo_model_path
from pyvl.engine.constraints import MaskWorker
from pyvl.engine.feature_store import FeatureStore
from pyvl.engine.sampling import Sampler
from pyvl.generation_config import GenerationConfig

VOCAB, BOS = 40, 1


@pytest.fixture(scope="module")
def model():
    return pyvl.load(demo_model_path(), device="cpu")


# ---- seeds -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1])
def test_a_seed_draws_what_torchs_generator_seeded_with_it_draws(seed):
    """A seeded row's draws are torch.multinomial's with a generator seeded with exactly that seed, so that a seed
    names one answer: 0 is a seed like any other (not "no seed"), and the largest one is not cut."""
    logits = torch.randn(12, VOCAB, generator=torch.Generator().manual_seed(7))
    sampler = Sampler(1, VOCAB, BOS)
    sampler.activate(0, GenerationConfig(do_sample=True, top_k=0, seed=seed))
    reference = torch.Generator().manual_seed(seed)
    for step in range(12):
        token = sampler.sample(logits[step : step + 1], [0])[0].item()
        assert token == torch.multinomial(logits[step : step + 1].softmax(-1), 1, generator=reference).item()


# ---- grammars ----------------------------------------------------------------------------------------------------
def _allowed(constraint, vocab: int) -> set[int]:
    """The token ids the constraint's mask allows next (computed as the engine does, into a one-row mask)."""
    mask = torch.zeros(1, -(-vocab // 32), dtype=torch.int32)
    MaskWorker(mask).fill([(constraint, 0)])
    words = mask[0].tolist()
    return {t for t in range(vocab) if words[t // 32] >> (t % 32) & 1}


def test_a_grammar_ends_with_any_stop_id_and_only_where_complete(model):
    """The end of a constrained answer may be any of the ids the model stops on (the chat's <|im_end|> and the
    tokenizer's EOS, which raw completions stop on too), and none of them before the grammar is complete."""
    pytest.importorskip("llguidance")
    table = model.tokenizer.token_bytes
    ends = {*model.stop_ids, model.tokenizer.eos_id}
    assert len(ends) == 2
    constraint = model.grammars.constraint(GenerationConfig(regex="[0-9]{1,3}"))
    first = _allowed(constraint, len(table))
    assert first and all(table[t].isdigit() for t in first) and not first & ends
    assert constraint.accept(table.index(b"7"))
    assert ends <= _allowed(constraint, len(table))
    for digit in (b"1", b"2"):
        assert constraint.accept(table.index(digit))
    assert _allowed(constraint, len(table)) == ends


def test_text_that_spells_a_special_token_is_answered_in_ordinary_tokens(model):
    """Special tokens (<|im_start|>, <img>, ...) stand for no text: a grammar that allows any text allows none of
    them, and an answer that must spell one's text gets that text in ordinary tokens. (The encoder llguidance
    reads gave "<img>" its special id, so a grammar forcing that text refused every token and the request
    failed.)"""
    pytest.importorskip("llguidance")
    table, markers = model.tokenizer.token_bytes, model.tokenizer.marker_ids
    allowed = _allowed(model.grammars.constraint(GenerationConfig(regex="[^\\n]{1,40}")), len(table))
    assert not allowed & markers and {table.index(b"a"), table.index(b"<")} <= allowed
    for text in ("<|im_start|>", "<img>", "a <IMG_CONTEXT>"):
        result = pyvl.ChatResult()
        assert model.chat(None, "Hi", dict(max_new_tokens=30, regex=re.escape(text)), result=result) == text
        assert not set(result.choices[0].token_ids) & markers - set(model.stop_ids)


# ---- the disk tier -----------------------------------------------------------------------------------------------
def test_a_folder_holds_entries_that_fit_exactly_and_a_rewrite_evicts_nothing(tmp_path):
    """A folder bounded to exactly one entry's bytes stores it, one bounded to two holds two; writing one of
    them again replaces its file, whose bytes are not counted twice, so the other entry stays."""
    features = torch.arange(256 * 16, dtype=torch.float32).reshape(256, 16)
    old, new = bytes([1]) * 16, bytes([2]) * 16
    one = FeatureStore(tmp_path / "one", 1 << 20, "a" * 32)
    one.put(old, features)
    size = sum(f.stat().st_size for f in one.folder.iterdir())
    one = FeatureStore(tmp_path / "exact", size, "a" * 32)
    assert one.put(old, features) and old in one
    store = FeatureStore(tmp_path / "store", 2 * size, "a" * 32)
    for digest in (old, new, new):
        assert store.put(digest, features)
        assert old in store and digest in store
    assert torch.equal(store.get(old), features) and torch.equal(store.get(new), features)


# ---- request parameters through the server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(model):
    pytest.importorskip("fastapi")
    from test_serve_strength import _client

    return _client(model)


def _post(client, question: str, kw: dict):
    """A chat completion (greedy, 4 tokens unless kw says otherwise); it must succeed."""
    body = {"model": "demo", "messages": [{"role": "user", "content": question}], "temperature": 0}
    r = client.post("/v1/chat/completions", json=body | {"max_tokens": 4} | kw)
    assert r.status_code == 200, r.text
    return r


def _reply(client, question: str = "Tell me a story.", **kw) -> dict:
    return _post(client, question, kw).json()


def _streamed(client, question: str = "Tell me a story.", **kw) -> tuple[str, list[str], list[dict]]:
    """(text, finish reasons, logprob entries) as a one-choice streamed chat completion sends them."""
    lines = _post(client, question, kw | {"stream": True}).text.splitlines()
    choices = [c for line in lines if line.startswith("data: {") for c in json.loads(line[6:])["choices"]]
    text = "".join(c["delta"].get("content") or "" for c in choices)
    entries = [e for c in choices if c.get("logprobs") for e in c["logprobs"]["content"]]
    return text, [c["finish_reason"] for c in choices if c["finish_reason"]], entries


def test_max_completion_tokens_bounds_the_answer_and_wins_over_max_tokens(client, model):
    """OpenAI's current name for the bound is honoured, and preferred to the deprecated one given beside it."""
    want = model.chat(None, "Tell me a story.", dict(max_new_tokens=5))
    for kw in (dict(max_completion_tokens=5, max_tokens=9), dict(max_completion_tokens=5, max_tokens=None)):
        reply = _reply(client, **kw)
        assert reply["usage"]["completion_tokens"] == 5, kw
        assert reply["choices"][0]["message"]["content"] == want
        assert reply["choices"][0]["finish_reason"] == "length"


def test_top_k_minus_one_is_top_k_off(client):
    """vLLM's -1 (and 0) switch top-k off: the seeded answer is the one without top_k."""
    kw = dict(temperature=1.0, seed=3, max_tokens=8)
    free = _reply(client, **kw)["choices"][0]["message"]["content"]
    for top_k in (-1, 0):
        assert _reply(client, **kw, top_k=top_k)["choices"][0]["message"]["content"] == free, top_k


def test_a_guided_choice_is_one_of_the_strings_exactly_quotes_and_backslashes_included(client):
    """Each choice is a literal of the grammar, whatever characters it holds: the answer is one of them."""
    choices = ['say "yes"', "no\\way", "it's {maybe}"]
    for kw in (dict(temperature=0), *(dict(temperature=1.0, seed=s) for s in range(3))):
        reply = _reply(client, "Pick one.", guided_choice=choices, max_tokens=20, **kw)
        assert reply["choices"][0]["message"]["content"] in choices, kw


def test_cached_tokens_count_the_prompt_once_whatever_n(client):
    """A cached prompt is cached once for the call, not once per choice (the n choices share its blocks)."""
    question = "Say something about the cached prompt, please, in a few words. " * 3
    _reply(client, question)  # caches the prompt's full blocks
    one = _reply(client, question)["usage"]
    many = _reply(client, question, n=3)["usage"]
    assert one["prompt_tokens_details"]["cached_tokens"] > 0
    assert many["prompt_tokens_details"] == one["prompt_tokens_details"]
    assert many["prompt_tokens"] == one["prompt_tokens"]


def test_text_held_back_for_a_stop_string_comes_out_when_the_answer_ends(client):
    """The end of an answer that could begin a stop string is held back while more may follow; when the answer
    ends at its length without the stop string it is delivered, streamed or not."""
    text = _reply(client, max_tokens=12)["choices"][0]["message"]["content"]
    stop = text[-2:] + "\u2603"  # its first two characters end the answer; it never occurs
    choice = _reply(client, max_tokens=12, stop=[stop])["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (text, "length")
    assert _streamed(client, max_tokens=12, stop=[stop])[:2] == (text, ["length"])


ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "maximum": 99}, "b": {"type": "integer", "maximum": 99}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}


def test_required_with_one_tool_is_the_request_that_names_it(client):
    """tool_choice "required" with a single tool leaves no choice: the same prompt and the same call as naming
    that function (its arguments held to its schema, not wrapped in {name, arguments})."""
    named = {"type": "function", "function": {"name": "add"}}
    replies = [
        _reply(client, "Add 2 and 3.", tools=[ADD], tool_choice=c, max_tokens=40) for c in ("required", named)
    ]
    calls = [r["choices"][0]["message"]["tool_calls"] for r in replies]
    assert [r["usage"]["prompt_tokens"] for r in replies] == [replies[1]["usage"]["prompt_tokens"]] * 2
    assert [[c["function"] for c in call] for call in calls] == [[calls[1][0]["function"]]] * 2
    assert calls[0][0]["function"]["name"] == "add"
    assert set(json.loads(calls[0][0]["function"]["arguments"])) == {"a", "b"}
    assert all(r["choices"][0]["finish_reason"] == "tool_calls" for r in replies)


def test_the_several_tools_schema_allows_nothing_after_the_arguments(model):
    """With "required" and several tools the answer is exactly {"name": ..., "arguments": ...}: once the
    arguments are complete, the grammar allows only the closing brace (no other key)."""
    pytest.importorskip("fastapi")
    from pyvl.engine.constraints import _Vocabulary
    from pyvl.serve.tools import plan_tools

    plan = plan_tools(
        {"tools": [ADD, {"type": "function", "function": {"name": "now"}}], "tool_choice": "required"}
    )
    constraint = model.grammars.constraint(GenerationConfig(json_schema=plan.schema))
    encode = _Vocabulary(model.tokenizer, model.stop_ids)
    for token in encode(b'{"name": "add", "arguments": {"a": 1, "b": 2}'):
        assert constraint.accept(token)
    table = model.tokenizer.token_bytes
    allowed = _allowed(constraint, len(table))
    assert allowed and all(table[t].startswith(b"}") for t in allowed)


def test_earlier_tool_calls_reach_the_model_as_one_json_line_each_in_order():
    """An assistant message's tool calls are rendered into the history the model sees: each call's name and
    its arguments text, in order, after the message's own text."""
    pytest.importorskip("fastapi")  # pyvl.serve needs the serve extra
    from pyvl.serve.protocol import conversation

    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    messages = [
        {"role": "user", "content": "Add, then tell the time."},
        {"role": "assistant", "content": "Doing both.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]
    _, history, question, _ = conversation(messages)
    assert history == [
        (
            "Add, then tell the time.",
            'Doing both.\n{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}\n'
            '{"name": "get_time", "arguments": "{}"}',
        )
    ]
    assert question == "Result of tool call call_1: 5\nResult of tool call call_2: noon"


@pytest.mark.parametrize(
    "kind, value",
    [
        (
            "json",
            {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]},
        ),
        ("regex", "[a-c]{2,5}"),
        ("grammar", 'start: "x" | "yy" | "zzz"'),
        ("choice", ["red", "green"]),
    ],
)
def test_structured_outputs_and_the_guided_fields_are_one_constraint(client, kind, value):
    """vLLM's structured_outputs.{kind} and guided_{kind} ask for the same answer, and it is the constrained
    one: never the free answer."""
    kw = dict(question="Answer.", max_tokens=24, temperature=1.0, seed=2)
    guided = _reply(client, **kw, **{f"guided_{kind}": value})["choices"][0]["message"]["content"]
    options = _reply(client, **kw, structured_outputs={kind: value})["choices"][0]["message"]["content"]
    assert guided == options != _reply(client, **kw)["choices"][0]["message"]["content"]


def test_tokens_that_make_no_text_yet_still_get_their_logprobs_streamed_or_not(client, model):
    """Every generated token has its logprob entry, in order, even when it adds no text yet (whitespace is held
    back until more text follows; here every token is a space, forced by logit_bias)."""
    space = model.tokenizer.token_bytes.index(b" ")
    kw = dict(max_tokens=3, logit_bias={str(space): 100}, logprobs=True, top_logprobs=1)
    reply = _reply(client, **kw)["choices"][0]
    text, reasons, entries = _streamed(client, **kw)
    assert (reply["message"]["content"], text, reasons) == ("", "", ["length"])
    assert reply["logprobs"]["content"] == entries
    assert [e["bytes"] for e in entries] == [[32]] * 3


TOOL = {"type": "function", "function": {"name": "f"}}
MORE_EDGES = [  # field, the last value accepted, the first refused (test_serve_limits.EDGES has the others)
    ("repetition_penalty", 10, 10.0001),
    ("repetition_penalty", 0.01, 0.0099),
    ("top_k", -1, -2),
    ("top_k", 1 << 20, (1 << 20) + 1),
    ("frequency_penalty", 2, 2.0001),
    ("logit_bias", {"0": 100}, {"0": 100.5}),
    ("stop", ["x"], [""]),
    (
        "tools",
        [{"type": "function", "function": {"name": "a" * 64}}],
        [{"type": "function", "function": {"name": "a" * 65}}],
    ),
    ("tools", [TOOL, {"type": "function", "function": {"name": "g"}}], [TOOL, TOOL]),
    ("min_p", 0, 0.1),
    ("ignore_eos", False, 0),
]


@pytest.mark.parametrize(
    ("field", "last", "first"), MORE_EDGES, ids=[f"{f}={v!r:.12}" for f, v, _ in MORE_EDGES]
)
def test_more_bounded_fields_take_their_limit_and_refuse_one_past(field, last, first):
    """Each bound is exact: the last value allowed is taken, the first one past it is a 400 naming the field
    (vLLM's unsupported extensions pass only at their neutral value, of its type: 0 is not False)."""
    pytest.importorskip("fastapi")
    from test_serve_limits import LIMITS

    from pyvl.serve.errors import APIError
    from pyvl.serve.protocol import parse_chat_request

    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "Hi"}],
        "tool_choice": "none",
        field: last,
    }
    parse_chat_request(body, LIMITS)
    with pytest.raises(APIError) as info:
        parse_chat_request(body | {field: first}, LIMITS)
    assert info.value.status == 400 and info.value.param == field


def test_a_stop_string_ends_the_answer_and_its_logprobs_at_the_token_that_completes_it(model):
    """The logprobs describe the answer's tokens only, up to the one that completes a stop string, whether the
    tokens after it arrive in the same batch (a finished request's ids come as one; such tokens once got logprob
    entries whenever the response lagged) or one by one (the response takes no more once the stop string is
    seen: it ends the engine request). Usage counts the same tokens (Call.completion_tokens)."""
    pytest.importorskip("fastapi")
    from pyvl.serve.generation import Call, Generation

    def events(stops, one_by_one=False):
        request = model.submit(model.prompt("Tell me a story.", []), dict(max_new_tokens=12, logprobs=True))
        request.result()
        taken = []

        async def batches():
            for token in request.output_ids:
                taken.append(token)
                yield [token]

        if one_by_one:
            request.batches = batches

        generation = Generation(model, request, 0, stops)

        async def collect():
            return [e async for e in generation.events()]

        return request.output_ids, asyncio.run(collect()), taken, Call([generation]).completion_tokens

    ids, free, _, used = events(())
    text = "".join(e[1] for e in free[:-1])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    table = model.tokenizer.token_bytes
    said = [b"".join(table[t] for t in ids[:k]).decode(errors="replace") for k in range(len(ids) + 1)]
    k = next(k for k, s in enumerate(said) if stop in s)  # the first k tokens hold the stop string
    assert len(ids) == 12 and k < 12 and used == 12
    for one_by_one in (False, True):
        again, stopped, taken, used = events((stop,), one_by_one)
        assert again == ids and stopped[-1] == ("end", "stop")
        assert "".join(e[1] for e in stopped[:-1]) == text[: text.index(stop)]
        assert [entry.token_id for e in stopped[:-1] for entry in e[2]] == ids[:k], one_by_one
        assert taken == (ids[:k] if one_by_one else []) and used == k
