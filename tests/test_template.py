"""pyvl.template: every prompt of the golden chat cases, byte for byte, plus the placeholder rules."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import image_for_key, loaded_model
from safetensors.torch import load_file

from pyvl.errors import PromptError
from pyvl.image import load_image
from pyvl.template import (
    DEFAULT_SYSTEM_MESSAGE,
    INTERNLM2_CHAT,
    SEP,
    ChatTemplate,
    build_query,
    effective_question,
    image_block,
)
from pyvl.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "data" / "golden"
VARIANTS = ("mini", "v15")
CASES = {v: json.loads((GOLDEN / v / "cases.json").read_text(encoding="utf-8"))["cases"] for v in VARIANTS}
TILES = {
    e["key"]: e["n_tiles"]
    for e in json.loads((GOLDEN / "preprocess.json").read_text(encoding="utf-8"))["entries"]
}
SINGLE = [(v, n) for v in VARIANTS for n, c in CASES[v].items() if "prompt_compact" in c]
BATCH = [(v, n) for v in VARIANTS for n, c in CASES[v].items() if "prompts_compact" in c]


def expand(compact: str) -> str:
    return re.sub(r"<IMG_CONTEXT>\*(\d+)", lambda m: "<IMG_CONTEXT>" * int(m.group(1)), compact)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_folder(GOLDEN / "tokenizer")


def test_default_system_message_is_the_recorded_one():
    for variant in VARIANTS:
        for case in CASES[variant].values():
            for prompt in case.get("prompts_compact", [case.get("prompt_compact")]):
                if prompt is not None:
                    system = prompt.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
                    assert system == DEFAULT_SYSTEM_MESSAGE


@pytest.mark.parametrize("variant,name", SINGLE)
def test_chat_prompt(tok, variant, name):
    case = CASES[variant][name]
    keys = case["pixel_values_keys"]
    # chat() default: all tiles form one image block unless num_patches_list is given
    patches = case.get("num_patches_list") or ([sum(TILES[k] for k in keys)] if keys else None)
    history = [tuple(turn) for turn in case["history"]] if "history" in case else None
    query = build_query(case["question"], patches, history)
    assert query == expand(case["prompt_compact"])
    assert sha256(query) == case["prompt_sha256"]
    ids = tok.encode(query)
    assert len(ids) == case["n_prompt_tokens"]
    assert ids == load_file(GOLDEN / variant / "cases" / f"{name}.safetensors")["input_ids"].tolist()
    if "n_image_context_tokens" in case:
        assert ids.count(tok.img_context_id) == case["n_image_context_tokens"]


@pytest.mark.parametrize("variant,name", BATCH)
def test_batch_chat_prompts(tok, variant, name, monkeypatch):
    case = CASES[variant][name]
    queries = [build_query(q, [n]) for q, n in zip(case["questions"], case["num_patches_list"])]
    assert queries == [expand(p) for p in case["prompts_compact"]]
    assert [sha256(q) for q in queries] == case["prompt_sha256"]
    encoded = [tok.encode(q) for q in queries]
    assert len({len(e) for e in encoded}) > 1  # the case has prompts of different lengths, so padding shows
    # The original left-pads the batch (its recorded input_ids and attention_mask); the engine runs each prompt
    # as its own sequence, so the unpadded rows of the original's batch are exactly what it must be handed.
    tensors = load_file(GOLDEN / variant / "cases" / f"{name}.safetensors")
    width = max(map(len, encoded))
    pads = [width - len(e) for e in encoded]
    assert tensors["input_ids"].tolist() == [[tok.pad_id] * p + e for p, e in zip(pads, encoded)]
    assert tensors["attention_mask"].tolist() == [[0] * p + [1] * len(e) for p, e in zip(pads, encoded)]
    model = loaded_model(variant)
    submitted = []
    real_submit = model.engine.submit
    monkeypatch.setattr(
        model.engine, "submit", lambda request: submitted.append(request) or real_submit(request)
    )
    images = [image_for_key(key) for key in case["pixel_values_keys"]]
    pixels = torch.cat([load_image(path, max_num=max_num) for path, max_num in images])
    model.batch_chat(
        pixels, case["questions"], dict(max_new_tokens=1), num_patches_list=case["num_patches_list"]
    )
    assert [r.prompt_ids for r in submitted] == encoded  # one request per question, no padding
    # each prompt's image run takes its own image's tiles, in order
    tiles = [t.shape[0] for t in torch.split(pixels, case["num_patches_list"])]
    assert [[i.length for i in r.images] for r in submitted] == [[n * model.num_image_token] for n in tiles]
    assert [[i.start for i in r.images] for r in submitted] == [
        [e.index(tok.img_context_id)] for e in encoded
    ]


# ----------------------------------------------------------------------------------------- rules
HEAD = "<|im_start|>system\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>"


def test_text_only_prompt():
    assert build_query("Hi") == HEAD + "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    # no images: nothing is prepended and a literal placeholder stays text, as in the original
    assert (
        build_query("see <image>", [])
        == HEAD + "<|im_start|>user\nsee <image><|im_end|><|im_start|>assistant\n"
    )


def test_image_prepended_on_first_turn_only():
    block = image_block(2, num_image_token=3)
    assert block == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    assert (
        build_query("Q", [2], num_image_token=3)
        == HEAD + "<|im_start|>user\n" + block + "\nQ<|im_end|><|im_start|>assistant\n"
    )
    assert build_query("Q", [2], history=[], num_image_token=3) == build_query("Q", [2], num_image_token=3)
    # with history the placeholder must come from the history (re-expanded every round)
    history = [("<image>\nQ1", "A1")]
    assert build_query("Q2", [2], history, num_image_token=3) == (
        HEAD + "<|im_start|>user\n" + block + "\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )


def test_separate_images_expand_in_order():
    query = build_query("A: <image>\nB: <image>\nC: <image>", [1, 3, 2], num_image_token=1)
    blocks = re.findall(r"<img>((?:<IMG_CONTEXT>)*)</img>", query)
    assert [b.count("<IMG_CONTEXT>") for b in blocks] == [1, 3, 2]
    assert "<image>" not in query and query.index("A: <img>") < query.index("B: <img>") < query.index(
        "C: <img>"
    )


@pytest.mark.parametrize(
    "question,patches,history,found",
    [
        ("<image> and <image>", [1], None, 2),
        ("Image-1: <image>\nImage-2: x", [1, 4], None, 1),
        ("Q2 <image>", [1], [("<image>\nQ1", "A1")], 2),
        ("Q2", [1, 1], [("<image>\nQ1", "A1")], 1),
        ("Q2", [1], [("Q1", "A1")], 0),
    ],
)
def test_placeholder_count_mismatch(question, patches, history, found):
    with pytest.raises(PromptError, match=f"has {found} '<image>' placeholder.*{len(patches)} image"):
        build_query(question, patches, history)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_patches_list=[0]), "positive integer"),
        (dict(num_patches_list=[1.0]), "positive integer"),
        (dict(num_patches_list=[True]), "positive integer"),
        (dict(num_patches_list=[1], num_image_token=0), "num_image_token"),
        (dict(history=[("q",)]), r"history\[0\]"),
        (dict(history=[("q", None)]), r"history\[0\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(PromptError, match=match):
        build_query("Q", **kwargs)
    with pytest.raises(PromptError, match="question must be a str"):
        build_query(None)


def test_system_message_override_and_empty_turns():
    assert build_query("Q", system_message="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    # the system block is emitted even when empty; "{}" in a message is not a format field
    assert build_query("Q", system_message="").startswith("<|im_start|>system\n<|im_end|><|im_start|>user\n")
    assert "{x}" in build_query("Q", system_message="{x}")
    # an empty history answer (or question) is written as its role only, like the original MPT template
    assert (
        build_query("Q2", history=[("Q1", "")])
        == HEAD
        + "<|im_start|>user\nQ1<|im_end|><|im_start|>assistant\n<|im_start|>user\nQ2<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_template_object_and_effective_question():
    assert SEP == INTERNLM2_CHAT.sep == "<|im_end|>"
    custom = ChatTemplate(system_message="S")
    assert (
        custom.render([("Q", None)]) == "<|im_start|>system\nS<|im_end|><|im_start|>user\nQ<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert effective_question("Q", has_images=True) == "<image>\nQ"
    assert effective_question("Q", has_images=True, history=[]) == "<image>\nQ"
    assert effective_question("Q", has_images=True, history=[("a", "b")]) == "Q"
    assert effective_question("x <image>", has_images=True) == "x <image>"
    assert effective_question("Q", has_images=False) == "Q"
