"""The front door end to end on the golden v15 model (float32, CPU): every input kind reaches the same answer, a
cached image is never tiled again, a file rewritten in place is a new image, and the async API (achat, astream)
answers as chat and stream do, cancels, and runs many calls on one event loop without a thread each."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from conftest import GOLDEN, run_within
from PIL import Image

import pyvl

CHECKPOINT = GOLDEN / "v15" / "checkpoint"
SHORT = dict(max_new_tokens=8)


def fresh(**kwargs):
    return pyvl.load(CHECKPOINT, device="cpu", dtype="float32", backend="reference", **kwargs)


def photo(seed: int, size=(700, 500)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def count_tiling(model) -> list[int]:
    """How many images the model's op tiled (the front door's only way to tile)."""
    calls = [0]
    real = model.prompts.resize_tiles

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    model.prompts.resize_tiles = counted
    return calls


def test_every_input_kind_gets_the_answer_of_the_tiles(tmp_path):
    pixels = photo(0)
    path = tmp_path / "a.png"
    path.write_bytes(png(pixels))
    want = fresh().chat(pyvl.load_image(pixels, max_num=12), "What is in the image?", SHORT)
    for image in (str(path), path.read_bytes(), Image.fromarray(pixels), pixels):
        assert fresh().chat(image, "What is in the image?", SHORT) == want, type(image)


def test_a_cached_image_is_never_tiled_again_and_answers_as_a_cold_call(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png(photo(1)))
    model = fresh()
    tiled = count_tiling(model)
    model.chat(str(path), "What is in the image?", SHORT)
    stats = pyvl.ChatStats()
    follow_up = model.chat(str(path), "Describe the colours.", SHORT, stats=stats)
    assert tiled[0] == 1 and stats.images_encoded == 0  # keyed from its bytes: no decoding, no ViT
    assert follow_up == fresh().chat(str(path), "Describe the colours.", SHORT)


def test_a_file_rewritten_in_place_is_a_new_image(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png(photo(2)))
    model = fresh()
    tiled = count_tiling(model)
    before = model.chat(str(path), "What is in the image?", SHORT)
    path.write_bytes(png(photo(3)))  # same path, same size, new pixels
    stats = pyvl.ChatStats()
    after = model.chat(str(path), "What is in the image?", SHORT, stats=stats)
    assert tiled[0] == 2 and stats.images_encoded == 1
    assert after == fresh().chat(str(path), "What is in the image?", SHORT)
    assert before == fresh().chat(pyvl.load_image(photo(2), max_num=12), "What is in the image?", SHORT)


def test_a_keyed_source_serves_every_turn_of_a_chat(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(png(photo(4)))
    model = fresh()
    source = model.prompts.image(str(path), max_num=2)
    answer, history = model.chat(source, "What is in the image?", SHORT, return_history=True)
    assert history[0][0] == "<image>\nWhat is in the image?"
    assert model.chat(source, "And then?", SHORT, history=history) == fresh().chat(
        pyvl.load_image(str(path), max_num=2), "And then?", SHORT, history=history
    )


def test_several_raw_images_are_labelled_once():
    model = fresh()
    images = [photo(5, (448, 448)), photo(6, (448, 448))]
    answer, history = model.chat(images, "Compare them.", SHORT, return_history=True)
    assert history[0][0] == "Image-1: <image>\nImage-2: <image>\nCompare them."
    tiles = torch.cat([pyvl.load_image(i) for i in images])
    assert answer == fresh().chat(
        tiles, "Image-1: <image>\nImage-2: <image>\nCompare them.", SHORT, num_patches_list=[1, 1]
    )


def test_achat_and_astream_answer_as_chat_and_stream():
    model = fresh()
    pixels = photo(7, (448, 448))

    async def both():
        answer, history = await model.achat(pixels, "What is in the image?", SHORT, return_history=True)
        pieces = [p async for p in model.astream(None, "Tell me more.", SHORT, history=history)]
        return answer, history, pieces

    answer, history, pieces = run_within(both())
    assert answer == fresh().chat(pixels, "What is in the image?", SHORT)
    assert history == [("<image>\nWhat is in the image?", answer)]
    assert pieces == list(fresh().stream(None, "Tell me more.", SHORT, history=history))


def test_many_async_calls_share_one_event_loop_and_get_their_serial_answers():
    model = fresh()
    questions = [f"Question number {i}: tell me a story." for i in range(8)]
    serial = [model.chat(None, q, SHORT) for q in questions]

    async def together():
        return await asyncio.gather(*(model.achat(None, q, SHORT) for q in questions))

    assert run_within(together()) == serial


def test_closing_astream_cancels_the_request_and_frees_its_blocks():
    model = fresh()

    async def first_piece():
        stream = model.astream(None, "Tell me a very long story.", dict(max_new_tokens=400, eos_token_id=[0]))
        piece = await anext(stream)
        await stream.aclose()
        return piece

    assert asyncio.run(first_piece())
    for _ in range(200):  # the engine frees the blocks at its next step
        if model.engine.idle and model.engine.pool.num_in_use == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert model.engine.idle and model.engine.pool.num_in_use == 0


def test_a_bad_image_fails_the_call_before_the_engine(tmp_path):
    model = fresh()
    with pytest.raises(pyvl.ImageError, match="cannot read image"):
        model.chat(b"not an image", "What is it?", SHORT)
    with pytest.raises(pyvl.ImageError, match="cannot read image"):
        asyncio.run(model.achat(b"not an image", "What is it?", SHORT))
    assert model.engine._thread is None  # nothing ever reached the engine
