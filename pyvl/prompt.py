"""The one front door: a question, its history, its images and a system message -> token ids + one image input
per image. ``InternVLChat`` (chat, stream, achat, astream, batch_chat), ``pyvl chat`` and ``pyvl serve`` all build
their prompts here, exactly as the original ``chat()`` does (pyvl.template), and none of them tiles an image:

    image (path, bytes, PIL, array)  -> ImageSource: key + tile count from the header or pixels, tiles on demand
    tiles tensor (pixel_values)       -> one ImageSource per image (num_patches_list), keyed once per tensor
    question + history + sources      -> Prompt: token ids, the ImageInputs the engine splices in, the question as
                                         the history records it

The builder is handed what it needs (tokenizer, config, the model's ``resize_tiles`` op, device and dtype) and
knows nothing of the engine; the caller asks the engine which images it must tile (:meth:`Prompt.to_tile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import checks, template
from .config import ModelConfig
from .engine.request import ImageInput
from .errors import PromptError
from .image import IMAGENET_MEAN, IMAGENET_STD, is_raw_image
from .image_input import ImageSource, Tiling, image_source, slice_digest, tensor_digest
from .tokenizer import Tokenizer

__all__ = ["Prompt", "PromptBuilder", "image_runs"]

History = list[tuple[str, str]]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    images: list[ImageInput]  # in prompt order
    sources: list[ImageSource]  # the same images, as given
    question: str  # as the history records it ("<image>\n" prepended on a first turn with images)

    def to_tile(self, has_features) -> list[ImageSource]:
        """The images whose features ``has_features(digest)`` says are not cached: tile them before submitting,
        in the caller's thread, so that the engine thread never decodes an image."""
        return [s for s in self.sources if not s.prepared and not has_features(s.digest)]


def image_runs(ids: list[int], token: int) -> list[tuple[int, int]]:
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


class PromptBuilder:
    def __init__(
        self,
        tokenizer: Tokenizer,
        config: ModelConfig,
        resize_tiles,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.resize_tiles = resize_tiles
        self.device = device
        self.dtype = dtype
        self.num_image_token = config.num_image_token

    # ---- images ------------------------------------------------------------------------------------------
    def tiling(self, max_num: int | None = None) -> Tiling:
        cfg = self.config
        return Tiling(
            max_num=cfg.max_dynamic_patch if max_num is None else max_num,
            min_num=cfg.min_dynamic_patch,
            image_size=cfg.image_size,
            use_thumbnail=cfg.use_thumbnail,
        )

    def image(self, image, max_num: int | None = None) -> ImageSource:
        """A raw image (path, bytes, PIL image, uint8 array), keyed now, tiled on demand by the model's op."""
        tiling = self.tiling(max_num)

        def tile(rgb, cols: int, rows: int) -> torch.Tensor:
            return self.resize_tiles(
                rgb,
                cols,
                rows,
                tiling.image_size,
                tiling.use_thumbnail,
                IMAGENET_MEAN,
                IMAGENET_STD,
                dtype=self.dtype,
                device=self.device,
            )

        return image_source(image, tiling, tile)

    def check_tiles(self, pixel_values, values: bool = True) -> None:
        """PromptError unless ``pixel_values`` is a tiles tensor [N >= 1, 3, S, S] (and, with ``values``, of
        finite values in range)."""
        size = self.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = (
                tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            )
            raise PromptError(
                f"pixel_values must be a [tiles, 3, {size}, {size}] tensor (see pyvl.load_image), "
                "raw image(s) (path, bytes, PIL image, HWC uint8 array, or a list of them), or None; "
                f"got {shape}"
            )
        if tuple(pixel_values.shape[1:]) != (3, size, size) or pixel_values.shape[0] == 0:
            raise PromptError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                f"[tiles >= 1, 3, {size}, {size}]"
            )
        if values:
            checks.pixel_tensor(pixel_values)

    def tiles(self, pixel_values, num_patches_list: Sequence[int] | None) -> list[ImageSource]:
        """Tiles [N, 3, S, S] as the original API takes them, split into images by ``num_patches_list``; the
        values are checked with the digest, once per tensor."""
        self.check_tiles(pixel_values, values=False)
        n = pixel_values.shape[0]
        patches = [n] if num_patches_list is None else checks.patch_counts(num_patches_list)
        if not patches or sum(patches) != n:
            raise PromptError(
                f"num_patches_list {patches} must hold positive counts summing to the {n} tiles of "
                "pixel_values"
            )
        whole, sources, start = tensor_digest(pixel_values, checks.pixel_tensor), [], 0
        for count in patches:
            part = pixel_values[start : start + count]
            sources.append(ImageSource(slice_digest(whole, start, count), count, lambda part=part: part))
            start += count
        return sources

    def sources(
        self, pixel_values, num_patches_list: Sequence[int] | None = None, max_num: int | None = None
    ) -> list[ImageSource]:
        """What ``chat(pixel_values, ...)`` accepts: None, tiles, a raw image or an ImageSource (from
        :meth:`image`, keyed once, e.g. for every turn of a chat), or a list of them."""
        if pixel_values is None:
            if num_patches_list:
                raise PromptError(f"num_patches_list {list(num_patches_list)} was given without pixel_values")
            return []
        items = pixel_values if isinstance(pixel_values, (list, tuple)) else [pixel_values]
        if isinstance(pixel_values, (list, tuple)) and not pixel_values:
            raise PromptError("pixel_values is an empty list; pass None for a text-only prompt")
        if not all(is_raw_image(item) or isinstance(item, ImageSource) for item in items):
            return self.tiles(pixel_values, num_patches_list)
        sources = [item if isinstance(item, ImageSource) else self.image(item, max_num) for item in items]
        counts = [s.num_tiles for s in sources]
        if num_patches_list is not None and checks.patch_counts(num_patches_list) != counts:
            raise PromptError(
                f"num_patches_list {list(num_patches_list)} does not match the tiles the images "
                f"produce ({counts}); leave it out when passing raw images"
            )
        return sources

    # ---- the prompt ----------------------------------------------------------------------------------------
    def build(
        self,
        question: str,
        sources: Sequence[ImageSource],
        history: History | None,
        system_message: str,
        label_images: bool = False,
    ) -> Prompt:
        """One chat turn. ``label_images``: the images came without placeholders (a list of raw images): on a
        first turn whose question has none, each gets its "Image-k: <image>" line (template.with_image_labels)."""
        checks.text(question, "question", PromptError)
        checks.history(history)
        checks.text(system_message, "system_message", PromptError)
        if (
            label_images
            and len(sources) > 1
            and history is None
            and template.IMAGE_PLACEHOLDER not in question
        ):
            question = template.with_image_labels(question, len(sources))
        counts = [s.num_tiles for s in sources]
        query = template.build_query(
            question,
            num_patches_list=counts,
            history=history,
            system_message=system_message,
            num_image_token=self.num_image_token,
        )
        ids = self.tokenizer.encode(query)
        return Prompt(
            ids,
            self.image_inputs(ids, list(sources)),
            list(sources),
            template.effective_question(question, has_images=bool(sources), history=history),
        )

    def image_inputs(self, ids: list[int], sources: list[ImageSource]) -> list[ImageInput]:
        """The engine's view of each image: every run of <IMG_CONTEXT> in ``ids`` takes the next source."""
        runs = image_runs(ids, self.tokenizer.img_context_id)
        counts = [n // self.num_image_token for _, n in runs]
        if [s.num_tiles for s in sources] != counts or any(n % self.num_image_token for _, n in runs):
            raise PromptError(
                f"the prompt has {sum(n for _, n in runs)} <IMG_CONTEXT> tokens in runs of "
                f"{[n for _, n in runs]} but the images give {[s.num_tiles for s in sources]} tiles "
                f"({self.num_image_token} tokens per tile); they must match"
            )
        return [ImageInput(s.digest, start, n, s.tiles) for s, (start, n) in zip(sources, runs)]
