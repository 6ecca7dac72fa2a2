"""The user-facing model object: the original InternVL ``chat`` API, and its async twins, on pyvl's engine.

``InternVLChat`` bundles the network, the tokenizer and the engine. Every call goes through the one front door
(pyvl.prompt: ids and keyed images, nothing tiled), tiles only the images the engine's caches lack, and is then a
request to the model's engine (pyvl.engine), which batches concurrent calls, reuses cached prefixes and image
features, and samples as HF ``generate`` does. Thread-safe, and ``achat`` / ``astream`` await the engine without
a thread per call: calls from any number of threads and tasks are decoded together, each its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from . import checks, template
from .config import ModelConfig
from .engine.constraints import Grammars
from .engine.engine import Engine
from .engine.request import ChatStats, ImageInput, Request
from .errors import ConfigError, PromptError
from .generation_config import GenerationConfig
from .image import image_to_tiles
from .models.vlm import InternVLChatModel
from .prompt import Prompt, PromptBuilder, image_runs
from .results import ChatResult
from .text_stream import ByteTextStream, TextStream
from .tokenizer import Tokenizer

__all__ = ["InternVLChat", "ChatStats", "ChatResult"]

History = list[tuple[str, str]]


class InternVLChat:
    """A loaded InternVL 1.5 model. Build it with :func:`pyvl.load`."""

    def __init__(
        self,
        model: InternVLChatModel,
        tokenizer: Tokenizer,
        config: ModelConfig,
        folder: Path,
        max_context: int,
        stop_ids: tuple[int, ...],
        engine: Engine,
    ):
        self.model = model
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.folder = folder
        self.max_context = max_context
        self.stop_ids = stop_ids  # default stop set: <|im_end|>, as the original chat() forces
        self.system_message = config.system_message or template.DEFAULT_SYSTEM_MESSAGE
        self.num_image_token = config.num_image_token
        self.img_context_token_id = tokenizer.img_context_id
        self.prompts = PromptBuilder(tokenizer, config, model.ops.resize_tiles, model.device, model.dtype)
        # structured output: a grammar may end the answer with the chat stop id or the tokenizer's EOS
        self.grammars = Grammars(tokenizer, (*stop_ids, tokenizer.eos_id))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def close(self) -> None:
        """Stop the engine (requests still running fail with a PyvlError) and, under tensor parallelism, end the
        worker processes. Idempotent; garbage collection and the interpreter's exit do the same."""
        self.engine.shutdown()

    def __enter__(self) -> InternVLChat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---- prompts -------------------------------------------------------------------------------------
    def build_query(
        self,
        question: str,
        num_patches_list: Sequence[int] | None = None,
        history: History | None = None,
        system_message: str | None = None,
    ) -> str:
        """The exact prompt string the original ``chat()`` tokenizes, image tokens expanded."""
        checks.text(question, "question", PromptError)
        checks.history(history)
        if system_message is not None:
            checks.text(system_message, "system_message", PromptError)
        return template.build_query(
            question,
            num_patches_list=checks.patch_counts(num_patches_list),
            history=history,
            system_message=self._system(system_message),
            num_image_token=self.num_image_token,
        )

    def tile_images(self, images, max_num: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Raw image(s) -> (tiles [N, 3, S, S], tiles per image), with the model's tiling settings (``max_num``
        overrides max_dynamic_patch), preprocessed on the model's device in its dtype by its resize_tiles op."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise PromptError("tile_images needs at least one image, got an empty list")
        cfg = self.config
        tiles = [
            image_to_tiles(
                item,
                self.model.ops.resize_tiles,
                max_num=cfg.max_dynamic_patch if max_num is None else max_num,
                min_num=cfg.min_dynamic_patch,
                image_size=cfg.image_size,
                use_thumbnail=cfg.use_thumbnail,
                dtype=self.dtype,
                device=self.device,
            )
            for item in items
        ]
        return torch.cat(tiles), [t.shape[0] for t in tiles]

    def _system(self, system_message: str | None) -> str:
        return self.system_message if system_message is None else system_message

    def prompt(
        self,
        question: str,
        sources,
        history: History | None = None,
        system_message: str | None = None,
        label_images: bool = False,
    ) -> Prompt:
        """One chat turn through the front door (``sources`` from ``self.prompts``), with the images the
        engine's caches lack tiled now, in the caller's thread, so that the engine thread never decodes one.
        Blocking (file reads, hashing, tiling on a miss): async callers run it in a worker thread."""
        if system_message is not None:
            checks.text(system_message, "system_message", PromptError)
        prompt = self.prompts.build(question, sources, history, self._system(system_message), label_images)
        for source in prompt.to_tile(self.engine.has_features):
            source.tiles()
        return prompt

    def _turn(
        self, pixel_values, question, history, num_patches_list, system_message, max_num: int | None = None
    ) -> Prompt:
        sources = self.prompts.sources(pixel_values, num_patches_list, max_num)
        return self.prompt(
            question, sources, history, system_message, label_images=isinstance(pixel_values, (list, tuple))
        )

    def _check_context(self, n_prompt: int) -> None:
        if n_prompt >= self.max_context:
            raise PromptError(
                f"the prompt has {n_prompt} tokens but the context holds {self.max_context} "
                "(prompt plus at least one new token); shorten it, use fewer tiles (max_num), "
                "or load with a larger max_context"
            )

    def _token_rows(self, input_ids, name: str = "input_ids") -> list[list[int]]:
        return checks.token_rows(input_ids, name, self.config.llm.vocab_size)

    # ---- forward passes ------------------------------------------------------------------------------
    @torch.inference_mode()
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, 448, 448] tiles -> [N, 256, llm_hidden] image embeddings."""
        self.prompts.check_tiles(pixel_values)
        rows = self.engine.runner.encode_image(pixel_values)  # under tensor parallelism, on every rank
        return rows.view(pixel_values.shape[0], -1, rows.shape[-1])

    def logits(self, input_ids, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [S, vocab] of one prompt (1-D or [1, S] ids), images spliced in: a request to the
        engine, prefilled in chunks on its KV pool (image features from its cache when it has them)."""
        started_at = time.perf_counter()
        rows = self._token_rows(input_ids)
        if len(rows) != 1:
            raise PromptError(f"input_ids must be one non-empty prompt (1-D or [1, S]), got {len(rows)} rows")
        if len(rows[0]) > self.max_context:
            raise PromptError(f"input_ids has {len(rows[0])} tokens; the context holds {self.max_context}")
        (images,) = self._spliced_images(rows, pixel_values)
        request = Request(
            rows[0],
            images,
            GenerationConfig(max_new_tokens=0),
            frozenset(),
            started_at=started_at,
            prompt_logits=True,
        )
        self.engine.submit(request).result()
        return torch.cat(request.logits)

    # ---- generation ----------------------------------------------------------------------------------
    def _submit(
        self,
        prompt: list[int],
        images: list[ImageInput],
        gen: GenerationConfig,
        output_scores: bool,
        stats: ChatStats | None,
        started_at: float,
        rope_offset: int = 0,
    ) -> list[Request]:
        """The requests of one call, choice i seeded with seed + i, handed to the engine (choice 0 prefills the
        prompt; the others start from its KV blocks)."""
        self._check_context(len(prompt))
        gen.check_vocab(self.config.llm.vocab_size)
        if gen.n > self.engine.config.max_num_seqs:
            raise ConfigError(
                f"generation_config n={gen.n}: the engine decodes at most max_num_seqs="
                f"{self.engine.config.max_num_seqs} sequences at once; ask for fewer choices"
            )
        stop = frozenset(gen.eos_token_id if gen.eos_token_id is not None else self.stop_ids)
        constraint = self.grammars.constraint(gen) if gen.constrained else None
        requests = []
        for i in range(gen.n):
            seed = None if gen.seed is None else (gen.seed + i) % 2**63
            request = Request(
                prompt,
                images,
                gen if i == 0 else replace(gen, seed=seed),
                stop,
                output_scores=output_scores,
                stats=stats if i == 0 else None,
                started_at=started_at,
                rope_offset=rope_offset,
                constraint=constraint if i == 0 or constraint is None else constraint.copy(),
            )
            request.choice = i
            requests.append(request)
        if gen.max_new_tokens == 0:  # nothing to generate: the original returns no token either
            for request in requests:
                request.finish()
            return requests
        requests[0].followers = requests[1:]
        self.engine.submit(requests[0])
        return requests

    @staticmethod
    def _one(gen: GenerationConfig, call: str) -> GenerationConfig:
        """ConfigError unless gen asks for what ``call`` returns: one answer, and no logprobs left unread."""
        if gen.n > 1 or gen.logprobs:
            asked = f"n={gen.n}" if gen.n > 1 else "logprobs=True"
            raise ConfigError(
                f"generation_config {asked}: {call} returns one answer's text; pass result=pyvl.ChatResult() to "
                "chat/achat to receive every choice and the logprobs"
            )
        return gen

    def generate(
        self,
        input_ids,
        pixel_values: torch.Tensor | None = None,
        generation_config=None,
        output_scores: bool = False,
        stats: ChatStats | None = None,
    ):
        """Raw generation from token ids: one prompt (list of ints) or several (list of lists, decoded together).
        Each run of <IMG_CONTEXT> ids, in prompt order across the prompts, takes the next run-length / 256 tiles
        of ``pixel_values`` (the original splices them in that order).

        Returns the new ids [B, T] (stop ids included, pad after a row stops), and with ``output_scores`` also
        the processed float32 scores [B, T, vocab] that chose them (zeros after a row stopped).
        """
        started_at = time.perf_counter()
        prompts = self._token_rows(input_ids)
        checks.boolean(output_scores, "output_scores", PromptError)
        gen = self._one(GenerationConfig.from_user(generation_config), "generate")
        for prompt in prompts:
            self._check_context(len(prompt))
        images = self._spliced_images(prompts, pixel_values)
        longest = max(len(p) for p in prompts)  # the original's padded batch width (see Request.rope_offset)
        requests = [
            self._submit(
                p,
                imgs,
                gen,
                output_scores,
                stats if len(prompts) == 1 else None,
                started_at,
                longest - len(p),
            )[0]
            for p, imgs in zip(prompts, images)
        ]
        outputs = [r.result() for r in requests]
        width = max(len(o) for o in outputs)
        ids = torch.tensor(
            [o + [self.tokenizer.pad_id] * (width - len(o)) for o in outputs], dtype=torch.long
        )
        if not output_scores:
            return ids
        if not width:
            return ids, None
        scores = torch.zeros(len(outputs), width, self.config.llm.vocab_size)
        for row, r in enumerate(requests):
            if r.scores:
                scores[row, : len(r.scores)] = torch.stack(r.scores).cpu()
        return ids, scores

    def _spliced_images(self, prompts: list[list[int]], pixel_values) -> list[list[ImageInput]]:
        runs = [image_runs(ids, self.img_context_token_id) for ids in prompts]
        counts = [n // self.num_image_token for row in runs for _, n in row]
        if pixel_values is not None:
            self.prompts.check_tiles(pixel_values)
        tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if sum(n for row in runs for _, n in row) != tiles * self.num_image_token or any(
            n % self.num_image_token for row in runs for _, n in row
        ):
            raise PromptError(
                f"the prompt has {sum(n for row in runs for _, n in row)} <IMG_CONTEXT> tokens but "
                f"the images give {tiles * self.num_image_token} feature rows "
                f"({self.num_image_token} per tile); they must be equal"
            )
        sources = self.prompts.tiles(pixel_values, counts) if counts else []
        images, used = [], 0
        for ids, row in zip(prompts, runs):
            images.append(self.prompts.image_inputs(ids, sources[used : used + len(row)]))
            used += len(row)
        return images

    def _response(self, request: Request) -> str:
        """The answer's text, as the original chat() makes it (the raw text under a grammar: text_stream)."""
        ids = request.result()
        if request.constraint is not None:
            text = self.text_stream(request)
            return "".join(text.push(token) for token in ids) + text.finish()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.split(template.SEP)[0].strip()

    def _answers(self, requests: list[Request], result: ChatResult | None) -> str:
        """The first choice's text; every choice into ``result`` when given."""
        texts = [self._response(r) for r in requests]
        if result is not None:
            result.fill(requests, texts, self.tokenizer)
        return texts[0]

    def _history(self, prompt: Prompt, response: str, history: History | None) -> History:
        return list(history or []) + [(prompt.question, response)]

    def text_stream(
        self, request: Request, stop_strings: Sequence[str] = (), raw: bool = False
    ) -> TextStream:
        """The text side of a request's answer (its stop ids, and ``stop_strings``), for :meth:`atext`: the
        original chat()'s text, or with ``raw`` (and always under a grammar, whose bytes it is) the tokens' bytes
        as they are (pyvl.text_stream.ByteTextStream)."""
        kind = ByteTextStream if raw or request.constraint is not None else TextStream
        return kind(self.tokenizer, request.stop_ids, stop_strings)

    def chat(
        self,
        pixel_values,
        question: str,
        generation_config=None,
        history: History | None = None,
        return_history: bool = False,
        num_patches_list: Sequence[int] | None = None,
        stats: ChatStats | None = None,
        system_message: str | None = None,
        result: ChatResult | None = None,
    ):
        """Answer ``question`` about ``pixel_values``: tiles from ``load_image`` (``num_patches_list`` splits them
        into images), raw image(s) (a path, bytes, PIL image, uint8 array, or a list of them: keyed by their
        bytes or pixels and tiled only if the model has not seen them), or None for text only. ``stats``, when
        given, is filled with this call's figures. ``system_message`` replaces the model's default for this call.
        ``result``, a :class:`pyvl.ChatResult`, receives every choice (``n``) and the logprobs; the return value
        stays the (first) answer."""
        started_at = time.perf_counter()
        checks.boolean(return_history, "return_history", PromptError)
        gen = self._checked(generation_config, result)  # bad settings fail before any image is read
        prompt = self._turn(pixel_values, question, history, num_patches_list, system_message)
        requests = self._submit(prompt.ids, prompt.images, gen, False, stats, started_at)
        response = self._answers(requests, result)
        return (response, self._history(prompt, response, history)) if return_history else response

    def _checked(self, generation_config, result: ChatResult | None) -> GenerationConfig:
        gen = GenerationConfig.from_user(generation_config)
        if result is None:
            return self._one(gen, "chat")
        if not isinstance(result, ChatResult):
            raise ConfigError(f"result must be a pyvl.ChatResult, got {type(result).__name__}")
        return gen

    def stream(
        self,
        pixel_values,
        question: str,
        generation_config=None,
        history: History | None = None,
        num_patches_list: Sequence[int] | None = None,
        stats: ChatStats | None = None,
        system_message: str | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated; ''.join(pieces) == chat(...). Closing the
        generator early cancels the request (its KV blocks are freed at once)."""
        started_at = time.perf_counter()
        gen = self._one(GenerationConfig.from_user(generation_config), "stream")
        prompt = self._turn(pixel_values, question, history, num_patches_list, system_message)
        (request,) = self._submit(prompt.ids, prompt.images, gen, False, stats, started_at)
        text = self.text_stream(request)
        tokens = request.stream_tokens()
        try:
            for token in tokens:
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    return
            tail = text.finish()
            if tail:
                yield tail
        finally:
            tokens.close()  # cancels the request if it is still running

    async def achat(
        self,
        pixel_values,
        question: str,
        generation_config=None,
        history: History | None = None,
        return_history: bool = False,
        num_patches_list: Sequence[int] | None = None,
        stats: ChatStats | None = None,
        system_message: str | None = None,
        result: ChatResult | None = None,
    ):
        """``chat`` for asyncio: awaits the engine on the running loop (images are read and, on a cache miss,
        tiled in a worker thread). Cancelling the task cancels the request (every choice)."""
        checks.boolean(return_history, "return_history", PromptError)
        gen = self._checked(generation_config, result)
        prompt, requests = await self._asubmit(
            pixel_values, question, gen, history, num_patches_list, stats, system_message
        )
        texts = await asyncio.gather(*(self._atext_whole(r) for r in requests))
        if result is not None:
            result.fill(requests, list(texts), self.tokenizer)
        response = texts[0]
        return (response, self._history(prompt, response, history)) if return_history else response

    async def astream(
        self,
        pixel_values,
        question: str,
        generation_config=None,
        history: History | None = None,
        num_patches_list: Sequence[int] | None = None,
        stats: ChatStats | None = None,
        system_message: str | None = None,
    ) -> AsyncIterator[str]:
        """``stream`` for asyncio: ``async for piece in model.astream(...)``; no thread waits for the tokens.
        Closing the iterator (or cancelling its task) cancels the request."""
        gen = self._one(GenerationConfig.from_user(generation_config), "astream")
        _, (request,) = await self._asubmit(
            pixel_values, question, gen, history, num_patches_list, stats, system_message
        )
        async for piece in self.atext(request):
            yield piece

    async def _atext_whole(self, request: Request) -> str:
        return "".join([piece async for piece in self.atext(request)])

    async def _asubmit(
        self, pixel_values, question, gen: GenerationConfig, history, num_patches_list, stats, system_message
    ) -> tuple[Prompt, list[Request]]:
        started_at = time.perf_counter()
        prompt = await asyncio.to_thread(
            self._turn, pixel_values, question, history, num_patches_list, system_message
        )
        return prompt, self.submit_choices(prompt, gen, stats, started_at)

    def submit(
        self,
        prompt: Prompt,
        generation_config=None,
        stats: ChatStats | None = None,
        started_at: float | None = None,
    ) -> Request:
        """Hand a front-door prompt (:meth:`prompt`) to the engine; read the answer with :meth:`atext` (or the
        request's own ``stream_tokens`` / ``result``). ``started_at``: the call's start, for its stats."""
        gen = GenerationConfig.from_user(generation_config)
        if gen.n > 1:
            raise ConfigError(f"generation_config n={gen.n}: submit makes one request; use submit_choices")
        (request,) = self.submit_choices(prompt, gen, stats, started_at)
        return request

    def submit_choices(
        self,
        prompt: Prompt,
        generation_config=None,
        stats: ChatStats | None = None,
        started_at: float | None = None,
    ) -> list[Request]:
        """:meth:`submit` for any ``n``: one request per choice (their logprobs in ``request.logprobs`` when
        asked for); ``stats`` is choice 0's. The prompt is prefilled once and shared."""
        gen = GenerationConfig.from_user(generation_config)
        return self._submit(
            prompt.ids,
            prompt.images,
            gen,
            False,
            stats,
            time.perf_counter() if started_at is None else started_at,
        )

    async def atext(self, request: Request, text: TextStream | None = None) -> AsyncIterator[str]:
        """A submitted request's answer as text pieces, awaited; closing it cancels the request. ``text``: the
        :meth:`text_stream` to use (default: the request's stop ids only), to look at afterwards."""
        text = text or self.text_stream(request)
        batches = request.batches()
        try:
            async for ids in batches:
                piece = "".join(text.push(token) for token in ids)
                if piece:
                    yield piece
                if text.stopped:
                    return
            tail = text.finish()
            if tail:
                yield tail
        finally:
            await batches.aclose()  # cancels the request if it is still running

    def batch_chat(
        self,
        pixel_values,
        questions: Sequence[str],
        generation_config=None,
        num_patches_list: Sequence[int] | None = None,
        history=None,
        return_history: bool = False,
    ) -> list[str]:
        """One question per image (``num_patches_list[k]`` tiles for question k), answered together."""
        started_at = time.perf_counter()
        if history is not None or return_history:
            raise PromptError("batch_chat does not support history/return_history (nor does the original)")
        if not isinstance(questions, (list, tuple)):
            hint = "; wrap a single question in a list" if isinstance(questions, str) else ""
            raise PromptError(
                f"batch_chat: questions must be a list of str (one per image), got "
                f"{type(questions).__name__}{hint}"
            )
        questions = [checks.text(q, f"questions[{k}]", PromptError) for k, q in enumerate(questions)]
        if not questions:
            raise PromptError("batch_chat needs at least one question")
        gen = self._one(GenerationConfig.from_user(generation_config), "batch_chat")
        sources = self.prompts.sources(pixel_values, num_patches_list)
        if pixel_values is not None and len(sources) != len(questions):
            raise PromptError(
                f"batch_chat got {len(questions)} questions but num_patches_list has "
                f"{len(sources)} images; give one image per question"
            )
        prompts = [
            self.prompts.build(q, sources[k : k + 1], None, self.system_message)
            for k, q in enumerate(questions)
        ]
        for prompt in prompts:
            self._check_context(len(prompt.ids))
        longest = max(
            len(p.ids) for p in prompts
        )  # the original's padded batch width (see Request.rope_offset)
        requests = [
            self._submit(p.ids, p.images, gen, False, None, started_at, longest - len(p.ids))[0]
            for p in prompts
        ]
        return [self._response(r) for r in requests]
