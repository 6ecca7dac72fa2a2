"""Structured output on the engine (demo model, random weights, CPU): answers held to a JSON schema, a regex or a
Lark grammar; invalid constraints refused naming the problem; constrained and free requests decoded together, the
masks computed on the helper thread while the forward runs."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("llguidance")

import pyvl  # noqa: E402
from pyvl.demo import demo_model_path  # noqa: E402
from pyvl.engine.constraints import _Vocabulary  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model():
    return pyvl.load(demo_model_path(), device="cpu")


def check_schema(answer: dict) -> None:
    """SCHEMA, checked by hand (no jsonschema dependency)."""
    assert set(answer) == {"name", "age", "pet", "tags"}
    assert isinstance(answer["name"], str) and 2 <= len(answer["name"]) <= 8
    assert type(answer["age"]) is int and 18 <= answer["age"] <= 99
    assert answer["pet"] in ("cat", "dog", "none")
    assert len(answer["tags"]) <= 2 and all(isinstance(t, str) and len(t) <= 3 for t in answer["tags"])


def test_json_schema_answers_parse_and_match_greedy_and_sampled(model):
    greedy = model.chat(None, "Describe a person.", dict(max_new_tokens=300, json_schema=SCHEMA))
    check_schema(json.loads(greedy))
    result = pyvl.ChatResult()
    model.chat(
        None,
        "Describe a person.",
        dict(max_new_tokens=300, json_schema=SCHEMA, n=4, do_sample=True, seed=5),
        result=result,
    )
    for choice in result.choices:
        check_schema(json.loads(choice.text))
        assert choice.finish_reason == "stop"  # ended by the grammar, not the token budget
    assert len({c.text for c in result.choices}) > 1


def test_stream_gives_the_chat_text_under_a_grammar(model):
    settings = dict(max_new_tokens=300, json_schema=json.dumps(SCHEMA))
    assert "".join(model.stream(None, "Again.", settings)) == model.chat(None, "Again.", settings)


def test_regex_and_lark_grammars(model):
    for seed in range(3):
        plate = model.chat(None, "A plate?", dict(regex=r"[A-Z]{2}-[0-9]{3}", do_sample=True, seed=seed))
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", plate), plate
    grammar = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[1-9][0-9]?/'
    reply = model.chat(None, "Well?", dict(grammar=grammar, max_new_tokens=40))
    assert re.fullmatch(r"yes|no|maybe [1-9][0-9]?", reply), reply


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(json_schema={"type": "nonsense"}), "Invalid type: nonsense"),
        (dict(json_schema={"type": "string", "format": "weird"}), "Unknown format: weird"),
        (dict(json_schema="{not json"), "not valid JSON"),
        (dict(json_schema=[1, 2]), "a JSON schema is an object"),
        (dict(regex="[a-z"), "unclosed character class"),
        (dict(grammar="start: undefined_rule"), "undefined_rule"),
        (dict(regex="a", grammar="start: 'a'"), "exclude each other"),
    ],
)
def test_invalid_constraints_are_refused_naming_the_problem(model, settings, message):
    with pytest.raises(pyvl.ConfigError, match=re.escape(message)):
        model.chat(None, "hi", settings)


def test_the_encoder_llguidance_reads_gives_exactly_its_input(model):
    vocabulary = _Vocabulary(model.tokenizer, model.stop_ids)
    table = model.tokenizer.token_bytes
    for text in ['{"name": "', "hello world", " leading", "ünïcödé 汉字", "\n\t x", "}"]:
        ids = vocabulary(text.encode())
        assert b"".join(table[i] for i in ids) == text.encode(), text


def test_free_requests_batched_with_constrained_ones_keep_their_answers(model):
    questions = [f"Story {k}, once upon a time" for k in range(6)]
    alone = [model.chat(None, q, dict(max_new_tokens=24)) for q in questions]
    mask_threads, real = set(), model.engine.masks.fill

    def fill(rows):
        mask_threads.add(threading.current_thread().name)
        return real(rows)

    model.engine.masks.fill = fill
    try:

        def ask(k):
            if k % 2:
                return json.loads(
                    model.chat(None, "JSON please", dict(max_new_tokens=300, json_schema=SCHEMA))
                )
            return model.chat(None, questions[k // 2], dict(max_new_tokens=24))

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(12)))
    finally:
        model.engine.masks.fill = real
    assert answers[0::2] == alone
    for answer in answers[1::2]:
        check_schema(answer)
    assert mask_threads and all(name.startswith("pyvl-masks") for name in mask_threads)


def test_masks_are_computed_while_the_model_step_runs_and_rows_batch_with_free_ones(model):
    """Each mask is written on the helper thread during the step that needs it (prefill or decode forward): the
    wrapped step waits until the mask has begun, and the mask until the step has begun, so a mask computed
    before or after the step, or on the engine thread, records False. The sampler steps mix constrained and free
    rows."""
    engine = model.engine
    step_running, mask_began = threading.Event(), threading.Event()
    pending, overlapped, mixed = [False], [], []
    real_start, real_fill, real_step = engine.masks.start, engine.masks.fill, engine.sampler.step
    real_forward, real_prefill = engine.runner.forward, engine.runner.prefill

    def start(rows):
        if rows:
            mask_began.clear()
            pending[0] = True
        return real_start(rows)

    def fill(rows):
        overlapped.append(step_running.wait(5) and threading.current_thread() is not engine._thread)
        mask_began.set()
        return real_fill(rows)

    def stepping(real):
        def run(*args, **kwargs):
            if not pending[0]:
                return real(*args, **kwargs)
            pending[0] = False
            step_running.set()
            try:
                mask_began.wait(5)
                return real(*args, **kwargs)
            finally:
                step_running.clear()

        return run

    def step(logits, slots):
        masked = [s in engine.sampler._masked for s in slots]
        mixed.append(any(masked) and not all(masked))
        return real_step(logits, slots)

    engine.masks.start, engine.masks.fill, engine.sampler.step = start, fill, step
    engine.runner.forward, engine.runner.prefill = stepping(real_forward), stepping(real_prefill)
    try:
        with ThreadPoolExecutor(2) as pool:
            result = pyvl.ChatResult()
            held = pool.submit(
                model.chat, None, "Letters", dict(max_new_tokens=60, regex="[a-z]{30}"), result=result
            )
            free = pool.submit(model.chat, None, "A story", dict(max_new_tokens=30))
            assert re.fullmatch("[a-z]{30}", held.result()) and free.result()
    finally:
        engine.masks.start, engine.masks.fill, engine.sampler.step = real_start, real_fill, real_step
        engine.runner.forward, engine.runner.prefill = real_forward, real_prefill
    assert len(overlapped) == len(result.choices[0].token_ids) > 1 and all(overlapped)  # one mask per token
    assert any(mixed)
