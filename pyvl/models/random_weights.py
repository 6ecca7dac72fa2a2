"""Random weights in place of a checkpoint's, for benchmarks at real sizes (pyvl bench's presets) and for a
tensor-parallel rank's shard of one: the same draws wherever the model was allocated."""

from __future__ import annotations

import torch

from .vlm import InternVLChatModel

__all__ = ["fill_random"]


def _is_norm(name: str) -> bool:
    """Norm gains/biases: ViT norm1/norm2/q_norm/k_norm, LLM attention_norm/ffn_norm/norm, mlp1's LayerNorm."""
    parts = name.split(".")
    return (len(parts) > 1 and "norm" in parts[-2]) or name.startswith("mlp1.0.")


@torch.no_grad()
def fill_random(model: InternVLChatModel, device: torch.device, seed: int = 0) -> InternVLChatModel:
    """Random weights into a model allocated on ``device`` (a whole one, or a tensor-parallel rank's shard), in
    place: ~ N(0, 0.02), norm gains 1, norm biases 0; then w1/w3 stacked into w13, as a load does."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
        if _is_norm(name):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith(".qweight"):  # 4-bit weights: q uniform in 0..15 (every bit pattern of the words)
            p.random_(-(2**31), 2**31 - 1, generator=gen)
        elif name.endswith(".qzeros"):  # ... around 8, so (q - 8) * s has a std of 4.6 s = 0.02, as the rest
            p.fill_(8)
        elif name.endswith(".scales"):
            p.fill_(0.02 / 4.6)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    model.language_model.fuse_gate_up()
    return model
