"""Shared test helpers: paths to the golden fixtures and cached model loads (the fixtures are tiny)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. Triton reads this when
# @triton.jit decorates them, i.e. when pyvl.kernels is first imported: here, before any test module imports them.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

GOLDEN = Path(__file__).parent / "data" / "golden"
VARIANTS = ("v15", "mini")


def pytest_configure(config):
    """No TF32 on CUDA for the whole session: the float32 tests' bounds (1e-4 on the golden features) assume true
    float32 matmuls, and cuDNN runs the patch-embedding convolution in TF32 by default."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@functools.cache
def golden_cases(variant: str) -> dict:
    return json.loads((GOLDEN / variant / "cases.json").read_text(encoding="utf-8"))


def expand_compact(prompt_compact: str) -> str:
    """cases.json writes runs of <IMG_CONTEXT> as `<IMG_CONTEXT>*N`; expand them back."""
    import re

    return re.sub(r"<IMG_CONTEXT>\*(\d+)", lambda m: "<IMG_CONTEXT>" * int(m.group(1)), prompt_compact)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_for_key(key: str):
    """'gradient_800x600@max6' -> (path of the PNG, max_num)."""
    name, max_num = key.split("@max")
    return GOLDEN / "images" / f"{name}.png", int(max_num)


@functools.cache
def _loaded(variant: str):
    import pyvl

    return pyvl.load(GOLDEN / variant / "checkpoint", device="cpu", dtype="float32", backend="reference")


@pytest.fixture(params=VARIANTS)
def golden_model(request):
    return request.param, _loaded(request.param)


def loaded_model(variant: str):
    return _loaded(variant)


def run_within(coro, seconds: float = 60.0):
    """asyncio.run(coro) in a thread, failing past ``seconds`` instead of hanging the suite: a stream that never
    ends spins inside the event loop, where no asyncio timeout can interrupt it."""
    done = []
    thread = threading.Thread(target=lambda: done.append(asyncio.run(coro)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"the call failed (its traceback is above) or ran past {seconds} s"
    return done[0]
