"""The vision -> language bridge: drop CLS, pixel shuffle, then the ``mlp1`` projector.

(N, 1025, C) -> drop CLS -> (N, 32, 32, C) -> pixel_shuffle(0.5, ps_version) -> (N, 256, 4C)
-> LayerNorm(4C, eps 1e-5) -> Linear(4C, H) -> GELU(erf) -> Linear(H, H) -> (N, 256, H).
``mlp1`` keeps the original nn.Sequential indices (0, 1, 3) so checkpoint keys map one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..ops import Ops

__all__ = ["build_mlp1", "shuffle_tokens"]

MLP1_LAYERNORM_EPS = 1e-5  # PyTorch's default; the ViT's 1e-6 does not apply here (spec trap 7)


class _GELU(nn.Module):
    def __init__(self, ops: Ops):
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.gelu(x)


class _LayerNorm(nn.Module):
    def __init__(self, dim: int, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, MLP1_LAYERNORM_EPS)


def build_mlp1(cfg: ModelConfig, ops: Ops) -> nn.Sequential:
    """LayerNorm(4C) -> Linear(4C, H) -> GELU -> Linear(H, H), indexed like the original Sequential."""
    p, h = cfg.projector_in, cfg.llm.hidden_size
    return nn.Sequential(_LayerNorm(p, ops), nn.Linear(p, h), _GELU(ops), nn.Linear(h, h))


def shuffle_tokens(vit_hidden: torch.Tensor, cfg: ModelConfig, ops: Ops) -> torch.Tensor:
    """(N, 1 + g*g, C) ViT output -> (N, tokens, C / scale^2) mlp1 input."""
    patches = vit_hidden[:, 1:]  # CLS goes before the shuffle (spec trap 5)
    n, t, c = patches.shape
    g = math.isqrt(t)
    return ops.pixel_shuffle(patches.reshape(n, g, g, c), cfg.downsample_ratio, cfg.ps_version)
