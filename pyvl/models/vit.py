"""InternViT, the vision tower: 448x448 tile -> 1 CLS + 1024 patch tokens of width C.

Module and parameter names mirror the checkpoint keys under ``vision_model.`` so loading is an identity map.
Per layer (pre-norm, layer scale, no final norm):  x += ls1 * Attn(Norm1(x));  x += ls2 * MLP(Norm2(x)).
6B style: RMSNorm, QK-norm over the FULL width C before the head split, no qkv bias.
300M style: LayerNorm with bias, qkv bias, no QK-norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..ops import Ops

__all__ = ["InternVisionModel"]


class VisionNorm(nn.Module):
    """RMSNorm (weight only) or LayerNorm (weight + bias), as ``norm_type`` says."""

    def __init__(self, dim: int, norm_type: str, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if norm_type == "layer_norm" else None
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.grid = grid
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Parameter(torch.empty(1, grid * grid + 1, c))

    def _patch_positions(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        if (h, w) == (self.grid, self.grid):
            return pos  # the original's bicubic resize is an exact identity at the trained size
        # Other tile sizes: bicubic (align_corners=False) resize of the 2-D table in float32, as the original.
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, h * w).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, 32, 32)
        n, c, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # (N, 1024, C), token = row*32 + col
        cls = self.class_embedding.expand(n, 1, c).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1)  # (N, 1025, C)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(h, w)], dim=1)
        return x + pos


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        if cfg.qk_normalization:
            self.q_norm = VisionNorm(c, "rms_norm", cfg.layer_norm_eps, ops)
            self.k_norm = VisionNorm(c, "rms_norm", cfg.layer_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(c, c)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (N, S, C): rows [0,C) Q, [C,2C) K, [2C,3C) V
        if self.q_norm is not None:
            # QK-norm spans all heads together, so it runs before the head split.
            q, k = self.q_norm(q), self.k_norm(k)
        heads = lambda t: t.view(n, s, self.num_heads, -1).transpose(1, 2)  # noqa: E731  (N, H, S, d)
        out = self.ops.vit_attention(heads(q), heads(k), heads(v))
        return self.proj(out.transpose(1, 2).reshape(n, s, -1))  # C wide, or this rank's heads' share of C


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ops.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = VisionNorm(c, cfg.norm_type, cfg.layer_norm_eps, ops)
        self.attn = VisionAttention(cfg, ops)
        self.ls1 = nn.Parameter(torch.empty(c))
        self.norm2 = VisionNorm(c, cfg.norm_type, cfg.layer_norm_eps, ops)
        self.mlp = VisionMLP(cfg, ops)
        self.ls2 = nn.Parameter(torch.empty(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))


class InternVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig, ops: Ops):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, ops)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden state ``select_layer`` of [embeddings, layer 1, ..., layer L] -> (N, 1025, C).

        Layers past the selected one are skipped: their outputs would be thrown away.
        """
        n_layers = len(self.encoder.layers)
        stop = select_layer % (n_layers + 1)
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        return x
