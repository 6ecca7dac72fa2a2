"""The server's concurrency model, in process: many streaming requests at once are awaited on the event loop
with no thread per request (only a small worker pool reads and keys their images), and each gets the answer
``model.chat`` gives alone."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import pyvl  # noqa: E402
from pyvl.demo import demo_model_path  # noqa: E402
from pyvl.serve import ServeSettings  # noqa: E402
from pyvl.serve.app import create_app  # noqa: E402

REQUESTS = 16


def _stream_text(body: str) -> str:
    pieces = []
    for line in body.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choices = json.loads(line[6:])["choices"]
            pieces += [c["delta"].get("content", "") for c in choices]
    return "".join(pieces)


def test_concurrent_streams_need_no_thread_each():
    model = pyvl.load(demo_model_path(), device="cpu")
    settings = ServeSettings(served_model_name="demo")
    app = create_app(model, settings)
    questions = [f"Story number {i}: once upon a time" for i in range(REQUESTS)]
    want = [model.chat(None, q, dict(max_new_tokens=24)) for q in questions]
    peak = [threading.active_count()]

    async def run() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pyvl") as client:

            async def one(question: str) -> str:
                body = {
                    "model": "demo",
                    "stream": True,
                    "temperature": 0,
                    "max_tokens": 24,
                    "messages": [{"role": "user", "content": question}],
                }
                response = await client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                return _stream_text(response.text)

            async def watch() -> None:
                while True:
                    peak[0] = max(peak[0], threading.active_count())
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            answers = await asyncio.gather(*(one(q) for q in questions))
            watcher.cancel()
            return answers

    baseline = threading.active_count()
    assert asyncio.run(run()) == want
    # the engine thread already runs; the prompt workers are the only threads the requests add
    assert peak[0] - baseline <= settings.prompt_workers < REQUESTS
