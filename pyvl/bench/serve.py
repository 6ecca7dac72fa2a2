"""``pyvl bench serve``: streaming clients against a ``pyvl serve`` subprocess on loopback.

For each concurrency N (1, 4, 16) the same bounded set of greedy requests is sent by N client threads at once,
and once more one at a time; per request: time to first content chunk, gaps between content chunks
(inter-token latency; one chunk is about one token), completion tokens from the usage chunk. Then the cost of
structured output: the same requests from 8 clients held to a JSON schema (``response_format``; a long string
field, so that each answer runs its whole token budget as the free ones do), interleaved with 8 free clients over
5 rounds, as the median ratio of output tokens/s.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

__all__ = ["run"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


CONSTRAINED_CLIENTS = 8
STORY_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "story": {"type": "string", "maxLength": 2000},
    },
    "required": ["title", "story"],
    "additionalProperties": False,
}


def _one(url: str, question: str, max_tokens: int, extra: dict | None = None) -> dict:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": question}],
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
    } | (extra or {})
    start = time.perf_counter()
    arrivals, tokens = [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    return {
        "ttft": arrivals[0] - start if arrivals else 0.0,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "tokens": tokens,
    }


def _measure(
    url: str, questions: list[str], clients: int, max_tokens: int, extra: dict | None = None
) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda q: _one(url, q, max_tokens, extra), questions))
    wall = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    return {
        "requests/s": round(len(results) / wall, 2),
        "output tok/s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft p50 ms": round(_percentile(ttfts, 0.5) * 1e3, 1),
        "ttft p99 ms": round(_percentile(ttfts, 0.99) * 1e3, 1),
        "itl p50 ms": round(_percentile(gaps, 0.5) * 1e3, 1),
        "itl p99 ms": round(_percentile(gaps, 0.99) * 1e3, 1),
    }


def run(
    model: str | Path | None = None, concurrency=(1, 4, 16), requests: int = 16, max_tokens: int = 32
) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "pyvl",
        "serve",
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--log-level",
        "warning",
    ] + (["--model", str(model)] if model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("pyvl serve did not start (run it by hand to see why)")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        questions = [f"Request {k}: tell me something about the number {k}." for k in range(requests)]
        _measure(url, questions[:2], 2, 4)  # warm-up
        serial = _measure(url, questions, 1, max_tokens)
        rows = []
        for n in concurrency:
            row = {"clients": n} | _measure(url, questions, n, max_tokens)
            row["tok/s vs serial"] = round(row["output tok/s"] / serial["output tok/s"], 2)
            rows.append(row)
        constrained = _constrained_rows(url, questions, max_tokens)
        return {
            "setup": {"requests": requests, "max_tokens": max_tokens, "model": str(model or "demo")},
            "serial": serial,
            "rows": rows,
            "constrained": constrained,
        }
    finally:
        server.terminate()
        server.wait(30)


def _constrained_rows(url: str, questions: list[str], max_tokens: int, rounds: int = 5) -> list[dict]:
    """8 free clients and 8 held to a JSON schema, interleaved over ``rounds`` (which goes first alternates, so a
    drift of the machine's load hits both alike); each field the median over the rounds, and the constrained
    tokens/s as the median of the rounds' paired ratios to the free ones."""
    n = CONSTRAINED_CLIENTS
    schema = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA}}
    }
    free, held = [], []
    for k in range(rounds):
        order = [(free, None), (held, schema)]
        for runs, extra in order if k % 2 == 0 else order[::-1]:
            runs.append(_measure(url, questions, n, max_tokens, extra))
    ratios = [h["output tok/s"] / f["output tok/s"] for f, h in zip(free, held)]
    return [
        {"clients": f"{n} free"} | _medians(free) | {"tok/s vs free": 1.0},
        {"clients": f"{n} json_schema"}
        | _medians(held)
        | {"tok/s vs free": round(statistics.median(ratios), 2)},
    ]


def _medians(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}
