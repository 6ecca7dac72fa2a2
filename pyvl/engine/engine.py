"""The engine: one thread that owns the model's KV pool and runs every request, batched.

Requests are submitted from any thread (:meth:`Engine.submit`); the engine thread, started on first use, loops:
  1. drop cancelled requests (their blocks are freed at once);
  2. admit waiting requests (pyvl.engine.scheduler: the prefix cache, the pool, preemption);
  3. prefill the requests still prefilling, oldest first, at most ``max_batched_tokens`` tokens in all (a chunk of
     a long prompt, or several short prompts whole), so a long prompt (40 tiles: ~10.5k tokens) never stalls the
     running decodes for its whole prefill and a burst of short ones starts decoding together;
  4. decode one token for every other running request, in one batch, each with its own sampling settings; the
     grammar masks of the constrained ones are computed by a helper thread while the forward runs
     (pyvl.engine.constraints), and the step's tokens (and the logprobs asked for) come back in one transfer.
Errors never escape the engine thread: they are delivered to the request(s) they concern.

The n choices of one call prefill its prompt once: when it is prefilled, the scheduler forks the others onto its
KV blocks, and the first token of each is drawn from the same logits, each with its own sampler slot and seed.

Image features come from the feature cache by image digest, else from the ViT, and only for images whose tokens
are not already covered by the cached prefix. The rows of one batch call are rotated as the original's
left-padded batch would be (Request.rope_offset).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .. import checks
from ..errors import ConfigError, PromptError, PyvlError
from ..kv_cache import BLOCK_SIZE, PagedKVCache
from ..models.vlm import InternVLChatModel
from .blocks import BlockPool
from .clock import StageClock
from .constraints import MaskWorker
from .feature_store import FeatureStore, vision_fingerprint
from .features import FeatureCache
from .request import Request
from .runner import DecodeRow, ModelRunner
from .sampling import Sampler
from .scheduler import Scheduler

__all__ = ["EngineConfig", "Engine", "DecodeTiming"]


@dataclass
class DecodeTiming:
    """Where the decode steps' time went, summed since the engine started (or since ``reset``)."""

    steps: int = 0
    rows: int = 0
    step_s: float = 0.0  # whole decode steps, host and device
    device_s: float = (
        0.0  # the forward (a graph replay, or eager ops), the sampling and the wait for the tokens
    )

    @property
    def host_us_per_row(self) -> float:
        """Host work of a step (block slots, the static buffers, delivering tokens) per row, in microseconds."""
        return (self.step_s - self.device_s) / self.rows * 1e6 if self.rows else 0.0

    def reset(self) -> None:
        self.steps, self.rows, self.step_s, self.device_s = 0, 0, 0.0, 0.0


@dataclass(frozen=True)
class EngineConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int = 16
    max_batched_tokens: int = 2048
    image_cache_bytes: int = 1 << 30
    image_cache_dir: Path | None = None  # the disk tier of the image-feature cache (None: memory only)
    image_cache_dir_bytes: int = 10 * 10**9
    cuda_graphs: bool = True
    max_context: int = 32768
    prefix_caching: bool = True  # off: every prompt is prefilled whole (benchmarks of the cold path)

    @classmethod
    def for_model(
        cls,
        model: InternVLChatModel,
        max_context: int,
        kv_cache_gb: float | None = None,
        image_cache_gb: float = 1.0,
        max_num_seqs: int = 16,
        max_batched_tokens: int = 2048,
        cuda_graphs: bool = True,
        prefix_caching: bool = True,
        image_cache_dir: str | os.PathLike | None = None,
        image_cache_dir_gb: float = 10.0,
        kv_heads: int | None = None,
    ) -> EngineConfig:
        """The KV pool from its budget: kv_cache_gb, else room for max_num_seqs full contexts, at most half the
        free GPU memory after the weights on CUDA, and on the CPU at most 2 GiB and a quarter of the free memory.
        (A pool beyond max_num_seqs full contexts would only hold more cached prefixes; a process that wants that
        says so with kv_cache_gb, so that several models or test workers can share one GPU.)
        kv_heads: the KV heads a rank's pool holds, under tensor parallelism the most any rank holds (default: the
        model's); every rank's pool has the block count this gives."""
        llm, device = model.cfg.llm, model.device
        shape = (llm.num_hidden_layers, kv_heads or llm.num_key_value_heads, llm.head_dim)
        per_block = checks.kv_cache_bytes(*shape, BLOCK_SIZE, 1, model.dtype)
        free = checks.available_memory(device)
        full_contexts = max_num_seqs * -(-max_context // BLOCK_SIZE) * per_block
        if kv_cache_gb is not None:
            budget = kv_cache_gb * 1e9
        elif device.type == "cuda":
            budget = min(full_contexts, free * 0.5)
        else:
            budget = min(2 * 2**30, full_contexts, (free or 2**62) / 4)
        num_blocks = int(budget // per_block)
        if num_blocks < 1:
            raise ConfigError(
                f"kv_cache_gb={kv_cache_gb} holds no block of {BLOCK_SIZE} tokens "
                f"({per_block / 1e9:.4f} GB each)"
            )
        checks.check_kv_cache_fits(*shape, num_blocks * BLOCK_SIZE, 1, model.dtype, device, error=ConfigError)
        return cls(
            num_blocks=num_blocks,
            block_size=BLOCK_SIZE,
            max_num_seqs=max_num_seqs,
            max_batched_tokens=max_batched_tokens,
            image_cache_bytes=int(image_cache_gb * 1e9),
            image_cache_dir=None if image_cache_dir is None else Path(image_cache_dir),
            image_cache_dir_bytes=int(image_cache_dir_gb * 1e9),
            cuda_graphs=cuda_graphs,
            max_context=max_context,
            prefix_caching=prefix_caching,
        )


class TensorParallelGroup(Protocol):
    """What the engine needs of a tensor-parallel group (pyvl.parallel.launch.Cluster, which depends on the
    engine's runner, so the engine names it only by this shape)."""

    @property
    def local_kv_heads(self) -> int: ...

    def runner(
        self,
        model: InternVLChatModel,
        cache: PagedKVCache,
        max_num_seqs: int,
        max_blocks: int,
        cuda_graphs: bool,
    ): ...

    def close(self) -> None: ...


class Engine:
    def __init__(
        self,
        model: InternVLChatModel,
        config: EngineConfig,
        salt: str,
        bos_id: int,
        cluster: TensorParallelGroup | None = None,
    ):
        """cluster: the tensor-parallel group ``model`` is rank 0's shard of (pyvl.parallel.launch.Cluster), or
        None."""
        llm = model.cfg.llm
        self.model = model
        self.config = config
        self.cluster = cluster
        self.cache = PagedKVCache(
            llm.num_hidden_layers,
            config.num_blocks,
            llm.num_key_value_heads if cluster is None else cluster.local_kv_heads,
            llm.head_dim,
            model.dtype,
            model.device,
            config.block_size,
        )
        self.pool = BlockPool(config.num_blocks, config.block_size, salt=salt)
        self.features = FeatureCache(config.image_cache_bytes)
        self.store = (
            None
            if config.image_cache_dir is None
            else FeatureStore(config.image_cache_dir, config.image_cache_dir_bytes, vision_fingerprint(model))
        )
        self.clock = StageClock(model.device)
        self.timing = DecodeTiming()
        max_blocks = -(-config.max_context // config.block_size)
        runner_args = (model, self.cache, config.max_num_seqs, max_blocks, config.cuda_graphs)
        # under tensor parallelism every model call of the runner also runs on the workers
        self.runner = ModelRunner(*runner_args) if cluster is None else cluster.runner(*runner_args)
        with torch.inference_mode():  # before any request, so no other work of this engine can break it
            self.runner.capture_graphs()
        # One sampler slot per running request: its settings and repetition mask live on the device.
        self.sampler = Sampler(config.max_num_seqs, llm.vocab_size, bos_id, model.device)
        self.masks = MaskWorker(self.sampler.mask_host)
        rope = model.language_model.rotary
        self.scheduler = Scheduler(
            self.pool,
            self.runner,
            self.sampler,
            config.max_num_seqs,
            config.prefix_caching,
            rope.max_positions if rope.scaling == "dynamic" else None,
        )
        self._incoming: list[Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- any thread ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        with self._wake:
            if self._closed:
                raise PyvlError("the engine was shut down (the interpreter is exiting); no new requests")
            self._incoming.append(request)
            if self._thread is None:
                # The thread holds the engine weakly between steps, so an unused model can still be freed.
                self._thread = threading.Thread(
                    target=_serve, args=(weakref.ref(self),), name="pyvl-engine", daemon=True
                )
                self._thread.start()
                # A thread still inside torch when the interpreter finalises aborts the process: stop it first.
                atexit.register(_shutdown, weakref.ref(self))
            self._wake.notify()
        return request

    def shutdown(self) -> None:
        """Finish the current step, fail what is left with a PyvlError, and stop the engine thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.store is not None:
            self.store.close()  # the features still queued for the disk are written
        self.masks.close()
        if self.cluster is not None:
            self.cluster.close()  # the tensor-parallel workers end with the engine

    @property
    def alive(self) -> bool:
        """The engine can serve: not shut down, and its thread (once started) still running."""
        with self._wake:
            return not self._closed and (self._thread is None or self._thread.is_alive())

    def has_features(self, digest: bytes) -> bool:
        """Whether an image's features are cached (in memory or on disk), so that a prompt about it needs no
        tiles (any thread; the answer may be stale a moment later, which costs only a tiling)."""
        return digest in self.features or (self.store is not None and digest in self.store)

    @property
    def num_running(self) -> int:
        """Requests being prefilled or decoded (any thread: a length read, possibly a step old)."""
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet admitted (any thread, as num_running)."""
        return len(self._incoming) + len(self.scheduler.waiting)

    @property
    def idle(self) -> bool:
        """No request is queued or running (the pool then holds only cached blocks)."""
        with self._wake:
            return not (self._incoming or self.scheduler.waiting or self.scheduler.running)

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _serve_once(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for work, then run one step; False once the engine is shut down."""
        with self._wake:
            s = self.scheduler
            if not (self._incoming or s.waiting or s.running or self._closed):
                self._wake.wait(timeout)
            s.waiting.extend(self._incoming)
            self._incoming.clear()
            if self._closed:
                s.end_all(PyvlError("the engine was shut down before this request finished"))
                return False
        if not (s.waiting or s.running):
            return True
        try:
            self._step()
        except Exception as exc:  # a bug in the bookkeeping: fail everything, start clean
            s.end_all(exc)
        return True

    def _step(self) -> None:
        self.scheduler.end_cancelled()
        self.scheduler.admit()
        budget = self.config.max_batched_tokens
        # the prompts still prefilling, oldest first, within the step's budget
        for r in [r for r in self.scheduler.running if r.prefilling]:
            if budget <= 0:
                break
            if r.seq is None:  # preempted to make room for an older prompt of this step
                continue
            budget -= self._guarded([r], self._prefill_chunk, r, budget) or 0
        decoding = [r for r in self.scheduler.running if not r.prefilling]
        if decoding:
            self._guarded(decoding, self._decode, decoding)

    def _guarded(self, requests: list[Request], fn, *args):
        """Run a model step (its result, or None); an error fails the requests it concerns (delivered to their
        callers)."""
        try:
            return fn(*args)
        except Exception as exc:
            for r in requests:
                self.scheduler.end(r, exc)

    # ---- prefill -----------------------------------------------------------------------------------------
    def _prefill_chunk(self, r: Request, budget: int) -> int:
        """Prefill the next at most ``budget`` tokens of r; how many it prefilled."""
        tokens = r.tokens_to_compute
        start = r.num_computed
        n = min(len(tokens) - start, budget)
        slots = self.scheduler.slots(r, n)
        if slots is None:
            return 0
        first_token = not r.prompt_logits and not r.output_ids and start + n == len(tokens)
        masks = self.masks.start([(r.constraint, r.slot)] if first_token and r.constraint else [])
        rows = [
            (
                max(i.start, start) - start,
                feats[max(i.start, start) - i.start : min(i.start + i.length, start + n) - i.start],
            )
            for i, feats in self._features_for(r, start, start + n)
        ]
        began = self.clock.mark()
        logits = self.runner.prefill(
            tokens[start : start + n],
            start,
            rows,
            r.seq.block_ids,
            slots,
            rope_length=len(r.prompt_ids) + r.rope_offset,
            every_position=r.prompt_logits,
        )
        prefilled = self.clock.mark()
        r.time_stage("prefill_s", began, prefilled)
        r.stats.prefill_chunks += 1
        r.num_computed += n
        if r.prompt_logits:
            r.logits.append(logits)
            if not r.prefilling:
                self.scheduler.end(r)
            return n
        self.scheduler.register(r)
        if first_token:
            self._first_tokens(r, logits, masks, prefilled)
        return n

    def _first_tokens(self, r: Request, logits: torch.Tensor, masks, prefilled) -> None:
        """The first token of r, and of its other choices (n > 1), started now on its blocks."""
        group = [r] + [f for f in self.scheduler.fork(r) if f.slot is not None]
        self.masks.wait(masks)
        for f in group[1:]:
            if f.constraint is not None:  # the same grammar in the same state: the same mask
                self.sampler.mask_host[f.slot] = self.sampler.mask_host[r.slot]
        step = self.sampler.step(logits[None].expand(len(group), -1), [g.slot for g in group])
        tokens, logprobs = step.to_host()
        r.time_stage("sample_s", prefilled, self.clock.mark())
        for i, g in enumerate(group):
            self._accept(g, tokens[i], step.scores[i], logprobs[i])

    def _features_for(self, r: Request, start: int, end: int):
        """(image, feature rows) of every image with tokens in [start, end): cached, else encoded now."""
        for image in r.images:
            if image.start >= end or image.start + image.length <= start:
                continue
            feats = self.features.get(image.digest)
            if feats is None:
                feats = self._stored_features(image)
            if feats is None:
                tiles = image.tiles()
                began = self.clock.mark()
                feats = self.runner.encode_image(tiles)
                r.time_stage("vision_s", began, self.clock.mark())
                r.stats.images_encoded += 1
                if feats.shape[0] != image.length:
                    raise PromptError(
                        f"an image gives {feats.shape[0]} feature rows but its prompt block has "
                        f"{image.length} <IMG_CONTEXT> tokens"
                    )
                self.features.put(image.digest, feats)
                if self.store is not None:
                    self.store.put_async(image.digest, feats)
            yield image, feats

    def _stored_features(self, image) -> torch.Tensor | None:
        """The image's features from the disk tier (then kept in memory too), or None."""
        if self.store is None:
            return None
        feats = self.store.get(image.digest, self.model.device)
        if feats is None or feats.shape[0] != image.length or feats.dtype != self.model.dtype:
            return None
        self.features.put(image.digest, feats)
        return feats

    # ---- decode ------------------------------------------------------------------------------------------
    def _decode(self, batch: list[Request]) -> None:
        step_began = time.perf_counter()
        fed: list[tuple[Request, DecodeRow]] = []
        for r in batch:
            if r not in self.scheduler.running:  # preempted to make room for another row of this batch
                continue
            slots = self.scheduler.slots(r, 1)
            if slots is not None:
                fed.append(
                    (
                        r,
                        DecodeRow(
                            r.output_ids[-1],
                            r.num_computed,
                            r.seq.block_ids,
                            slots[0],
                            rope_length=r.num_computed + 1 + r.rope_offset,
                        ),
                    )
                )
        fed = [
            (r, row) for r, row in fed if r in self.scheduler.running
        ]  # a later row's room may have preempted it
        if not fed:
            return
        rows = [row for _, row in fed]
        self.runner.fill(rows)
        masks = self.masks.start([(r.constraint, r.slot) for r, _ in fed if r.constraint is not None])
        device_began = time.perf_counter()
        logits = self.runner.forward(rows)
        self.masks.wait(masks)  # written while the forward ran
        step = self.sampler.step(logits, [r.slot for r, _ in fed])
        # the step's one device read: the host waits for the device here
        new_tokens, logprobs = step.to_host()
        self.timing.device_s += time.perf_counter() - device_began
        for i, ((r, _), token) in enumerate(zip(fed, new_tokens)):
            r.num_computed += 1
            self.scheduler.register(r)
            self._accept(r, token, step.scores[i] if r.output_scores else None, logprobs[i])
        self.timing.steps += 1
        self.timing.rows += len(fed)
        self.timing.step_s += time.perf_counter() - step_began

    def _accept(self, r: Request, token: int, scores: torch.Tensor | None, logprobs=None) -> None:
        r.deliver(token, scores, logprobs)
        grammar_done = False
        if r.constraint is not None:
            if not r.constraint.accept(token):
                self.scheduler.end(
                    r, PyvlError(f"the answer's grammar refused token {token}: {r.constraint.error}")
                )
                return
            grammar_done = r.constraint.complete
        total = len(r.prompt_ids) + len(r.output_ids)
        if (
            token in r.stop_ids
            or grammar_done
            or len(r.output_ids) >= r.gen.max_new_tokens
            or total >= self.config.max_context
        ):
            self.scheduler.end(r)


def _serve(ref: weakref.ref[Engine]) -> None:
    """The engine thread: steps while the engine exists and is open."""
    with torch.inference_mode():
        while True:
            engine = ref()
            if engine is None or not engine._serve_once(timeout=0.5):
                return
            del engine  # hold it only during a step


def _shutdown(ref: weakref.ref[Engine]) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()
