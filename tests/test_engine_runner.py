"""The decode runner's CUDA graphs (captured when the engine is built, eager when they cannot be), what they read,
the KV pool's default size, and where a request's time to first token goes (ChatStats' breakdown).

The CPU tests drive the capture logic with the capture itself replaced; the GPU tests (run by
benchmarks/device_check.sh) capture for real, also while another thread keeps the GPU busy.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from conftest import GOLDEN, image_for_key

import pyvl
from pyvl.engine.engine import EngineConfig
from pyvl.engine.runner import ModelRunner
from pyvl.kv_cache import BLOCK_SIZE
from pyvl.models.rope import RotaryTables

CHECKPOINT = GOLDEN / "v15" / "checkpoint"
SHORT = dict(max_new_tokens=6)
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU (device_check.sh runs it)"
)


def fresh(**kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("dtype", "float32")
    return pyvl.load(CHECKPOINT, **kwargs)


def test_the_configured_rotary_table_outlives_any_number_of_dynamic_bases():
    rope = fresh(backend="reference").model.language_model.rotary
    device = torch.device("cpu")
    static = rope.inv_freq(1, device)  # what a captured decode graph reads
    for length in range(rope.max_positions + 1, rope.max_positions + 3 * RotaryTables.MAX_DYNAMIC_BASES):
        dynamic = rope.inv_freq(length, device)
        assert not torch.equal(dynamic, static)
    assert rope.inv_freq(rope.max_positions, device) is static
    assert len(rope._dynamic) == RotaryTables.MAX_DYNAMIC_BASES
    assert rope.inv_freq(rope.max_positions + 1, device) is not None  # evicted bases are recomputed


def test_eager_decode_says_why():
    assert fresh(backend="reference").engine.runner.graphs.as_dict() == {
        "enabled": False,
        "captured": [],
        "capture_s": 0.0,
        "eager_reason": "no CUDA graphs on cpu",
    }
    assert fresh(cuda_graphs=False).engine.runner.graphs.eager_reason == "cuda_graphs=False"


def test_a_failed_capture_leaves_decode_eager_with_a_warning(monkeypatch, caplog):
    expected = fresh(backend="reference").chat(None, "Tell me a story.", SHORT)
    captured = []

    def broken_capture(self, bucket, pool):
        captured.append(bucket)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ModelRunner, "_why_eager", lambda self, cuda_graphs: None)  # as on a GPU
    monkeypatch.setattr(ModelRunner, "_capture", broken_capture)
    with caplog.at_level(logging.WARNING, logger="pyvl"):
        model = fresh(backend="reference", max_num_seqs=4)
    report = model.engine.runner.graphs
    assert captured == [4]  # the largest bucket first; the first failure stops the rest
    assert not report.enabled and report.captured == []
    assert report.eager_reason.startswith("graph capture failed: RuntimeError: operation not permitted")
    assert "decoding eagerly" in caplog.text
    assert model.chat(None, "Tell me a story.", SHORT) == expected


def test_every_bucket_is_captured_before_the_first_request(monkeypatch):
    order = []
    monkeypatch.setattr(ModelRunner, "_why_eager", lambda self, cuda_graphs: None)
    monkeypatch.setattr(
        ModelRunner, "_capture", lambda self, bucket, pool: (order.append(bucket), (_FakeGraph(), None))[1]
    )
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    model = fresh(backend="reference", max_num_seqs=6)
    assert order == [6, 4, 2, 1]
    assert model.engine.runner.graphs.captured == [1, 2, 4, 6]
    assert model.engine._thread is None  # no request yet: captured at load


class _FakeGraph:
    def pool(self):
        return None


def test_the_default_kv_pool_holds_max_num_seqs_full_contexts():
    model = fresh(backend="reference", max_num_seqs=3, max_context=300)
    assert model.engine.pool.num_blocks == 3 * -(-300 // BLOCK_SIZE)
    cfg = EngineConfig.for_model(model.model, 300, kv_cache_gb=None, max_num_seqs=1)
    assert cfg.num_blocks == -(-300 // BLOCK_SIZE)


def test_the_first_token_time_is_broken_down_by_stage():
    model = fresh(backend="reference", max_batched_tokens=64)
    pixels = pyvl.load_image(image_for_key("gradient_800x600@max1")[0], max_num=1)
    cold, cached = pyvl.ChatStats(), pyvl.ChatStats()
    model.chat(pixels, "What is in the image?", SHORT, stats=cold)
    model.chat(pixels, "Describe the colours.", SHORT, stats=cached)
    assert cold.prefill_chunks == -(-cold.prompt_tokens // 64)
    assert cached.prefill_chunks == -(-(cached.prompt_tokens - cached.cached_tokens) // 64)
    assert cold.vision_s > 0 and cached.vision_s == 0 and cached.images_encoded == 0
    for s in (cold, cached):
        assert min(s.preprocess_s, s.queue_s, s.prefill_s, s.sample_s) > 0
        # the CPU's marks are wall times: the stages never add up to more than the whole
        assert s.preprocess_s + s.queue_s + s.vision_s + s.prefill_s + s.sample_s <= s.time_to_first_token_s


@CUDA
def test_graphs_capture_while_another_thread_uses_the_gpu():
    stop = threading.Event()

    def busy() -> None:  # allocations, kernels and syncs on the legacy stream, all through the capture
        a = torch.randn(512, 512, device="cuda")
        while not stop.is_set():
            (a @ a).sum().item()
            torch.empty(1 << 20, device="cuda")

    other = threading.Thread(target=busy)
    other.start()
    try:
        model = fresh(device="cuda", backend="triton", max_num_seqs=4, kv_cache_gb=0.05)
    finally:
        stop.set()
        other.join()
    report = model.engine.runner.graphs
    assert report.captured == [1, 2, 4] and report.eager_reason is None and report.capture_s > 0
    prompts = [[1] + list(range(100, 100 + n)) for n in (5, 40, 17)]
    gen = dict(max_new_tokens=12, eos_token_id=[0])
    eager = fresh(device="cuda", backend="triton", cuda_graphs=False, kv_cache_gb=0.05)
    assert model.generate(prompts, None, gen).tolist() == eager.generate(prompts, None, gen).tolist()


@CUDA
def test_graphs_survive_decoding_past_max_position_embeddings():
    """Steps past the limit run eagerly with their own rotary bases (more than the dynamic tables kept); the
    graphs still read the configured base's table afterwards."""
    model = fresh(device="cuda", backend="triton", kv_cache_gb=0.05)
    limit = model.config.llm.max_position_embeddings
    gen = dict(max_new_tokens=RotaryTables.MAX_DYNAMIC_BASES + 20, eos_token_id=[0])
    model.generate([[1] + [100] * (limit - 10)], None, gen)
    prompts = [[1] + list(range(100, 140))]
    eager = fresh(device="cuda", backend="triton", cuda_graphs=False, kv_cache_gb=0.05)
    assert (
        model.generate(prompts, None, SHORT | {"eos_token_id": [0]}).tolist()
        == eager.generate(prompts, None, SHORT | {"eos_token_id": [0]}).tolist()
    )


def test_fill_sends_a_block_table_again_whenever_it_changed():
    from pyvl.engine.runner import DecodeRow

    runner = fresh(backend="reference", max_num_seqs=4).engine.runner
    table = [3, 4]
    runner.fill([DecodeRow(7, 70, table, 280, 71)])
    assert runner.block_tables[0, :2].tolist() == [3, 4] and runner.tokens[0] == 7
    table[1] = 9  # replaced in place (a block deduplicated when registered): same length, new content
    runner.fill([DecodeRow(8, 71, table, 281, 72)])
    assert runner.block_tables[0, :2].tolist() == [3, 9]
    runner.fill([DecodeRow(1, 5, [6], 6 * 64 + 5, 6), DecodeRow(8, 72, table, 282, 73)])  # the rows shift
    assert runner.block_tables[0, 0] == 6 and runner.block_tables[1, :2].tolist() == [3, 9]
    assert runner.slots.tolist() == [6 * 64 + 5, 282, -1, -1] and runner.context_lens.tolist() == [
        6,
        73,
        0,
        0,
    ]
    assert runner.positions[:2].tolist() == [5, 72]


def test_the_engine_times_its_decode_steps():
    model = fresh(backend="reference")
    timing = model.engine.timing
    model.chat(None, "Tell me a story.", dict(max_new_tokens=6, eos_token_id=[0]))
    assert (timing.steps, timing.rows) == (5, 5)  # the first token comes from the prefill
    assert 0 < timing.device_s < timing.step_s and timing.host_us_per_row > 0
    timing.reset()
    assert (timing.steps, timing.rows, timing.step_s, timing.host_us_per_row) == (0, 0, 0.0, 0.0)
