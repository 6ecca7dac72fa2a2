"""The user-facing model object: the original InternVL ``chat`` API on top of pyvl's engine.

``InternVLChat`` bundles the network, the tokenizer, the chat template and the engine. Prompt building follows
the original ``chat()``/``batch_chat()`` exactly (pyvl.template); every generation is a request to the model's
engine (pyvl.engine), which batches concurrent calls, reuses cached prefixes and image features, and samples as
HF ``generate`` does. Thread-safe: calls from several threads are decoded together, each its own.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import checks, template
from .config import ModelConfig
from .engine.features import tiles_digest
from .engine.request import ChatStats, ImageInput, Request
from .engine.scheduler import Engine
from .errors import PromptError
from .generate import GenerationConfig
from .image import image_to_tiles, is_raw_image
from .kv_cache import BLOCK_SIZE, PagedBatch, PagedKVCache
from .models.vlm import InternVLChatModel
from .tokenizer import Tokenizer

__all__ = ["InternVLChat", "ChatStats"]

History = list[tuple[str, str]]


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of ``token`` in ``ids``."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


class InternVLChat:
    """A loaded InternVL 1.5 model. Build it with :func:`pyvl.load`."""

    def __init__(self, model: InternVLChatModel, tokenizer: Tokenizer, config: ModelConfig, folder: Path,
                 max_context: int, stop_ids: tuple[int, ...], engine: Engine):
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

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ---- prompts -------------------------------------------------------------------------------------
    def build_query(self, question: str, num_patches_list: Sequence[int] | None = None,
                    history: History | None = None, system_message: str | None = None) -> str:
        """The exact prompt string the original ``chat()`` tokenizes, image tokens expanded."""
        checks.text(question, "question", PromptError)
        checks.history(history)
        if system_message is not None:
            checks.text(system_message, "system_message", PromptError)
        return template.build_query(question, num_patches_list=checks.patch_counts(num_patches_list),
                                    history=history, system_message=self.system_message if system_message is None
                                    else system_message, num_image_token=self.num_image_token)

    def tile_images(self, images, max_num: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Raw image(s) -> (tiles [N, 3, S, S], tiles per image), with the model's tiling settings (``max_num``
        overrides max_dynamic_patch), preprocessed on the model's device in its dtype by its resize_tiles op."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise PromptError("tile_images needs at least one image, got an empty list")
        cfg = self.config
        tiles = [image_to_tiles(item, self.model.ops.resize_tiles,
                                max_num=cfg.max_dynamic_patch if max_num is None else max_num,
                                min_num=cfg.min_dynamic_patch, image_size=cfg.image_size,
                                use_thumbnail=cfg.use_thumbnail, dtype=self.dtype, device=self.device)
                 for item in items]
        return torch.cat(tiles), [t.shape[0] for t in tiles]

    def _raw_images_to_tiles(self, images, num_patches_list) -> tuple[torch.Tensor, list[int]]:
        """Raw image(s) -> tiles, one <image> block per image; num_patches_list, if given, must agree."""
        tiles, patches = self.tile_images(images)
        if num_patches_list is not None and checks.patch_counts(num_patches_list) != patches:
            raise PromptError(f"num_patches_list {list(num_patches_list)} does not match the tiles the images "
                              f"produce ({patches}); leave it out when passing raw images")
        return tiles, patches

    def _prepare_images(self, pixel_values, num_patches_list) -> tuple[torch.Tensor | None, list[int]]:
        if is_raw_image(pixel_values) or (isinstance(pixel_values, (list, tuple)) and pixel_values
                                          and all(is_raw_image(p) for p in pixel_values)):
            return self._raw_images_to_tiles(pixel_values, num_patches_list)
        if pixel_values is None:
            if num_patches_list:
                raise PromptError(f"num_patches_list {list(num_patches_list)} was given without pixel_values")
            return None, []
        if isinstance(pixel_values, (list, tuple)) and not pixel_values:
            raise PromptError("pixel_values is an empty list; pass None for a text-only prompt")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise PromptError(f"pixel_values must be a [tiles, 3, {self.config.image_size}, "
                              f"{self.config.image_size}] tensor (see pyvl.load_image), raw image(s) (path, "
                              f"bytes, PIL image, HWC uint8 array, or a list of them), or None; got {shape}")
        expected = (3, self.config.image_size, self.config.image_size)
        if tuple(pixel_values.shape[1:]) != expected or pixel_values.shape[0] == 0:
            raise PromptError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                              f"[tiles >= 1, {', '.join(map(str, expected))}]")
        checks.pixel_tensor(pixel_values)
        patches = [pixel_values.shape[0]] if num_patches_list is None else checks.patch_counts(num_patches_list)
        if not patches or sum(patches) != pixel_values.shape[0]:
            raise PromptError(f"num_patches_list {patches} must hold positive counts summing to the "
                              f"{pixel_values.shape[0]} tiles of pixel_values")
        return pixel_values, patches

    def _check_context(self, n_prompt: int) -> None:
        if n_prompt >= self.max_context:
            raise PromptError(f"the prompt has {n_prompt} tokens but the context holds {self.max_context} "
                              "(prompt plus at least one new token); shorten it, use fewer tiles (max_num), "
                              "or load with a larger max_context")

    def _new_cache(self, num_tokens: int) -> PagedKVCache:
        """A private KV cache for one prompt of num_tokens (logits()), once it is known to fit in memory."""
        llm = self.config.llm
        blocks = -(-num_tokens // BLOCK_SIZE)
        checks.check_kv_cache_fits(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim,
                                   blocks * BLOCK_SIZE, 1, self.dtype, self.device, error=PromptError)
        return PagedKVCache(llm.num_hidden_layers, blocks, llm.num_key_value_heads, llm.head_dim, self.dtype,
                            self.device)

    def _token_rows(self, input_ids, name: str = "input_ids") -> list[list[int]]:
        return checks.token_rows(input_ids, name, self.config.llm.vocab_size)

    # ---- forward passes ------------------------------------------------------------------------------
    @torch.inference_mode()
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, 448, 448] tiles -> [N, 256, llm_hidden] image embeddings."""
        pixel_values, _ = self._prepare_images(pixel_values, None)
        return self.model.extract_feature(pixel_values)

    @torch.inference_mode()
    def logits(self, input_ids, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [S, vocab] of one prompt (1-D or [1, S] ids), images spliced in."""
        rows = self._token_rows(input_ids)
        if len(rows) != 1:
            raise PromptError(f"input_ids must be one non-empty prompt (1-D or [1, S]), got {len(rows)} rows")
        ids = torch.tensor(rows[0], dtype=torch.long, device=self.device)
        if ids.numel() > self.max_context:
            raise PromptError(f"input_ids has {ids.numel()} tokens; the context holds {self.max_context}")
        feats = None if pixel_values is None else self.extract_feature(pixel_values)
        embeds = self.model.embed(ids[None], feats, self.img_context_token_id)
        cache = self._new_cache(ids.numel())
        positions = torch.arange(ids.numel(), device=self.device)[None]
        hidden = self.model.language_model(embeds, positions, PagedBatch.contiguous_prefill(cache, ids.numel()))
        return self.model.language_model.lm_head(hidden[0])

    # ---- generation ----------------------------------------------------------------------------------
    def _image_inputs(self, prompts: list[list[int]], pixel_values: torch.Tensor | None) -> list[list[ImageInput]]:
        """Each prompt's images: every run of <IMG_CONTEXT> tokens, in prompt order across the prompts, takes the
        next run-length / num_image_token tiles of pixel_values (the original splices them in that order)."""
        runs = [[(start, n) for start, n in _runs(ids, self.img_context_token_id)] for ids in prompts]
        total = sum(n for row in runs for _, n in row)
        tiles = 0 if pixel_values is None else pixel_values.shape[0]
        if total != tiles * self.num_image_token or any(n % self.num_image_token for row in runs for _, n in row):
            raise PromptError(f"the prompt has {total} <IMG_CONTEXT> tokens but the images give "
                              f"{tiles * self.num_image_token} feature rows ({self.num_image_token} per tile); "
                              "they must be equal")
        images, used = [], 0
        for row in runs:
            images.append([])
            for start, n in row:
                part = pixel_values[used:used + n // self.num_image_token]
                used += part.shape[0]
                images[-1].append(ImageInput(tiles_digest(part), start, n, functools.partial(lambda t: t, part)))
        return images

    def _submit(self, prompt: list[int], images: list[ImageInput], gen: GenerationConfig, output_scores: bool,
                stats: ChatStats | None, started_at: float, rope_offset: int) -> Request:
        self._check_context(len(prompt))
        stop = gen.eos_token_id if gen.eos_token_id is not None else self.stop_ids
        request = Request(prompt, images, gen, frozenset(stop), output_scores=output_scores, stats=stats,
                          started_at=started_at, rope_offset=rope_offset)
        if gen.max_new_tokens == 0:  # nothing to generate: the original returns no token either
            request.finish()
            return request
        return self.engine.submit(request)

    def _requests(self, prompts: list[list[int]], pixel_values, generation_config, started_at: float,
                  output_scores: bool = False, stats: ChatStats | None = None) -> list[Request]:
        gen = GenerationConfig.from_user(generation_config)
        for prompt in prompts:
            self._check_context(len(prompt))
        longest = max(len(p) for p in prompts)  # the original's padded batch width (see Request.rope_offset)
        return [self._submit(p, images, gen, output_scores, stats if len(prompts) == 1 else None, started_at,
                             longest - len(p))
                for p, images in zip(prompts, self._image_inputs(prompts, pixel_values))]

    def generate(self, input_ids, pixel_values: torch.Tensor | None = None, generation_config=None,
                 output_scores: bool = False, stats: ChatStats | None = None):
        """Raw generation from token ids: one prompt (list of ints) or several (list of lists, decoded together).

        Returns the new ids [B, T] (stop ids included, pad after a row stops), and with ``output_scores`` also
        the processed float32 scores [B, T, vocab] that chose them (zeros after a row stopped).
        """
        started_at = time.perf_counter()
        prompts = self._token_rows(input_ids)
        checks.boolean(output_scores, "output_scores", PromptError)
        if pixel_values is not None:
            pixel_values, _ = self._prepare_images(pixel_values, None)
        requests = self._requests(prompts, pixel_values, generation_config, started_at, output_scores, stats)
        outputs = [r.result() for r in requests]
        width = max(len(o) for o in outputs)
        ids = torch.tensor([o + [self.tokenizer.pad_id] * (width - len(o)) for o in outputs], dtype=torch.long)
        if not output_scores:
            return ids
        if not width:
            return ids, None
        vocab = self.config.llm.vocab_size
        scores = torch.zeros(len(outputs), width, vocab)
        for row, r in enumerate(requests):
            if r.scores:
                scores[row, :len(r.scores)] = torch.stack(r.scores).cpu()
        return ids, scores

    def _response(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.split(template.SEP)[0].strip()

    def _single_query(self, pixel_values, question, history, num_patches_list, system_message=None):
        """(tiles, prompt, question as asked) for one chat turn; system_message None: the model's."""
        checks.text(question, "question", PromptError)
        checks.history(history)
        if system_message is not None:
            checks.text(system_message, "system_message", PromptError)
        raw_list = isinstance(pixel_values, (list, tuple)) and len(pixel_values) > 1
        pixel_values, patches = self._prepare_images(pixel_values, num_patches_list)
        if raw_list and history is None and template.IMAGE_PLACEHOLDER not in question:
            # a list of raw images and no placeholder: label each image, as InternVL's multi-image examples do
            question = "".join(f"Image-{i + 1}: {template.IMAGE_PLACEHOLDER}\n" for i in range(len(patches))) + question
        query = template.build_query(question, num_patches_list=patches, history=history,
                                     system_message=self.system_message if system_message is None
                                     else system_message, num_image_token=self.num_image_token)
        return pixel_values, query, question

    def chat(self, pixel_values, question: str, generation_config=None, history: History | None = None,
             return_history: bool = False, num_patches_list: Sequence[int] | None = None,
             stats: ChatStats | None = None, system_message: str | None = None):
        """Answer ``question`` about the tiles in ``pixel_values`` (or text only when None). ``stats``, when
        given, is filled with this call's figures (prompt and cached tokens, images encoded, timings).
        ``system_message`` replaces the model's default system prompt for this call only."""
        started_at = time.perf_counter()
        checks.boolean(return_history, "return_history", PromptError)
        GenerationConfig.from_user(generation_config)  # bad settings fail before the images are tiled
        pixel_values, query, question = self._single_query(pixel_values, question, history, num_patches_list,
                                                           system_message)
        (request,) = self._requests([self.tokenizer.encode(query)], pixel_values, generation_config, started_at,
                                    stats=stats)
        response = self._response(request.result())
        if not return_history:
            return response
        asked = template.effective_question(question, has_images=pixel_values is not None, history=history)
        return response, list(history or []) + [(asked, response)]

    def stream(self, pixel_values, question: str, generation_config=None, history: History | None = None,
               num_patches_list: Sequence[int] | None = None, stats: ChatStats | None = None,
               system_message: str | None = None) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated; ''.join(pieces) == chat(...). Closing the
        generator early cancels the request (its KV blocks are freed at once)."""
        started_at = time.perf_counter()
        GenerationConfig.from_user(generation_config)  # bad settings fail before the images are tiled
        pixel_values, query, _ = self._single_query(pixel_values, question, history, num_patches_list,
                                                    system_message)
        (request,) = self._requests([self.tokenizer.encode(query)], pixel_values, generation_config, started_at,
                                    stats=stats)
        decoder = self.tokenizer.stream_decoder()
        pending = ""  # whitespace held back: chat() strips both ends, so must the stream
        started = False
        for token in request.stream_tokens():
            if token in request.stop_ids:
                break
            text = pending + decoder.push(token)
            if not started:
                text = text.lstrip()
                started = bool(text)
            body = text.rstrip()
            pending = text[len(body):]
            if body:
                yield body
        tail = (pending + decoder.flush()).rstrip()
        if not started:
            tail = tail.lstrip()
        if tail:
            yield tail

    def batch_chat(self, pixel_values, questions: Sequence[str], generation_config=None,
                   num_patches_list: Sequence[int] | None = None, history=None, return_history: bool = False
                   ) -> list[str]:
        """One question per image (``num_patches_list[k]`` tiles for question k), answered together."""
        started_at = time.perf_counter()
        if history is not None or return_history:
            raise PromptError("batch_chat does not support history/return_history (nor does the original)")
        if not isinstance(questions, (list, tuple)):
            hint = "; wrap a single question in a list" if isinstance(questions, str) else ""
            raise PromptError(f"batch_chat: questions must be a list of str (one per image), got "
                              f"{type(questions).__name__}{hint}")
        questions = [checks.text(q, f"questions[{k}]", PromptError) for k, q in enumerate(questions)]
        if not questions:
            raise PromptError("batch_chat needs at least one question")
        GenerationConfig.from_user(generation_config)
        if pixel_values is None:
            patches = [0] * len(questions)
        else:
            pixel_values, patches = self._prepare_images(pixel_values, num_patches_list)
            if len(patches) != len(questions):
                raise PromptError(f"batch_chat got {len(questions)} questions but num_patches_list has "
                                  f"{len(patches)} images; give one image per question")
        queries = [template.build_query(q, num_patches_list=[n] if n else None, history=None,
                                        system_message=self.system_message,
                                        num_image_token=self.num_image_token)
                   for q, n in zip(questions, patches)]
        requests = self._requests([self.tokenizer.encode(q) for q in queries], pixel_values, generation_config,
                                  started_at)
        return [self._response(r.result()) for r in requests]
