"""InternVLChatModel: InternViT -> pixel shuffle -> mlp1 -> image embeddings spliced into InternLM2.

The three children are named ``vision_model``, ``mlp1`` and ``language_model`` like the checkpoint's
top-level prefixes. Image tokens: every ``<IMG_CONTEXT>`` position of the prompt (batch-major, then sequence
order) takes the next row of the (tiles x 256, H) vision features, in tile order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import PromptError
from ..ops import Ops
from ..quant.linear import use_w4a16_linears
from .llm import InternLM2ForCausalLM
from .projector import build_mlp1, shuffle_tokens
from .vit import InternVisionModel

__all__ = ["InternVLChatModel"]


class InternVLChatModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.vision_model = InternVisionModel(cfg.vision, ops)
        self.mlp1 = build_mlp1(cfg, ops)
        self.language_model = InternLM2ForCausalLM(cfg.llm, ops)
        if cfg.quant is not None:  # an AWQ checkpoint: 4-bit decoder linears
            use_w4a16_linears(self.language_model, cfg, ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.norm.weight.device

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised tiles -> [N, 256, H] image embeddings."""
        hidden = self.vision_model(pixel_values.to(self.device, self.dtype), self.cfg.select_layer)
        return self.mlp1(shuffle_tokens(hidden, self.cfg, self.ops))

    def embed(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None, img_context_id: int
    ) -> torch.Tensor:
        """Token embeddings [B, S, H] with the <IMG_CONTEXT> rows overwritten by ``image_embeds``."""
        embeds = self.language_model.embed(input_ids)
        slots = input_ids == img_context_id
        n_slots = int(slots.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_feats:
            raise PromptError(
                f"the prompt has {n_slots} <IMG_CONTEXT> tokens but the images give {n_feats} "
                f"feature rows ({self.cfg.num_image_token} per tile); they must be equal"
            )
        if n_slots:
            embeds = embeds.clone()
            embeds[slots] = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds
